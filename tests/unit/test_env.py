"""The environment table's typed getters name the variable on bad values."""

from __future__ import annotations

import pytest

from mpitrain.errors import ConfigError
from mpitrain.runtime import env


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "٣", " ", "9" * 40, "0x10"])
def test_get_int_refuses_with_the_variable_name(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        env.get_int("ranks_per_node", {"MPITRAIN_RANKS_PER_NODE": value})
    text = str(info.value)
    assert "MPITRAIN_RANKS_PER_NODE" in text and "HINT" in text and "\n" not in text


def test_get_int_reads_plain_integers() -> None:
    assert env.get_int("ranks_per_node", {"MPITRAIN_RANKS_PER_NODE": "4"}) == 4
    with pytest.raises(ConfigError):  # blanks, signs and underscores are not plain digits
        env.get_int("ranks_per_node", {"MPITRAIN_RANKS_PER_NODE": " 4 "})
    assert env.get_int("ranks_per_node", {}) is None


def test_launcher_variables_are_not_training_options() -> None:
    """hydra's -genvall hands the cluster wrapper's MPITRAIN_CLUSTER_PER_NODE (and the other
    variables of ours) to every rank: the trainer must not refuse them as unknown options."""
    from mpitrain.config import resolve

    ours = {"MPITRAIN_CLUSTER_PER_NODE": "2", "MPITRAIN_MPIEXEC": "/run/x/mpiexec",
            "MPITRAIN_RANKS_PER_NODE": "2", "MPITRAIN_CACHE": "/tmp/c"}
    cfg = resolve({}, environ={**ours, "MPITRAIN_EPOCHS": "3"})
    assert cfg.epochs == 3
    import pytest

    from mpitrain.errors import ConfigError

    with pytest.raises(ConfigError, match="MPITRAIN_CLUSTER_PER_NOD"):
        resolve({}, environ={"MPITRAIN_CLUSTER_PER_NOD": "2"})  # a typo is still refused
