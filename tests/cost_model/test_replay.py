"""The pure replay arithmetic (modelparallel/cost_model/replay.py): HostReplay and CallOverhead."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelparallel.errors import ConfigError

_seconds = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)


def test_host_replay_refuses_inconsistent_times() -> None:
    from modelparallel.cost_model import HostReplay

    with pytest.raises(ConfigError, match="names a node twice"):
        HostReplay(("a", "a"), {"a": 0.0}, {"a": 0.0}, {}, {})
    with pytest.raises(ConfigError, match="not in order"):
        HostReplay(("a",), {"a": 0.0, "z": 1.0}, {"a": 0.0}, {}, {})
    with pytest.raises(ConfigError, match=">= 0"):
        HostReplay(("a",), {"a": -1.0}, {"a": 0.0}, {}, {})
    with pytest.raises(ConfigError, match="no forward times"):
        HostReplay(("a", "b"), {"a": 0.0}, {"a": 0.0}, {}, {})
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        HostReplay(("a",), {"a": float("nan")}, {"a": 0.0}, {}, {})


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(_seconds, _seconds, _seconds, _seconds), min_size=1,
                      max_size=12),
       cut=st.tuples(st.integers(0, 11), st.integers(1, 12)))
def test_a_stretch_alone_is_never_faster_than_its_share_of_the_whole(
        steps: list[tuple[float, float, float, float]], cut: tuple[int, int]) -> None:
    """Note [stage replay]: slack only hides host time, so a contiguous stretch replayed from
    an empty queue takes at least its share of the whole-graph timeline (the forward; and the
    whole, forward and backward, when the stretch ends the graph)."""
    from modelparallel.cost_model import HostReplay

    names = tuple(f"n{i}" for i in range(len(steps)))
    replay = HostReplay(names, {n: s[0] for n, s in zip(names, steps)},
                        {n: s[1] for n, s in zip(names, steps)},
                        {n: s[2] for n, s in zip(names, steps)},
                        {n: s[3] for n, s in zip(names, steps)})
    lo = min(cut[0], len(names) - 1)
    hi = max(lo + 1, min(cut[1], len(names)))
    stretch = names[lo:hi]
    whole = replay.node_times()
    alone_f, _ = replay.stage_times(stretch)
    assert alone_f >= sum(whole[n][0] for n in stretch) - 1e-9
    tail = names[lo:]
    tail_f, tail_b = replay.stage_times(tail)
    assert tail_f + tail_b >= sum(sum(whole[n]) for n in tail) - 1e-9
    # and the whole graph as one stretch is exactly the sum of its node times
    assert sum(replay.stage_times(names)) == pytest.approx(sum(sum(v) for v in whole.values()))


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(_seconds, _seconds, _seconds, _seconds), min_size=1,
                      max_size=12),
       call=st.tuples(_seconds, _seconds))
def test_a_stage_takes_at_least_its_hosts_work_with_the_call_overhead(
        steps: list[tuple[float, float, float, float]], call: tuple[float, float]) -> None:
    """Note [call overhead]: a stage's time is the larger of its replay and its host's own
    work; the overhead never makes a stage faster, and none changes nothing."""
    from dataclasses import replace

    from modelparallel.cost_model import CallOverhead, HostReplay

    names = tuple(f"n{i}" for i in range(len(steps)))
    bare = HostReplay(names, {n: s[0] for n, s in zip(names, steps)},
                      {n: s[1] for n, s in zip(names, steps)},
                      {n: s[2] for n, s in zip(names, steps)},
                      {n: s[3] for n, s in zip(names, steps)})
    with_call = replace(bare, call=CallOverhead(*call))
    f0, b0 = bare.stage_times(names)
    f1, b1 = with_call.stage_times(names)
    assert f1 >= f0 - 1e-9 and b1 >= b0 - 1e-9
    assert f1 >= sum(s[0] for s in steps) + call[0] - 1e-9
    assert f1 + b1 >= sum(s[0] + s[2] for s in steps) + sum(call) - 1e-9
    assert f1 + b1 <= f0 + b0 + sum(s[0] + s[2] for s in steps) + sum(call) + 1e-9
    assert replace(bare, call=CallOverhead()).stage_times(names) == (f0, b0)


def test_call_overhead_values() -> None:
    from modelparallel.cost_model import CallOverhead
    from modelparallel.cost_model.measure import call_overhead

    with pytest.raises(ConfigError, match=">= 0"):
        CallOverhead(-1e-6, 0.0)
    with pytest.raises(ValueError):
        CallOverhead(0.0, float("nan"))
    assert call_overhead("cpu") == CallOverhead()  # the CPU records host time as 0
