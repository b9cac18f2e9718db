"""Device binding rules for 1, 2, 4, 8 local ranks and 0/1/2/4 visible devices."""

from __future__ import annotations

import pytest

from mpitrain.errors import ConfigError, DeviceError
from mpitrain.runtime.device import disjoint_bindings, select_device


@pytest.mark.parametrize("local_size", [1, 2, 4, 8])
@pytest.mark.parametrize("visible", [1, 2, 4])
def test_one_rank_per_gpu_or_clear_error(local_size: int, visible: int) -> None:
    if local_size <= visible:
        got = [select_device("cuda", r, local_size, visible, True) for r in range(local_size)]
        assert got == [f"cuda:{r}" for r in range(local_size)]
        assert len(set(got)) == local_size  # no two ranks share a GPU
    else:
        with pytest.raises(
            DeviceError,
            match=rf"{local_size} ranks on this node but only "
            rf"{visible} visible CUDA.*HINT: start at most {visible} rank",
        ):
            select_device("cuda", 0, local_size, visible, True)


@pytest.mark.parametrize("local_size", [1, 2, 4, 8])
@pytest.mark.parametrize("visible", [1, 2, 4])
def test_allow_shared_round_robins(local_size: int, visible: int) -> None:
    got = [
        select_device("auto", r, local_size, visible, True, allow_shared=True)
        for r in range(local_size)
    ]
    assert got == [f"cuda:{r % visible}" for r in range(local_size)]


@pytest.mark.parametrize("local_size", [1, 2, 4, 8])
def test_slurm_per_task_binding_uses_first_visible(local_size: int) -> None:
    # each task sees exactly its own GPU (srun --gpus-per-task=1): always cuda:0, no error
    got = [
        select_device("cuda", r, local_size, 1, True, per_task_binding=True)
        for r in range(local_size)
    ]
    assert got == ["cuda:0"] * local_size


def test_disjoint_bindings_detects_per_task_sets() -> None:
    assert disjoint_bindings([["GPU-a"], ["GPU-b"], ["GPU-c"], ["GPU-d"]])
    assert disjoint_bindings([["GPU-a", "GPU-b"], ["GPU-c", "GPU-d"]])
    assert not disjoint_bindings([["GPU-a"], ["GPU-a"]])  # all see the same one GPU
    assert not disjoint_bindings([["GPU-a", "GPU-b"], ["GPU-b", "GPU-a"]])
    assert not disjoint_bindings([["GPU-a"]])  # one rank: nothing to infer
    assert not disjoint_bindings([[], []])


@pytest.mark.parametrize("local_size", [1, 2, 4, 8])
def test_cpu_and_auto_without_cuda(local_size: int) -> None:
    for r in range(local_size):
        assert select_device("cpu", r, local_size, 4, True) == "cpu"
        assert select_device("auto", r, local_size, 0, False) == "cpu"
        assert select_device("auto", r, local_size, 2, False) == "cpu"


def test_cuda_where_there_is_none_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match=r"torch.cuda.is_available\(\) is False.*HINT:"):
        select_device("cuda", 0, 1, 0, False)
    with pytest.raises(DeviceError, match=r"no CUDA device is visible.*CUDA_VISIBLE_DEVICES"):
        select_device("cuda", 0, 1, 0, True)


def test_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="use cpu, cuda or auto"):
        select_device("gpu", 0, 1, 1, True)
