"""Slurm support: sbatch templates, a validating renderer, sweeps and in-job checks."""

from __future__ import annotations

from mpitrain.slurm.world import check_slurm_world, slurm_facts

__all__ = ["check_slurm_world", "slurm_facts"]
