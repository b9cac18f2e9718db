"""Pipeline schedules (pure): each action once and in order, no deadlock, the theoretical bubble
and the activation memory each schedule promises; bad lists and bad names are refused. The
interleaved schedule (virtual stages) likewise, over a grid of (stages, micro-batches, chunks)."""

from __future__ import annotations

import pytest

from mpitrain.parallel.schedule import (
    SCHEDULES,
    Action,
    Schedule,
    bubble_theory,
    get_schedule,
    gpipe,
    interleaved,
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


def test_sends_in_order_catch_a_reversed_backward() -> None:
    # the same lists with blocking sends in order (one communication thread): stage 1's
    # B0 is never taken, so its B1 never leaves
    schedule = _lists({0: ["F0", "F1", "B1", "B0"], 1: ["F0", "F1", "B0", "B1"]})
    with pytest.raises(RuntimeError, match=r"deadlock.*in order"):
        simulate(schedule, 2, 2, ordered_sends=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("stages", "micro"), GRID)
def test_sends_in_order_do_not_deadlock(name: str, stages: int, micro: int) -> None:
    simulate(get_schedule(name), stages, micro, ordered_sends=True)


# interleaved: stages 2..5, micro-batches 1..3 times the stages, 1..4 chunks per rank
VGRID = [(p, k * p, v) for p in range(2, 6) for k in range(1, 4) for v in range(1, 5)]


@pytest.mark.parametrize(("stages", "micro", "virtual"), VGRID)
def test_interleaved_each_action_once_in_stream_order(stages: int, micro: int,
                                                      virtual: int) -> None:
    for s in range(stages):
        actions = interleaved(s, stages, micro, virtual)
        assert sorted(actions) == sorted(Action(k, i, c) for k in "FB" for i in range(micro)
                                         for c in range(virtual)), s
        for i in range(micro):
            for c in range(virtual):
                assert actions.index(Action("F", i, c)) < actions.index(Action("B", i, c))
        # each (kind, chunk) is one message stream (one tag): micro-batches in order
        for kind in "FB":
            for c in range(virtual):
                stream = [a.micro for a in actions if a.kind == kind and a.chunk == c]
                assert stream == list(range(micro)), (s, kind, c, stream)


@pytest.mark.parametrize(("stages", "micro", "virtual"), VGRID)
def test_interleaved_deadlock_free_bubble_is_the_theory(stages: int, micro: int,
                                                        virtual: int) -> None:
    schedule = get_schedule("interleaved", virtual)
    theory = bubble_theory(stages, micro, virtual)
    for t_bwd in (1.0, 2.0):
        makespan, bubble = simulate(schedule, stages, micro, 1.0, t_bwd)
        assert bubble == pytest.approx(theory, abs=1e-9), t_bwd
        assert makespan == pytest.approx((micro + (stages - 1) / virtual) * (1 + t_bwd))
    simulate(schedule, stages, micro, ordered_sends=True)  # also with sends on a thread
    _, one = simulate(one_f_one_b, stages, micro)
    assert theory < one if virtual > 1 else theory == pytest.approx(one)


@pytest.mark.parametrize(("stages", "micro", "virtual"), VGRID)
def test_interleaved_peak_in_flight(stages: int, micro: int, virtual: int) -> None:
    total = micro * virtual
    for s in range(stages):
        actions = interleaved(s, stages, micro, virtual)
        warm = stages - s - 1 if virtual == 1 else 2 * (stages - s - 1) + (virtual - 1) * stages
        assert peak_in_flight(actions) == min(warm + 1, total), s
        assert max(peak_in_flight(actions, c) for c in range(virtual)) <= micro


@pytest.mark.parametrize(("stages", "micro"), GRID)
def test_one_virtual_stage_is_1f1b(stages: int, micro: int) -> None:
    for s in range(stages):
        assert get_schedule("interleaved", 1)(s, stages, micro) == one_f_one_b(s, stages, micro)


def test_bubble_theory_virtual() -> None:
    assert bubble_theory(4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_theory(4, 8, 1) == bubble_theory(4, 8)


def test_interleaved_refusals() -> None:
    with pytest.raises(ValueError, match=r"micro-batch count \(6\).*pipeline stages \(4\)"
                                         r".*HINT: use 8 micro-batches"):
        interleaved(0, 4, 6, 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        get_schedule("interleaved", 0)(0, 2, 2)
    for name in NAMES:  # one chunk per rank: no virtual stages
        with pytest.raises(ValueError, match=f"{name} schedule runs one chunk.*HINT"):
            get_schedule(name, 2)
    with pytest.raises(ValueError, match="known: 1f1b, gpipe, interleaved"):
        get_schedule("zigzag")
