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
