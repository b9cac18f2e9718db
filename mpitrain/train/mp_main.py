"""The model-parallel train command: grid, stage, loop, summary (``--model gpt``)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mpitrain.runtime.watchdog import Watchdog
from mpitrain.runtime.world import World
from mpitrain.train.metrics import print_line, write_summary
from mpitrain.train.mp_run import MPTrainer, build_mp_parts

if TYPE_CHECKING:
    import torch

    from mpitrain.config import TrainConfig
    from mpitrain.preempt import PreemptFlag

log = logging.getLogger("mpitrain")


def memory_line(parts_stage: torch.nn.Module) -> str:
    """Parameter bytes of this rank's stage (what splitting the model divides)."""
    n = sum(p.numel() for p in parts_stage.parameters())
    b = sum(p.numel() * p.element_size() for p in parts_stage.parameters())
    return f"{n} parameters ({b / 2**20:.1f} MiB)"


def main_model_parallel(
    cfg: TrainConfig, world: World, device: torch.device, flag: PreemptFlag, t_start: float
) -> int:
    """Collective: train the built-in GPT on the grid ``cfg`` asks for; return the exit code."""
    watchdog = Watchdog.create(world.comm, cfg.hang_timeout, io_timeout=cfg.io_timeout)
    try:
        with watchdog.guard("opening the data and building the model", io=True):
            parts = build_mp_parts(cfg, world, device)
        g = parts.grid
        if world.rank == 0:
            micro = cfg.batch_size // cfg.micro_batches
            print_line(f"mpitrain: gpt {cfg.layers} layers x {cfg.hidden} wide, {cfg.heads} "
                       f"heads, context {cfg.context}; {g.describe()}; {cfg.micro_batches} "
                       f"micro-batches of {micro} ({cfg.pipeline_schedule}); "
                       f"stage 0: {memory_line(parts.stage)}")
        trainer = MPTrainer(cfg, world, parts, watchdog)
        trainer.plan()
        code = trainer.fit(flag)
        g.free()
    finally:
        watchdog.close()
    if code != 0:
        return code
    st = trainer.state
    test = st.test_loss
    summary = {
        "world_size": world.size,
        "grid": {"tensor": g.tensor, "pipeline": g.pipeline, "data": g.data},
        "epochs": st.epoch,
        "steps": st.step,
        "final_loss": st.last_loss,
        "test_loss": test,
        "test_perplexity": math.exp(test) if test is not None else None,
        "tokens_per_sec": st.tokens / st.train_seconds if st.train_seconds else 0.0,
        "wall_seconds": time.perf_counter() - t_start,
        "train_seconds": st.train_seconds,
        "history": st.history,
        "config": cfg.to_dict(),
    }
    if world.rank == 0:
        ppl = "n/a" if test is None else f"{test:.4f} (perplexity {math.exp(test):.2f})"
        print_line(
            f"mpitrain: done: {world.size} ranks (tensor {g.tensor} x pipeline {g.pipeline} x "
            f"data {g.data}), {st.step} steps, final loss {st.last_loss:.4f}, test loss {ppl}, "
            f"{summary['tokens_per_sec']:.0f} tokens/s, {summary['wall_seconds']:.1f} s"
        )
        if cfg.summary_json:
            write_summary(Path(cfg.summary_json), summary)
        if cfg.run_dir:
            write_summary(Path(cfg.run_dir) / "summary.json", summary)
    return 0
