"""Every command shown in README.md, docs/*.md and slurm/README.md is run by a test.

The commands are read from the fenced shell blocks (```bash/```sh/plain ```): every line that
runs python, mpiexec/mpirun/srun, make, pip, sbatch, pytest, mpitrain, data-tools ... (not
output, nor the ``if``/``trap``/``wait`` of a batch script). Each one is in exactly one table:

- :data:`RUN`: run by the named test of this file, which holds the command's text and says what
  it changes to stay small (a training run's ``mpiexec -n N`` becomes one rank in this process
  unless the rank count is the point; a placeholder such as ``...`` or ``DIR`` becomes a value;
  a size shrinks where the text promises no number). Where the text shows an accuracy, the
  test checks it.
- :data:`ELSEWHERE`: why it is not run here (root, a cluster, a benchmark, a site install) and
  which test covers it, if one does.

A command in neither table (a new one in the docs) fails :func:`test_every_doc_command_is_listed`.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI

from tests.conftest import MpiRun

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")),
        "slurm/README.md"]
_SHELL = ("", "bash", "sh", "shell", "console")
#: a line of a plain ``` block that is a command (the others are output, trees, tables)
_COMMAND = re.compile(
    r"^((sudo|\w+=(\$\(\([^)]*\)\)|\$\([^)]*\)|\S*))\s+)*(\S*/)?(python3?\s+(-|\S+\.py)|mpiexec\s|mpirun\s"
    r"|make\s|sbatch\s|pytest\s|srun\s|module\s|export\s|sinfo\b|ip\s|pip\s|\$B\s|tests/)"
    r"|^[A-Z]\w*=\"")
#: in a ```bash block also the console scripts (in a plain block ``mpitrain doctor`` is output)
_SCRIPT = re.compile(r"^(\S*/)?(mpitrain|data-tools)\s")


def _strip_comment(text: str) -> str:
    """``text`` without its shell comment (a ``#`` after a blank, outside quotes)."""
    quote = None
    for i, c in enumerate(text):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.rstrip()


def _complete(text: str) -> bool:
    if text.endswith("\\"):
        return False
    try:
        shlex.split(text)
    except ValueError:  # a quote still open: the command goes on on the next line
        return False
    return True


def _is_command(text: str, lang: str) -> bool:
    return bool(_COMMAND.match(text) or (lang and _SCRIPT.match(text)))


def doc_commands() -> dict[str, str]:
    """Every command of the docs: its one-line key -> its text (continuations joined)."""
    found: dict[str, str] = {}
    for doc in DOCS:
        lang: str | None = None
        buf: str | None = None
        for line in (ROOT / doc).read_text().splitlines():
            fence = re.match(r"^\s*```(\S*)", line)
            if fence:
                lang, buf = None if lang is not None else fence.group(1), None
                continue
            if lang not in _SHELL:
                continue
            text = _strip_comment(line.strip())
            if buf is not None:
                buf = buf[:-1] + " " + text if buf.endswith("\\") else buf + "\n" + text
            elif _is_command(text, lang) or text.endswith("\\"):
                buf = text
            else:
                continue  # output, or a statement of a script (if, trap, wait ...)
            if _complete(buf):
                if _is_command(buf, lang):
                    found[" ".join(buf.split())] = buf
                buf = None
    return found


# the reasons a command runs elsewhere
_CLUSTER = ("needs root and network namespaces: the emulated cluster, tests/cluster "
            "(CI runs them as root, MPITRAIN_REQUIRE_CLUSTER=1): ")
_LIFECYCLE = _CLUSTER + "tests/cluster/test_lifecycle.py::test_up_status_down_idempotent"
_LAUNCH = _CLUSTER + "tests/cluster/test_launch.py::test_two_nodes_two_ranks_world_and_hierarchical"
_BENCH_CLUSTER = (_CLUSTER + "a benchmark of minutes that produced docs/cluster_results; its "
                  "machinery: tests/cluster/test_bench_cluster.py")
_SLURM_NODES = (_CLUSTER + "tests/cluster/test_slurm_nodes.py::"
                "test_train_cpu_across_nodes_with_srun")
_SLURM = ("needs root and a Slurm cluster: tests/slurm (CI starts one, MPITRAIN_REQUIRE_SLURM=1): ")
_GPT_EPOCH = ("a full epoch of the GPT (1,023 steps) takes minutes per run on 2 cores; the same "
              "losses as one process are tested on 200 steps by tests/mpi/test_model_parallel.py"
              "::test_grid_trains_like_one_process")
_ULFM = ("Open MPI launched with --with-ft ulfm (make setup's .venv/openmpi; CI sets "
         "MPITRAIN_REQUIRE_ULFM=1), 4 torch processes: ")
_SITE = "a site install (module system, site MPI), not this machine's; docs/install.md"
_BENCH = "a benchmark run for docs' numbers (minutes); its smoke test: "
_BENCH_HF = (_BENCH + "tests/mpi/test_bench_parallel.py::test_bench_parallel_llama_interleaved_"
             "columns_and_bubble and tests/unit/test_bench_parallel_spec.py")
_BUDGET_DEMO = ("root (cgroups), 4 ranks of a 26M-parameter Llama, 50-75 s on 2 cores (over the CI "
                "budget): " + _BENCH + "tests/unit/test_bench_parallel_spec.py::test_report_"
                "prints_a_killed_method_and_judges_the_targets and ::test_oom_kills_reads_the_"
                "kernels_count (the killed row), tests/mpi/test_bench_parallel.py::test_bench_"
                "parallel_llama_interleaved_columns_and_bubble (the Llama stages in the bench)")

#: command -> the test of this file that runs it
RUN: dict[str, str] = {
    ".venv/bin/python -m data_tools convert --npz mydata.npz --out shards/ --samples-per-shard "
    "50000": "test_readme_your_own_data_and_models",
    ".venv/bin/python -m data_tools split shards/ --method random --fractions 0.9,0.1 --names "
    "train,test": "test_readme_your_own_data_and_models",
    ".venv/bin/mpiexec -n 4 .venv/bin/python -m mpitrain --data shards/ --model mymodels:build "
    "--epochs 20 --batch-size 64 --lr 0.1 --checkpoint-dir ckpt/ --checkpoint-every 500 "
    "--resume auto": "test_readme_your_own_data_and_models",
    ".venv/bin/python -m mpitrain config --print --optimizer adam --epochs 20 > run.toml":
        "test_readme_config_print_reads_back",
    ".venv/bin/mpiexec -n 2 .venv/bin/python -m mpitrain --config run.toml":
        "test_readme_config_print_reads_back",
    ".venv/bin/mpiexec -n 4 .venv/bin/python -m mpitrain --shard parameters --optimizer adam":
        "test_readme_zero3_adam_reaches_the_stated_accuracy",
    ".venv/bin/python -m mpitrain slurm render train-cpu --nodes 4 --min-nodes 2 -- "
    "--global-batch 96": "test_readme_elastic_slurm_render",
    "python -m data_tools convert --sklearn digits --out digits --samples-per-shard 512":
        "test_data_tools_commands",
    "python -m data_tools convert --npz data.npz --out ds --samples-per-shard 50000 "
    "[--x-key X --y-key Y]": "test_data_tools_commands",
    "python -m data_tools convert --npy X.npy Y.npy --out ds": "test_data_tools_commands",
    "python -m data_tools convert --csv table.csv --label species --out ds":
        "test_data_tools_commands",
    "python -m data_tools convert --images photos/ --resize 64 --on-error skip --out ds":
        "test_data_tools_commands",
    "python -m data_tools convert --synthetic 2000000 --features 784 --classes 10 --seed 0 "
    "--out big": "test_data_tools_commands",
    "python -m data_tools convert --npy windows.npy y.npy --vocab 256 --out tok":
        "test_data_tools_commands",
    "python -m data_tools corpus --context 64 --out pystdlib": "test_data_tools_commands",
    "python -m data_tools tokenize notes.txt books/ 'papers/*.md' --out text --context 128 "
    "--tokenizer bpe --vocab-size 4096": "test_tokenize_commands",
    "python -m data_tools tokenize notes.txt --out bytes --context 128": "test_tokenize_commands",
    "mpiexec -n 2 python -m mpitrain --model gpt --data text --context 128 --epochs 4":
        "test_tokenize_commands",
    "python -m data_tools split ds --method stratified --fractions 0.8,0.1,0.1 --names "
    "train,val,test": "test_data_tools_commands",
    "python -m data_tools split ds --method kfold --folds 5 --fold 2 --names train,test":
        "test_data_tools_commands",
    "python -m data_tools split ds --method time --key t --fractions 0.9,0.1 --names train,test":
        "test_data_tools_commands",
    "python -m data_tools inspect ds": "test_data_tools_commands",
    "python -m data_tools verify ds": "test_data_tools_commands",
    '.venv/bin/python -c "from mpi4py import MPI; print(MPI.Get_library_version())"':
        "test_install_md_library_version",
    "python -m mpitrain.horovod install-alias [--target DIR]": "test_horovod_alias_commands",
    "python -m mpitrain.horovod install-alias --uninstall [--target DIR]":
        "test_horovod_alias_commands",
    "python -m data_tools corpus --out OUT_DIR --context 128 [--max-train-mb 16] "
    "[--test-percent 10]": "test_gpt_corpus_train_and_consolidate",
    "python -m mpitrain --model gpt --context 128 --data OUT_DIR ...":
        "test_gpt_corpus_train_and_consolidate",
    "python -m mpitrain checkpoint consolidate DIR/ckpt-step-00000400-RUN.grid gpt.pt":
        "test_gpt_corpus_train_and_consolidate",
    "mpiexec -n 2 python -m mpitrain --timeline run/trace.json --timeline-steps 10:20":
        "test_profiling_commands",
    "python -m mpitrain trace summary run/trace.json": "test_profiling_commands",
    "python -m mpitrain trace plot run/trace.json --out step.png [--step 15]":
        "test_profiling_commands",
    "python -m mpitrain trace summary /tmp/mlp.json --max-rows 0": "test_profiling_commands",
    "python -m mpitrain trace summary on.json --peak-gbs 0.125": "test_profiling_commands",
    "python -m mpitrain trace plot on.json --out cluster-overlap-on.png --step 20":
        "test_profiling_commands",
    "python -m mpitrain ... --checkpoint-dir ckpt/ --checkpoint-every 500 --checkpoint-minutes "
    "30 --keep-last 3 --resume auto": "test_checkpoint_and_plot_commands",
    "python -m mpitrain plot RUN_DIR": "test_checkpoint_and_plot_commands",
    "python -m mpitrain plot RUN_A RUN_B --out DIR --x time": "test_checkpoint_and_plot_commands",
    "python -m mpitrain slurm list": "test_slurm_render_commands",
    "python -m mpitrain slurm render train-gpu --nodes 2 --gpus-per-node 4 --time 04:00:00 "
    "--env-setup 'source ~/venv/bin/activate' --script train.py -o train.sbatch -- "
    "--max-epochs 30": "test_lightning_slurm_render",
    "python -m mpitrain slurm render TEMPLATE [options] [--output job.sbatch] -- PROGRAM "
    "ARGS...": "test_slurm_render_commands",
    "python -m mpitrain slurm render sweep --grid grid.toml --sweep-dir sweeps/lr "
    "--ntasks-per-node 2 --array-parallel 4 -o sweep.sbatch -- --epochs 20 --no-progress":
        "test_slurm_render_commands",
    "python -m mpitrain slurm render preprocess --nodes 1 --ntasks-per-node 8 --time 30 -o "
    "prep.sbatch -- --images /data/raw/train --resize 64 --out /data/shards/train":
        "test_slurm_render_commands",
    "python -m mpitrain slurm render train-gpu --nodes 2 --gpus-per-node 4 --cpus-per-task 8 "
    "--time 06:00:00 --partition gpu --account proj123 --job-name resnet --env-setup 'module "
    "load cuda/12.4 openmpi/4.1 source $HOME/venvs/mpitrain/bin/activate' --launcher srun "
    "--srun-mpi pmix --preempt-seconds 300 --max-restarts 5 --checkpoint-dir "
    "/scratch/$USER/resnet/ckpt -o resnet.sbatch -- --data /scratch/$USER/shards/imagenet "
    "--model mypkg.models:resnet50 --epochs 90 --batch-size 64 --checkpoint-every 500 "
    "--run-dir /scratch/$USER/resnet/run --summary-json /scratch/$USER/resnet/summary.json":
        "test_slurm_render_commands",
    "python -m mpitrain slurm render train-cpu --nodes 4 --min-nodes 2 --ntasks-per-node 2 "
    "--on-rank-loss shrink -o job.sbatch -- --epochs 30 --global-batch 96 --min-ranks 4 "
    "--checkpoint-every 200": "test_slurm_render_commands",
}

#: command -> why it is not run here, and what covers it
ELSEWHERE: dict[str, str] = {
    "make demo": "tests/mpi/test_install.py::test_wheel_installs_and_runs_outside_the_checkout "
                 "runs the demo (mpiexec -n 2 mpitrain) and checks the README's accuracy",
    "make test": "the CI entry point itself (.ci/run)",
    ".venv/bin/mpiexec -n 2 .venv/bin/python -m mpitrain --model gpt --tensor-parallel 2":
        _GPT_EPOCH,
    ".venv/bin/mpiexec -n 8 .venv/bin/python -m mpitrain --model gpt --tensor-parallel 2 "
    "--pipeline-stages 2 --micro-batches 8": "8 ranks on 2 cores; " + _GPT_EPOCH,
    "sudo .venv/bin/python -m mpitrain cluster up --nodes 2 --link 1gbit": _LIFECYCLE,
    "sudo .venv/bin/python -m mpitrain cluster mpiexec -n 4 -- .venv/bin/python -m mpitrain "
    "--compression bf16": _CLUSTER + "tests/cluster/test_launch.py::"
    "test_digits_two_nodes_match_four_ranks_on_one_host",
    "pip install torch==2.13.0 mpich": "tests/mpi/test_install.py (the new venv links this "
    "venv's torch 2.13.0 and MPICH instead of downloading them)",
    "pip install .": "tests/mpi/test_install.py::test_wheel_installs_and_runs_outside_the_checkout"
                     " (builds the sdist and the wheel, installs it into a new venv)",
    "mpitrain --version": "tests/mpi/test_install.py::"
                          "test_wheel_installs_and_runs_outside_the_checkout",
    # docs/benchmarks.md: the Lightning benchmark (a measurement, minutes at full size)
    "python -m mpitrain.bench lightning -n 2 --model cnn --methods ddp,mpi,mpi:gradients "
    "--steps 10 --warmup 2 --rounds 5 --json lightning_cnn_n2.json":
        "tests/mpi/test_lightning.py::test_bench_lightning_smoke runs it at tiny size",
    "python -m mpitrain.bench lightning -n 2 --model mlp --methods ddp,mpi,mpi:gradients,"
    "mpi:parameters --rounds 7 --json lightning_mlp_n2.json":
        "tests/mpi/test_lightning.py::test_bench_lightning_smoke runs it at tiny size",
    "sudo python -m mpitrain.bench cluster --topologies 2x1,2x2 --links 1gbit --out DIR -- "
    "lightning --rounds 5 --steps 20": "root and the emulated cluster; tests/cluster/"
    "test_bench_cluster.py::test_bench_cluster_runs_the_benchmark_across_the_nodes runs bench "
    "cluster, tests/mpi/test_lightning.py::test_bench_lightning_smoke the Lightning benchmark",
    # docs/lightning.md
    'pip install "mpitrain[lightning]"': "tests/mpi/test_install.py::"
    "test_wheel_installs_and_runs_outside_the_checkout (the wheel with [plot,lightning])",
    "mpiexec -n 4 python train.py": "a script of the user's; the Lightning strategy's own "
    "multi-rank tests run one like it (Trainer.fit under mpiexec)",
    "sbatch train.sbatch": _SLURM + "tests/slurm/test_lightning_job.py::"
    "test_lightning_script_preempted_requeued_resumed (a rendered --script job: preempted, "
    "requeued, resumed)",
    # docs/cluster.md
    "sudo python -m mpitrain cluster up --nodes 2 --link 1gbit": _LIFECYCLE,
    "sudo python -m mpitrain cluster mpiexec -n 4 --per-node 2 -- python -m mpitrain "
    "--epochs 2": _LAUNCH,
    "sudo python -m mpitrain cluster exec node1 -- hostname": _CLUSTER + "tests/cluster/"
    "test_lifecycle.py::test_agent_takes_ssh_style_calls",
    "sudo python -m mpitrain cluster up --nodes 2": _CLUSTER + "every cluster test module "
    "(tests/cluster/conftest.py's cluster2 fixture)",
    "sudo MPITRAIN_KILL_AT=2+3:12 python -m mpitrain cluster mpiexec --ulfm -n 4 --per-node 2 "
    "-- python -m mpitrain --on-rank-loss shrink --epochs 2 --global-batch 48 --no-progress":
        _CLUSTER + "tests/cluster/test_node_loss_ulfm.py::"
        "test_whole_node_killed_the_job_finishes_on_the_other_node (with --sample-log)",
    "sudo python -m mpitrain cluster status": _LIFECYCLE,
    "sudo python -m mpitrain cluster down": _LIFECYCLE,
    "ip netns exec mpt-head unshare --uts sh -c 'hostname \"$0\" || exit 255; exec \"$@\"' "
    "mpt-head .venv/bin/mpiexec -launcher ssh -launcher-exec /run/mpitrain-cluster/agent -iface "
    "mpt0 -hosts mpt-node1:2,mpt-node2:2 -n 4 -genvall -genv MPIR_CVAR_CH4_NETMOD ofi -genv "
    "FI_PROVIDER tcp -genv FI_TCP_IFACE mpt0 -genv OMP_NUM_THREADS 1 CMD...":
        "what `cluster mpiexec` runs (shown, not typed): tests/cluster/test_commands.py::"
        "test_mpich_command_line",
    "ip netns exec mpt-head unshare --uts sh -c 'hostname \"$0\" || exit 255; exec \"$@\"' "
    "mpt-head env SHELL=/bin/sh /venv/bin/mpirun --prtemca plm_ssh_agent "
    "/run/mpitrain-cluster/agent --prtemca plm_ssh_no_tree_spawn 1 --prtemca oob_tcp_if_include "
    "mpt0 --mca btl_tcp_if_include mpt0 --bind-to none --mca mpi_yield_when_idle 1 --host "
    "mpt-node1:2,mpt-node2:2 -n 4 --allow-run-as-root [-x OMP_NUM_THREADS=1] CMD...":
        "what `cluster mpiexec` runs for Open MPI (shown, not typed): "
        "tests/cluster/test_commands.py::test_openmpi_command_line",
    "sudo python -m mpitrain cluster mpiexec -n 2 --netmod ofi -- .venv/bin/python "
    "tests/cluster/scenarios/allreduce_time.py 16 10": _CLUSTER + "tests/cluster/"
    "test_launch.py::test_two_nodes_one_rank_each_traffic_crosses_links",
    "MPITRAIN_MPIEXEC=/run/mpitrain-cluster/mpiexec python -m mpitrain.bench allreduce -n 2 "
    "--reps 3 --loop-mb 8 --json ar.json": _CLUSTER + "tests/cluster/test_launch.py::"
    "test_mpiexec_wrapper_runs_any_launcher_user_across_the_nodes",
    'B="python -m mpitrain.bench cluster --out docs/cluster_results"': _BENCH_CLUSTER,
    "$B --topologies 2x1,4x1 --links 1gbit -- allreduce --reps 3 --loop-mb 16 --max-bytes "
    "33554432": _BENCH_CLUSTER,
    "$B --topologies 2x1 --links 10gbit,none -- allreduce --reps 3 --loop-mb 32 --max-bytes "
    "33554432": _BENCH_CLUSTER,
    "$B --topologies 2x2 --links 1gbit -- algo --algo flat,hierarchical --variants "
    "reduce_bcast,rs_ag --ranks-per-node 0 --sizes 1048576,4194304,16777216 --reps 3":
        _BENCH_CLUSTER,
    "$B --topologies 2x2 --links 1gbit -- half --sizes 1M,4M,16M --reps 3": _BENCH_CLUSTER,
    "$B --topologies 2x2 --links 1gbit -- train --models mlp,cnn --rounds 3 --methods "
    "nocomm,ddp,mpitrain,mpitrain:hier,mpitrain:hier:fp16,mpitrain:hier:bf16,mpitrain:1:hier,"
    "mpitrain:16:hier": _BENCH_CLUSTER,
    "$B --topologies 2x1,4x1 --links 1gbit -- train --models mlp --rounds 3 --methods "
    "nocomm,ddp,mpitrain,mpitrain:1,mpitrain:16,mpitrain:off,mpitrain:fp16,mpitrain:fp16-ef":
        _BENCH_CLUSTER,
    "$B --topologies 2x2 --links 1gbit -- shard --widths 1024,2048,2048,1024 --steps 3 "
    "--methods replicas,zero2,zero2:hierarchical,zero3,zero3:hierarchical": _BENCH_CLUSTER,
    "sudo python -m mpitrain cluster up --nodes 4 --link 1gbit": _SLURM_NODES,
    "sudo python -m tests.cluster.slurm_nodes start": _SLURM_NODES,
    "PATH=/tmp/mpitrain-slurm-nodes/bin:$PATH sinfo -N": _SLURM_NODES,
    "sudo python -m tests.cluster.slurm_nodes stop": _SLURM_NODES,
    "sudo python -m mpitrain cluster down --kill": _CLUSTER + "tests/cluster/test_lifecycle.py"
    "::test_down_refuses_while_processes_run_unless_kill",
    "OMP_NUM_THREADS=1 sudo .venv/bin/python -m pytest -q tests/cluster":
        "the cluster tests themselves (CI runs them as root)",
    # docs/data.md
    "mpiexec -n 4 python -m data_tools convert --synthetic 2000000 --features 784 --out big":
        "4 ranks against 1, byte for byte (at 4,000 samples): tests/mpi/test_data.py::"
        "test_parallel_convert_equals_serial_and_ranks_read_their_part",
    # docs/install.md
    "module load openmpi": _SITE,
    "make setup MPI_SPEC=": _SITE + " (the site MPI build of mpi4py; CI uses the MPICH wheel)",
    "MPICC=$(which mpicc) .venv/bin/pip install --no-binary mpi4py --no-cache-dir mpi4py": _SITE,
    "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1":
        "Open MPI only (CI uses MPICH); mpitrain.runtime.launch.launch_env sets both for its "
        "children",
    "mpiexec --oversubscribe -n 4 python -m mpitrain": "Open MPI's flag (MPICH's mpiexec "
    "oversubscribes without it); 4 ranks of the demo: test_readme_zero3_adam_reaches_the_"
    "stated_accuracy",
    # docs/migrating-from-horovod.md
    "python -m mpitrain.horovod install-alias": "into this venv's site-packages it would alias "
    "horovod for every other test; with --target: test_horovod_alias_commands and "
    "tests/unit/test_horovod_serial.py::test_alias_install_refuses_a_real_horovod_and_uninstalls",
    # docs/model-parallel.md
    "mpiexec -n 8 python -m mpitrain --model gpt --tensor-parallel 2 --pipeline-stages 2 "
    "--micro-batches 8 --pipeline-schedule 1f1b --context 128 --hidden 256 --layers 8 "
    "--heads 8": "8 ranks of a larger GPT on 2 cores; " + _GPT_EPOCH,
    "python -m mpitrain.bench parallel --json parallel.json": _BENCH
    + "tests/mpi/test_bench_parallel.py::test_bench_parallel_memory_and_bubble",
    "python -m mpitrain.bench parallel --model llama --steps 5 --methods "
    "dp,zero3,tp2,pp2-1f1b,pp2-interleaved,tp2-pp2,tp2-pp2-interleaved,"
    "torch-fsdp2,torch-tp2,torch-pp2,torch-tp2-pp2 "
    "--json docs/bench_parallel_llama_n4.json": _BENCH_HF,
    "python -m mpitrain.bench parallel -n 2 --model llama --steps 5 --methods "
    "pp2-1f1b,pp2-interleaved,torch-pp-1f1b,torch-pp-interleaved --json "
    "docs/bench_parallel_llama_n2.json": _BENCH_HF,
    "python -m mpitrain.bench parallel --model gpt2 --steps 5 --methods "
    "dp,zero3,tp2,pp2-1f1b,pp2-interleaved,tp2-pp2,tp2-pp2-interleaved,"
    "torch-fsdp2,torch-tp2,torch-pp2,torch-tp2-pp2 "
    "--json docs/bench_parallel_gpt2_n4.json": _BENCH_HF,
    "python -m mpitrain.bench parallel -n 2 --model gpt2 --steps 5 --methods "
    "pp2-1f1b,pp2-interleaved,torch-pp-1f1b,torch-pp-interleaved --json "
    "docs/bench_parallel_gpt2_n2.json": _BENCH_HF,
    "python -m mpitrain.bench parallel --model gpt --steps 5 --methods "
    "dp,zero3,tp2,pp2-1f1b,pp2-interleaved,tp2-pp2,tp2-pp2-interleaved,"
    "torch-fsdp2,torch-tp2,torch-pp2,torch-tp2-pp2 "
    "--json docs/bench_parallel_gpt_n4.json": _BENCH_HF,
    "python -m mpitrain.bench parallel -n 2 --model gpt --steps 5 --methods "
    "pp2-1f1b,pp2-interleaved,torch-pp-1f1b,torch-pp-interleaved --json "
    "docs/bench_parallel_gpt_n2.json": _BENCH_HF,
    "python -m mpitrain.bench parallel -n 2 --model llama --dim 512 --context 128 --steps 5 "
    "--methods pp2-1f1b,pp2-interleaved --json docs/bench_parallel_llama_n2_large.json":
        _BENCH_HF,
    "sudo python -m mpitrain.bench parallel --model llama --dim 768 --layers 4 --heads 4 "
    "--context 32 --batch 8 --micro-batches 4 --steps 1 --methods dp,tp2-pp2 "
    "--memory-budget-mb 200 --json docs/bench_parallel_budget_llama.json": _BUDGET_DEMO,
    "sudo python -m mpitrain.bench parallel --model llama --dim 768 --layers 4 --heads 4 "
    "--context 32 --batch 8 --micro-batches 4 --steps 1 --methods dp,tp2-pp2 "
    "--memory-budget-mb 4000 --json docs/bench_parallel_budget_llama_4000.json": _BUDGET_DEMO,
    "export MPITRAIN_MPIEXEC=/run/mpitrain-cluster/mpiexec MPITRAIN_CLUSTER_PER_NODE=2":
        _CLUSTER + "tests/cluster/test_launch.py::"
        "test_mpiexec_wrapper_runs_any_launcher_user_across_the_nodes",
    "python -m mpitrain.bench parallel -n 4 --methods dp,tp2,sp2,tp2-pp2 --placement inside":
        _BENCH_CLUSTER,
    "python -m mpitrain.bench parallel -n 4 --methods dp,tp2,sp2,tp2-pp2 --placement across":
        _BENCH_CLUSTER,
    "mpiexec -n 1 python -m mpitrain --model gpt": _GPT_EPOCH,
    "mpiexec -n 2 python -m mpitrain --model gpt --tensor-parallel 2": _GPT_EPOCH,
    "mpiexec -n 2 python -m mpitrain --model gpt --pipeline-stages 2 --micro-batches 4":
        _GPT_EPOCH,
    "mpiexec -n 2 python -m mpitrain --model gpt --tensor-parallel 2 --activation-checkpointing "
    "full": _GPT_EPOCH + "; checkpointing == none: tests/mpi/test_model_parallel.py::"
    "test_split_gpt_equals_dense",
    # docs/profiling.md
    "mpiexec -n 2 python tests/mpi/scenarios/timeline_cost.py 16 25": _BENCH
    + "tests/mpi/test_timeline.py::test_trainer_writes_a_timeline (the recording itself)",
    "mpiexec -n 2 python tests/mpi/scenarios/timeline_cost.py 10 20 /tmp/mlp.json": _BENCH
    + "tests/mpi/test_timeline.py::test_trainer_writes_a_timeline (the recording itself)",
    "sudo python -m mpitrain cluster mpiexec -n 2 -- python tests/mpi/scenarios/"
    "timeline_cost.py 2 15 on.json on": _BENCH_CLUSTER,
    "sudo python -m mpitrain cluster mpiexec -n 2 -- python tests/mpi/scenarios/"
    "timeline_cost.py 2 15 off.json off": _BENCH_CLUSTER,
    "sudo python -m mpitrain cluster mpiexec -n 2 -- env MPIR_CVAR_ASYNC_PROGRESS=1 python "
    "tests/mpi/scenarios/timeline_cost.py 2 15 async.json on": _BENCH_CLUSTER,
    # docs/sharding.md
    "python -m mpitrain.bench shard -n 2 --widths 1024,4096,4096,4096,4096,1024 --steps 5 "
    "--json docs/shard_results_59m_n2.json": _BENCH
    + "tests/mpi/test_bench_shard.py::test_bench_shard_memory_per_rank",
    "python -m mpitrain.bench shard -n 2 --model transformer --dim 512 --layers 8 --seq 64 "
    "--batch 8 --steps 3 --json docs/shard_results_transformer_n2.json": _BENCH
    + "tests/mpi/test_bench_shard.py::test_bench_shard_memory_per_rank",
    "sudo python -m mpitrain cluster up --nodes 2 --link 10gbit": _LIFECYCLE,
    "MPITRAIN_MPIEXEC=/run/mpitrain-cluster/mpiexec python -m mpitrain.bench shard -n 2 "
    "--methods replicas,zero2,zero3,torch-fsdp2 --steps 3 --json "
    "docs/shard_results_cluster_10gbit.json": _BENCH_CLUSTER,
    "sudo python -m mpitrain.bench shard -n 2 --widths 1024,4096,4096,4096,4096,1024 --steps 3 "
    "--methods replicas,zero1,zero2,zero3 --memory-budget-mb 1024 --json "
    "docs/shard_budget_n2.json": "root (cgroups) and gigabytes of memory: " + _BENCH
    + "tests/mpi/test_bench_shard.py::test_bench_shard_memory_per_rank",
    # README.md, docs/robustness.md and docs/benchmarks.md: --on-rank-loss shrink (ULFM)
    ".venv/openmpi/bin/mpirun --with-ft ulfm -n 4 .venv/bin/python -m mpitrain --on-rank-loss "
    "shrink --global-batch 48": _ULFM
    + "tests/mpi/test_rank_loss.py::test_one_of_four_ranks_killed_the_job_finishes_on_three",
    "mpirun --with-ft ulfm -n 4 python -m mpitrain --on-rank-loss shrink --global-batch 48 "
    "--checkpoint-dir ckpt --checkpoint-every 10": _ULFM
    + "tests/mpi/test_rank_loss.py::test_two_failures_then_too_few_ranks_exit_99_and_resume",
    "MPITRAIN_KILL_AT=2:15 mpirun --with-ft ulfm --oversubscribe -n 4 python -m mpitrain "
    "--on-rank-loss shrink --epochs 3 --no-progress --global-batch 48": _ULFM
    + "tests/mpi/test_rank_loss.py::test_one_of_four_ranks_killed_the_job_finishes_on_three "
    "(the same kill, 4 epochs)",
    "python -m mpitrain.bench recovery --shard none gradients --repeat 3 --json "
    "docs/recovery_results.json": _BENCH + "tests/mpi/test_bench_recovery.py::"
    "test_bench_recovery_both_paths (2 ranks, 5 steps)",
    # slurm/README.md
    "sbatch job.sbatch": _SLURM + "tests/slurm/test_cluster.py::"
    "test_train_cpu_template_srun_and_mpirun",
    "MPITRAIN_CONTINUATION=$((RESTARTS + 1)) MPITRAIN_CHECKPOINT_DIR=$CHECKPOINT_DIR sbatch "
    '--export=ALL --dependency=afterany:$SLURM_JOB_ID "$0"': "what the template runs (shown, "
    "not typed): " + _SLURM + "tests/slurm/test_requeue.py::test_continuation_job_fallback",
    "sbatch sweep.sbatch": _SLURM + "tests/slurm/test_cluster.py::test_sweep_array_and_summary",
    "python -m mpitrain sweep-summary sweeps/lr": "needs the sweep's finished runs: "
    + _SLURM + "tests/slurm/test_cluster.py::test_sweep_array_and_summary; the table itself: "
    "tests/unit/test_slurm_sweep.py::test_best_first_with_swept_keys",
    "sbatch resnet.sbatch": "4 GPUs x 2 nodes and ImageNet; the GPU template renders in "
    "test_slurm_render_commands and tests/unit/test_slurm_render.py",
    "sudo tests/slurm/cluster.sh start": _SLURM + "the conftest starts it",
    "sinfo": _SLURM + "the conftest checks the node is idle",
    "sudo .venv/bin/pytest -m slurm tests/slurm -v": "the Slurm tests themselves (CI runs them)",
    "sudo tests/slurm/cluster.sh stop": _SLURM + "the conftest stops what it started",
}


def test_every_doc_command_is_listed() -> None:
    found = set(doc_commands())
    assert found, "no commands found: the extraction is broken"
    assert not set(RUN) & set(ELSEWHERE), set(RUN) & set(ELSEWHERE)
    missing = sorted(found - set(RUN) - set(ELSEWHERE))
    assert not missing, "commands in the docs that no test runs or explains:\n" + "\n".join(
        missing)
    stale = sorted((set(RUN) | set(ELSEWHERE)) - found)
    assert not stale, "listed commands no longer in the docs:\n" + "\n".join(stale)
    tree = ast.parse(Path(__file__).read_text())
    strings = {node.name: {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)}
               for node in tree.body if isinstance(node, ast.FunctionDef)}
    for command, test in RUN.items():  # each one is really in its test
        assert command in strings[test], (test, command)


