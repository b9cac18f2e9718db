"""Device binding: one rank per GPU, chosen from the node-local rank.

:func:`select_device` is the pure rule (tested for many layouts on CPU); :func:`bind_device`
gathers the facts (torch, ``CUDA_VISIBLE_DEVICES``, the node's ranks) and applies it on
every rank, failing on all ranks together with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpitrain.errors import ConfigError, DeviceError, with_hint
from mpitrain.runtime import env
from mpitrain.runtime.collective import agree

if TYPE_CHECKING:
    import torch

    from mpitrain.runtime.world import World

DEVICE_MODES = ("cpu", "cuda", "auto")


def select_device(
    mode: str,
    local_rank: int,
    local_size: int,
    visible_count: int,
    cuda_available: bool,
    allow_shared: bool = False,
    *,
    per_task_binding: bool = False,
) -> str:
    """Return the device string (``"cpu"`` or ``"cuda:<i>"``) for one rank.

    Args:
        mode: ``cpu``, ``cuda`` or ``auto`` (cuda when a device is visible, else cpu).
        local_rank: rank on this node; local_size: ranks on this node.
        visible_count: CUDA devices this rank sees (after ``CUDA_VISIBLE_DEVICES``).
        cuda_available: ``torch.cuda.is_available()``.
        allow_shared: allow more ranks than devices on a node (ranks share GPUs round-robin).
        per_task_binding: each rank of the node sees its own, disjoint devices (Slurm's
            ``--gpus-per-task`` / ``--gpu-bind``): the rank takes the first one it sees.

    Raises:
        ConfigError: unknown mode. DeviceError: ``cuda`` without a device, or more ranks
        per node than devices without ``allow_shared``.
    """
    if mode not in DEVICE_MODES:
        raise ConfigError(with_hint(f"--device {mode!r} is unknown", "use cpu, cuda or auto"))
    if mode == "cpu":
        return "cpu"
    has_cuda = cuda_available and visible_count > 0
    if not has_cuda:
        if mode == "auto":
            return "cpu"
        why = (
            "torch.cuda.is_available() is False"
            if not cuda_available
            else "no CUDA device is visible"
        )
        raise DeviceError(
            with_hint(
                f"local rank {local_rank}: --device cuda was asked for but {why}",
                "install a CUDA build of torch, check CUDA_VISIBLE_DEVICES and the job's GPU "
                "request (e.g. srun --gpus-per-task=1), or use --device cpu / auto",
            )
        )
    if per_task_binding:
        return "cuda:0"
    if local_size > visible_count and not allow_shared:
        raise DeviceError(
            with_hint(
                f"local rank {local_rank}: {local_size} ranks on this node but only "
                f"{visible_count} visible CUDA device(s); one rank per GPU is required",
                f"start at most {visible_count} rank(s) per node (mpiexec -ppn "
                f"{visible_count}, srun --ntasks-per-node={visible_count} or "
                "--gpus-per-task=1), pass allow_shared (ranks then share GPUs), or use "
                "--device cpu",
            )
        )
    return f"cuda:{local_rank % visible_count}"


def disjoint_bindings(visible: Sequence[Sequence[str]]) -> bool:
    """Whether each node-local rank sees its own non-empty, disjoint set of device ids.

    ``visible[r]`` holds the identities (UUIDs) of the devices local rank ``r`` sees. True
    means a scheduler bound devices per task, so every rank should use its first device.
    """
    if len(visible) < 2 or any(len(v) == 0 for v in visible):
        return False
    seen: set[str] = set()
    for ids in visible:
        if seen.intersection(ids):
            return False
        seen.update(ids)
    return True


@dataclass(frozen=True)
class DeviceFacts:
    """What this rank sees: CUDA availability and the identities of its visible devices."""

    cuda_available: bool
    device_ids: tuple[str, ...]
    cuda_visible_devices: str | None

    @classmethod
    def probe(cls) -> DeviceFacts:
        """Read the facts from torch and the environment (no MPI)."""
        import torch

        available = bool(torch.cuda.is_available())
        ids: list[str] = []
        if available:
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                ids.append(str(getattr(props, "uuid", f"{props.name}#{i}")))
        return cls(available, tuple(ids), env.get("cuda_visible_devices"))


def bind_device(
    world: World,
    mode: str,
    *,
    allow_shared: bool = False,
    facts: DeviceFacts | None = None,
    set_current: bool = True,
) -> torch.device:
    """Collective: choose this rank's device, make it current and return it.

    Every rank raises the same DeviceError when any rank cannot be bound. ``facts`` replaces
    what torch reports (tests); ``set_current=False`` skips ``torch.cuda.set_device``.
    """
    import torch

    mine = facts if facts is not None else DeviceFacts.probe()
    visible = world.node_comm.allgather(list(mine.device_ids))
    per_task = disjoint_bindings(visible)

    def choose() -> str:
        return select_device(
            mode,
            world.local_rank,
            world.local_size,
            len(mine.device_ids),
            mine.cuda_available,
            allow_shared,
            per_task_binding=per_task,
        )

    name = agree(world.comm, choose)
    device = torch.device(name)
    kinds = world.comm.allgather(device.type)
    if len(set(kinds)) > 1:
        # later collectives (the CUDA-aware decision, staging) would be reached by some only
        cpu = [r for r, k in enumerate(kinds) if k == "cpu"]
        raise DeviceError(
            with_hint(
                f"--device {mode}: ranks {cpu} got the CPU, the others a GPU "
                f"({len(cpu)} of {len(kinds)} ranks see no CUDA device)",
                "give every node a GPU (check CUDA_VISIBLE_DEVICES and the job's GPU request) "
                "or use --device cpu",
            )
        )
    if device.type == "cuda" and set_current:
        torch.cuda.set_device(device)
    return device


def describe_binding(world: World, device: torch.device, facts: DeviceFacts) -> str:
    """One log line: which rank uses which device and why."""
    cvd = facts.cuda_visible_devices
    return (
        f"rank {world.rank} (local {world.local_rank}/{world.local_size}) -> {device}; "
        f"visible devices {len(facts.device_ids)}"
        + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else "")
    )
