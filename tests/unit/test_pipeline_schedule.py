"""Pipeline schedules (pure): each action once and in order, no deadlock, the theoretical bubble
and the activation memory each schedule promises; bad lists and bad names are refused."""

from __future__ import annotations

import pytest

from mpitrain.parallel.schedule import (
    SCHEDULES,
    Action,
    Schedule,
    bubble_theory,
    get_schedule,
    gpipe,
    one_f_one_b,
    peak_in_flight,
    simulate,
)

GRID = [(p, m) for p in range(1, 5) for m in range(1, 9)]
NAMES = sorted(SCHEDULES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("stages", "micro"), GRID)
def test_each_action_once_forward_first(name: str, stages: int, micro: int) -> None:
    schedule = get_schedule(name)
    for s in range(stages):
        actions = schedule(s, stages, micro)
        assert sorted(actions) == sorted(
            [Action("F", i) for i in range(micro)] + [Action("B", i) for i in range(micro)]
        ), (name, s, actions)
        for i in range(micro):
            assert actions.index(Action("F", i)) < actions.index(Action("B", i)), (name, s, i)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("stages", "micro"), GRID)
def test_simulated_bubble_is_the_theory(name: str, stages: int, micro: int) -> None:
    makespan, bubble = simulate(get_schedule(name), stages, micro, t_fwd=1.0, t_bwd=2.0)
    assert makespan == pytest.approx((micro + stages - 1) * 3.0, abs=1e-9)
    assert bubble == pytest.approx(bubble_theory(stages, micro), abs=1e-9)


@pytest.mark.parametrize(("stages", "micro"), GRID)
def test_peak_in_flight(stages: int, micro: int) -> None:
    for s in range(stages):
        assert peak_in_flight(one_f_one_b(s, stages, micro)) == min(stages - s, micro), s
        assert peak_in_flight(gpipe(s, stages, micro)) == micro, s


def test_bubble_theory_values() -> None:
    assert bubble_theory(1, 5) == 0.0
    assert bubble_theory(4, 1) == pytest.approx(0.75)
    assert bubble_theory(2, 3) == pytest.approx(0.25)


def _lists(table: dict[int, list[str]]) -> Schedule:
    """A schedule from written-out lists, e.g. {0: ["F0", "B0"]}."""
    def schedule(stage: int, stages: int, micro: int) -> list[Action]:
        return [Action(a[0], int(a[1:])) for a in table[stage]]

    return schedule


DEADLOCKS = {
    # the last stage cannot run a backward before its own forward
    "last stage B before F, one stage": (_lists({0: ["B0", "F0"]}), 1, 1),
    "last stage B before F": (_lists({0: ["F0", "F1", "B0", "B1"],
                                      1: ["F0", "B1", "F1", "B0"]}), 2, 2),
    # stage 0 waits for B0 before sending F1; stage 1 wants F1 before it runs B0
    "no warm-up against gpipe": (_lists({0: ["F0", "B0", "F1", "B1"],
                                         1: ["F0", "F1", "B0", "B1"]}), 2, 2),
    # stage 0 takes the backwards in an order the next stage does not give them
    "backward order against the next stage": (_lists({0: ["F0", "F1", "B1", "F2", "B0", "B2"],
                                                      1: ["F0", "F1", "F2", "B0", "B1", "B2"]}),
                                              2, 3),
    # a middle stage's backward before it has forwarded that micro-batch
    "middle stage B before F": (_lists({0: ["F0", "F1", "B0", "B1"],
                                        1: ["F0", "B1", "F1", "B0"],
                                        2: ["F0", "B0", "F1", "B1"]}), 3, 2),
}


@pytest.mark.parametrize("case", sorted(DEADLOCKS))
def test_deadlock_raises(case: str) -> None:
    schedule, stages, micro = DEADLOCKS[case]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(schedule, stages, micro)


def test_reversed_backward_alone_does_not_deadlock() -> None:
    # sends never block: stage 0 only waits for B1 (done at 7), nothing waits on stage 0
    schedule = _lists({0: ["F0", "F1", "B1", "B0"], 1: ["F0", "F1", "B0", "B1"]})
    makespan, _ = simulate(schedule, 2, 2)
    assert makespan == pytest.approx(11.0)  # B1 7..9, B0 9..11 (GPipe's order: 10)


def test_unknown_schedule_lists_the_known() -> None:
    with pytest.raises(ValueError) as info:
        get_schedule("x")
    msg = str(info.value)
    assert "'x'" in msg
    for name in NAMES:
        assert name in msg, msg
    assert get_schedule("gpipe") is gpipe and get_schedule("1f1b") is one_f_one_b