def test_the_tests_named_as_covering_exist() -> None:
    for why in ELSEWHERE.values():
        for path, name in re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", why):
            assert (ROOT / path).is_file(), path
            if name:
                assert f"def {name}(" in (ROOT / path).read_text(), (path, name)


# ---- running them ----------------------------------------------------------------------------
@pytest.fixture()
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_cache: Path) -> Iterator[Path]:
    """Run in an empty directory with the session's digits cache and no other MPITRAIN_*."""
    import os

    for name in [n for n in os.environ if n.startswith("MPITRAIN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MPITRAIN_CACHE", str(digits_cache))
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def words(command: str, *changes: tuple[str, str]) -> list[str]:
    """The words of a listed ``command`` with ``changes`` (old, new) applied to its text."""
    text = doc_commands()[command] if command in RUN else command
    for old, new in changes:
        assert old in text, (old, command)
        text = text.replace(old, new)
    return shlex.split(text.replace("\\\n", " "))


def run(command: str, *changes: tuple[str, str], expect: int = 0) -> None:
    """Run a listed ``python -m X`` command in this process (one rank, MPI.COMM_SELF)."""
    argv = words(command, *changes)
    out = None
    if ">" in argv:
        argv, out = argv[:argv.index(">")], argv[argv.index(">") + 1]
    while argv[0] == "mpiexec" or argv[0].endswith("/mpiexec"):
        argv = argv[3:]  # mpiexec -n N: one rank here
    assert Path(argv[0]).name == "python" and argv[1] == "-m", argv
    module, args = argv[2], argv[3:]
    if module == "data_tools":
        from data_tools.cli import main as data_tools_main

        code = data_tools_main(args, MPI.COMM_SELF)
    elif module == "mpitrain.horovod":
        from mpitrain.horovod.__main__ import main as horovod_main

        code = horovod_main(args)
    elif module == "mpitrain" and (not args or args[0].startswith("-")):
        from mpitrain.train.run import main as train_main

        code = train_main(args, MPI.COMM_SELF)
    else:
        assert module == "mpitrain", module
        from mpitrain.cli import main as cli_main

        if out is None:
            code = cli_main(args)
        else:
            import contextlib
            import io

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = cli_main(args)
            Path(out).write_text(buf.getvalue())
    assert code == expect, (command, code)


def _done(stdout: str) -> dict[str, str]:
    m = re.search(r"mpitrain: done: (\d+) ranks, (\d+) epochs, (\d+) steps, .*test accuracy "
                  r"([\d.]+)%", stdout)
    assert m is not None, stdout[-2000:]
    return dict(zip(("ranks", "epochs", "steps", "accuracy"), m.groups(), strict=True))


def test_readme_your_own_data_and_models(here: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.savez("mydata.npz", x=digits.data / 16, y=digits.target)  # features in [0, 1]
    (here / "mymodels.py").write_text(
        "import torch.nn as nn\n\n\ndef build(config):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, config.hidden), nn.ReLU(),\n"
        "                         nn.Linear(config.hidden, 10))\n")
    monkeypatch.syspath_prepend(str(here))
    run(".venv/bin/python -m data_tools convert --npz mydata.npz --out shards/ "
        "--samples-per-shard 50000")
    run(".venv/bin/python -m data_tools split shards/ --method random --fractions 0.9,0.1 "
        "--names train,test")
    capsys.readouterr()
    # as written (20 epochs of batch 64), on one rank: 25 steps an epoch, a checkpoint at 500
    train = (".venv/bin/mpiexec -n 4 .venv/bin/python -m mpitrain --data shards/ --model "
             "mymodels:build --epochs 20 --batch-size 64 --lr 0.1 --checkpoint-dir ckpt/ "
             "--checkpoint-every 500 --resume auto")
    run(train)
    done = _done(capsys.readouterr().out)
    assert (done["epochs"], done["steps"]) == ("20", "500") and float(done["accuracy"]) > 90
    assert (here / "ckpt" / "step-000000500.pt").is_file()
    run(train)  # --resume auto: the same command again continues from the checkpoint
    assert "resumed from ckpt/step-000000500.pt" in capsys.readouterr().out.replace(
        str(here) + "/", "")


def test_readme_config_print_reads_back(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpitrain.config import resolve

    run(".venv/bin/python -m mpitrain config --print --optimizer adam --epochs 20 > run.toml")
    assert resolve({"config": "run.toml"}) == resolve({"optimizer": "adam", "epochs": "20"})
    capsys.readouterr()
    run(".venv/bin/mpiexec -n 2 .venv/bin/python -m mpitrain --config run.toml",
        ("run.toml", "run.toml --max-steps 10"))
    out = capsys.readouterr().out
    assert "mpitrain: --optimizer adam defaults: --lr 0.006" in out
    assert _done(out)["steps"] == "10"


@pytest.mark.mpi
def test_readme_zero3_adam_reaches_the_stated_accuracy(mpirun: MpiRun) -> None:
    command = (".venv/bin/mpiexec -n 4 .venv/bin/python -m mpitrain --shard parameters "
               "--optimizer adam")
    readme = (ROOT / "README.md").read_text()
    above = readme[:readme.index(command)].splitlines()[-2:]
    stated = float(re.findall(r"test accuracy ([\d.]+)%", "\n".join(above))[-1])
    argv = words(command)
    proc = mpirun(int(argv[2]), [*argv[4:], "--no-progress"], timeout=240)
    done = _done(proc.stdout)
    assert done["ranks"] == "4"
    assert abs(float(done["accuracy"]) - stated) <= 1.0, (done, stated)  # before: 84.7%
    assert "--optimizer adam defaults: --lr 0.006 for 32 samples, sqrt scaling to 0.012" in (
        proc.stdout)


def test_readme_elastic_slurm_render(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(".venv/bin/python -m mpitrain slurm render train-cpu --nodes 4 --min-nodes 2 -- "
        "--global-batch 96")
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2-4" in out and "TRAIN_ARGS=(--global-batch 96)" in out


def test_data_tools_commands(here: Path) -> None:
    rng = np.random.default_rng(0)
    alternatives = {  # each writes its own --out ds: one directory each
        "npz": "python -m data_tools convert --npz data.npz --out ds --samples-per-shard 50000 "
               "[--x-key X --y-key Y]",
        "npy": "python -m data_tools convert --npy X.npy Y.npy --out ds",
        "csv": "python -m data_tools convert --csv table.csv --label species --out ds",
        "images": "python -m data_tools convert --images photos/ --resize 64 --on-error skip "
                  "--out ds",
    }
    for name in alternatives:
        (here / name).mkdir()
    x, y = rng.normal(size=(200, 8)), rng.integers(0, 4, 200)
    np.savez("npz/data.npz", x=x, y=y, t=np.arange(200.0))
    np.save("npy/X.npy", x.astype(np.float32))
    np.save("npy/Y.npy", y)
    rows = [",".join(f"{v:.3f}" for v in r) + f",{'ab'[int(c) % 2]}" for r, c in zip(x, y,
                                                                                   strict=True)]
    (here / "csv" / "table.csv").write_text("a,b,c,d,e,f,g,h,species\n" + "\n".join(rows))
    from PIL import Image

    for label in ("cat", "dog"):
        (here / "images" / "photos" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(
                here / "images" / "photos" / label / f"{i}.png")
    for name, command in alternatives.items():
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(here / name)
            run(command, *[("[--x-key X --y-key Y]", "")] * (name == "npz"))
            assert (here / name / "ds" / "manifest.json").is_file()
    np.save("windows.npy", rng.integers(0, 256, (40, 65)))
    np.save("y.npy", np.zeros(40, dtype=np.int64))
    run("python -m data_tools convert --sklearn digits --out digits --samples-per-shard 512")
    run("python -m data_tools convert --synthetic 2000000 --features 784 --classes 10 --seed 0 "
        "--out big", ("2000000", "2000"))  # 6 MB instead of 6 GB
    run("python -m data_tools convert --npy windows.npy y.npy --vocab 256 --out tok")
    run("python -m data_tools corpus --context 64 --out pystdlib")
    with pytest.MonkeyPatch.context() as mp:  # the splits and checks of the npz dataset (t)
        mp.chdir(here / "npz")
        run("python -m data_tools split ds --method stratified --fractions 0.8,0.1,0.1 --names "
            "train,val,test")
        run("python -m data_tools split ds --method kfold --folds 5 --fold 2 --names train,test")
        run("python -m data_tools split ds --method time --key t --fractions 0.9,0.1 --names "
            "train,test")
        run("python -m data_tools inspect ds")
        run("python -m data_tools verify ds")
        splits = json.loads((here / "npz" / "ds" / "manifest.json").read_text())["splits"]
        assert {"train", "val", "test"} <= set(splits)
    for out in ("digits", "big", "tok", "pystdlib"):
        assert (here / out / "manifest.json").is_file(), out


def test_tokenize_commands(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])  # text that every machine has
    (here / "books").mkdir()
    (here / "papers").mkdir()
    (here / "notes.txt").write_bytes((stdlib / "json" / "decoder.py").read_bytes())
    (here / "books" / "encoder.txt").write_bytes((stdlib / "json" / "encoder.py").read_bytes())
    (here / "papers" / "json.md").write_bytes((stdlib / "json" / "__init__.py").read_bytes())
    run("python -m data_tools tokenize notes.txt books/ 'papers/*.md' --out text --context 128 "
        "--tokenizer bpe --vocab-size 4096")
    run("python -m data_tools tokenize notes.txt --out bytes --context 128")
    text = json.loads((here / "text" / "manifest.json").read_text())["params"]
    assert text["vocab"] == 4096 and text["tokenizer"]["file"] == "tokenizer.json"
    assert len(text["text_files"]) == 3 and (here / "text" / "tokenizer.json").is_file()
    assert json.loads((here / "bytes" / "manifest.json").read_text())["params"]["vocab"] == 256
    capsys.readouterr()
    run("mpiexec -n 2 python -m mpitrain --model gpt --data text --context 128 --epochs 4",
        ("--epochs 4", "--max-steps 3 --hidden 16 --heads 2 --layers 1 --batch-size 4 "
         "--no-progress"))
    assert "3 steps" in capsys.readouterr().out


def test_install_md_library_version() -> None:
    argv = words('.venv/bin/python -c "from mpi4py import MPI; print(MPI.Get_library_version())"')
    out = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "MPICH" in out or "Open MPI" in out, out


def test_horovod_alias_commands(here: Path) -> None:
    target = ("[--target DIR]", f"--target {here / 'site'}")
    run("python -m mpitrain.horovod install-alias [--target DIR]", target)
    assert (here / "site" / "horovod").is_dir()
    run("python -m mpitrain.horovod install-alias --uninstall [--target DIR]", target)
    assert not (here / "site" / "horovod").exists()


def test_gpt_corpus_train_and_consolidate(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run("python -m data_tools corpus --out OUT_DIR --context 128 [--max-train-mb 16] "
        "[--test-percent 10]", ("[--max-train-mb 16]", "--max-train-mb 1"),
        ("[--test-percent 10]", "--test-percent 10"))
    capsys.readouterr()
    run("python -m mpitrain --model gpt --context 128 --data OUT_DIR ...",
        ("...", "--max-steps 4 --checkpoint-dir ck --checkpoint-every 4 --no-progress"))
    assert "--model gpt defaults" in capsys.readouterr().out
    (grid,) = (here / "ck").glob("*.grid")
    run("python -m mpitrain checkpoint consolidate DIR/ckpt-step-00000400-RUN.grid gpt.pt",
        ("DIR/ckpt-step-00000400-RUN.grid", str(grid)))
    state = torch.load(here / "gpt.pt", weights_only=True)
    assert any(k.endswith("weight") for k in state) and all(
        isinstance(v, torch.Tensor) for v in state.values())


def test_profiling_commands(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    run("mpiexec -n 2 python -m mpitrain --timeline run/trace.json --timeline-steps 10:20",
        ("10:20", "10:20 --epochs 1 --no-progress"))
    capsys.readouterr()
    run("python -m mpitrain trace summary run/trace.json")
    assert "overall" in capsys.readouterr().out
    run("python -m mpitrain trace plot run/trace.json --out step.png [--step 15]",
        ("[--step 15]", "--step 15"))
    # the cluster's traces (on.json) and the benchmark's (/tmp/mlp.json): this run's instead
    run("python -m mpitrain trace summary /tmp/mlp.json --max-rows 0",
        ("/tmp/mlp.json", "run/trace.json"))
    run("python -m mpitrain trace summary on.json --peak-gbs 0.125", ("on.json", "run/trace.json"))
    run("python -m mpitrain trace plot on.json --out cluster-overlap-on.png --step 20",
        ("on.json", "run/trace.json"), ("--step 20", "--step 15"))  # this run recorded 10-19
    assert (here / "step.png").stat().st_size > 0
    assert (here / "cluster-overlap-on.png").stat().st_size > 0


def test_checkpoint_and_plot_commands(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    command = ("python -m mpitrain ... --checkpoint-dir ckpt/ --checkpoint-every 500 "
               "--checkpoint-minutes 30 --keep-last 3 --resume auto")
    capsys.readouterr()
    run(command, ("...", "--run-dir RUN_A --no-progress"))  # the demo: 528 steps on one rank
    assert _done(capsys.readouterr().out)["steps"] == "528"
    assert {p.name for p in (here / "ckpt").iterdir()} >= {
        "step-000000500.pt", "step-000000500.pt.sha256", "latest"}
    run(command, ("...", "--run-dir RUN_A --no-progress"))
    assert "resumed from" in capsys.readouterr().out
    from mpitrain.train.run import main as train_main  # a second run to overlay

    assert train_main(["--run-dir", "RUN_B", "--epochs", "2", "--no-progress"], MPI.COMM_SELF) == 0
    run("python -m mpitrain plot RUN_DIR", ("RUN_DIR", "RUN_A"))
    assert {"loss.png", "accuracy.png", "throughput.png"} <= {
        p.name for p in (here / "RUN_A" / "plots").iterdir()}
    run("python -m mpitrain plot RUN_A RUN_B --out DIR --x time")
    assert any((here / "DIR").iterdir())


def test_slurm_render_commands(here: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run("python -m mpitrain slurm list")
    assert "train-gpu" in capsys.readouterr().out
    run("python -m mpitrain slurm render TEMPLATE [options] [--output job.sbatch] -- PROGRAM "
        "ARGS...", ("TEMPLATE [options] [--output job.sbatch] -- PROGRAM ARGS...",
                    "train-cpu --output job.sbatch -- --epochs 2"))
    toml = re.search(r"```toml\n(.*?)```", (ROOT / "slurm" / "README.md").read_text(), re.S)
    assert toml is not None
    (here / "grid.toml").write_text(toml.group(1))  # the README's own grid
    run("python -m mpitrain slurm render sweep --grid grid.toml --sweep-dir sweeps/lr "
        "--ntasks-per-node 2 --array-parallel 4 -o sweep.sbatch -- --epochs 20 --no-progress")
    run("python -m mpitrain slurm render preprocess --nodes 1 --ntasks-per-node 8 --time 30 -o "
        "prep.sbatch -- --images /data/raw/train --resize 64 --out /data/shards/train")
    run("python -m mpitrain slurm render train-gpu --nodes 2 --gpus-per-node 4 --cpus-per-task 8 "
        "--time 06:00:00 --partition gpu --account proj123 --job-name resnet --env-setup 'module "
        "load cuda/12.4 openmpi/4.1 source $HOME/venvs/mpitrain/bin/activate' --launcher srun "
        "--srun-mpi pmix --preempt-seconds 300 --max-restarts 5 --checkpoint-dir "
        "/scratch/$USER/resnet/ckpt -o resnet.sbatch -- --data /scratch/$USER/shards/imagenet "
        "--model mypkg.models:resnet50 --epochs 90 --batch-size 64 --checkpoint-every 500 "
        "--run-dir /scratch/$USER/resnet/run --summary-json /scratch/$USER/resnet/summary.json")
    assert "#SBATCH --array=0-4%4" in (here / "sweep.sbatch").read_text()
    for name in ("job", "sweep", "prep", "resnet"):
        assert "#SBATCH" in (here / f"{name}.sbatch").read_text(), name
    assert "#SBATCH --gpus-per-node=4" in (here / "resnet.sbatch").read_text()
    run("python -m mpitrain slurm render train-cpu --nodes 4 --min-nodes 2 --ntasks-per-node 2 "
        "--on-rank-loss shrink -o job.sbatch -- --epochs 30 --global-batch 96 --min-ranks 4 "
        "--checkpoint-every 200")
    text = (here / "job.sbatch").read_text()
    assert "#SBATCH --no-kill\n" in text and "ON_RANK_LOSS=shrink\n" in text


def test_lightning_slurm_render(here: Path) -> None:
    """docs/lightning.md's own train.py, rendered into a Slurm job with --script."""
    code = re.search(r"```python\n# train\.py\n(.*?)```",
                     (ROOT / "docs" / "lightning.md").read_text(), re.S)
    assert code is not None
    compile(code.group(1), "train.py", "exec")  # the docs' script is Python
    (here / "train.py").write_text(code.group(1))
    run("python -m mpitrain slurm render train-gpu --nodes 2 --gpus-per-node 4 --time 04:00:00 "
        "--env-setup 'source ~/venv/bin/activate' --script train.py -o train.sbatch -- "
        "--max-epochs 30")
    text = (here / "train.sbatch").read_text()
    assert "SCRIPT=train.py\n" in text and "TRAIN_ARGS=(--max-epochs 30)\n" in text
    assert "#SBATCH --gpus-per-node=4\n" in text and "#SBATCH --requeue\n" in text
