"""A Horovod script whose rank 1 dies of an uncaught exception while rank 0 is in allreduce.

Deliberately not run under ``run_mpi``: what is tested is that ``hvd.init()`` itself makes an
uncaught exception end the whole job (printing ``rank 1/N on HOST`` and the traceback)
instead of leaving rank 0 waiting. Run by hand (exits non-zero within seconds):
mpiexec -n 2 python tests/mpi/scenarios/hvd_crash.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import horovod.torch as hvd
import torch

hvd.init()
hvd.barrier()
if hvd.rank() == 1:
    raise RuntimeError("deliberate failure on rank 1 after hvd.init()")
hvd.allreduce(torch.ones(2), name="never completes")
print("UNREACHED: rank 0's allreduce returned", flush=True)
