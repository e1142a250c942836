"""Pipeline schedules: structure, validation, text round trip, simulation (pure logic)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelparallel.cost_model import inflight_microbatches
from modelparallel.errors import ConfigError
from modelparallel.schedule import (
    Action,
    Schedule,
    gpipe,
    make_schedule,
    one_f_one_b,
    simulate,
    theoretical_bubble,
)

P = st.integers(min_value=1, max_value=8)
M = st.integers(min_value=1, max_value=16)


def test_action_text_round_trip() -> None:
    a = Action(1, "F", 0)
    assert str(a) == "1F0"
    assert Action.parse("2B3") == Action(2, "B", 3)
    assert Action.parse(str(Action(12, "B", 40))) == Action(12, "B", 40)
    for bad in ("", "1X0", "F0", "1F", "-1F0", "1 F 0 0"):
        with pytest.raises(ConfigError):
            Action.parse(bad)
    with pytest.raises(ConfigError):
        Action(0, "X", 0)


def test_known_schedules_by_hand() -> None:
    assert str(gpipe(2, 2)) == "gpipe p=2 m=2\n0: 0F0 0F1 0B0 0B1\n1: 1F0 1F1 1B0 1B1"
    assert str(one_f_one_b(3, 4)).splitlines()[1:] == [
        "0: 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "1: 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "2: 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ]
    assert make_schedule("simple", 2, 2) == gpipe(2, 2)
    assert make_schedule("interleaved", 3, 4) == one_f_one_b(3, 4)
    with pytest.raises(ConfigError):
        make_schedule("zero-bubble", 2, 2)
    with pytest.raises(ConfigError):
        gpipe(0, 2)


@settings(max_examples=60, deadline=None)
@given(p=P, m=M)
def test_builtin_schedules_are_valid(p: int, m: int) -> None:
    for sched in (gpipe(p, m), one_f_one_b(p, m)):
        sched.validate()
        assert sched.num_stages == p and sched.num_microbatches == m
        for s, lst in enumerate(sched.actions):
            assert len(lst) == 2 * m and all(a.stage == s for a in lst)
            assert {(a.kind, a.microbatch) for a in lst} == {(k, i) for k in "FB" for i in range(m)}
    f1b = one_f_one_b(p, m)
    for s in range(p):
        assert f1b.inflight_peak(s) == min(m, p - s)
        assert gpipe(p, m).inflight_peak(s) == m


@settings(max_examples=60, deadline=None)
@given(p=P, m=M)
def test_text_round_trip(p: int, m: int) -> None:
    for sched in (gpipe(p, m), one_f_one_b(p, m)):
        assert Schedule.parse(str(sched)) == sched
    body = "\n".join(str(one_f_one_b(p, m)).splitlines()[1:])
    parsed = Schedule.parse(body)
    assert parsed.name == "custom" and parsed.actions == one_f_one_b(p, m).actions


@settings(max_examples=40, deadline=None)
@given(p=P, m=M, tf=st.floats(0.1, 5.0), ratio=st.floats(0.5, 3.0))
def test_simulated_bubble_matches_theory_for_equal_stages(p: int, m: int, tf: float,
                                                          ratio: float) -> None:
    for sched in (gpipe(p, m), one_f_one_b(p, m)):
        t = simulate(sched, tf, tf * ratio)
        assert t.makespan == pytest.approx((m + p - 1) * tf * (1 + ratio), rel=1e-9)
        assert t.bubble_fraction == pytest.approx(theoretical_bubble(p, m), abs=1e-9)


def test_simulation_respects_dependencies_and_comm_time() -> None:
    t = simulate(one_f_one_b(3, 4), [1.0, 2.0, 1.0], [2.0, 4.0, 2.0], comm_time=0.5)
    ends = {e.action: e for lst in t.entries for e in lst}
    for lst in t.entries:
        for prev, cur in itertools.pairwise(lst):
            assert cur.start >= prev.end - 1e-12
    for a, e in ends.items():
        if a.kind == "F" and a.stage > 0:
            assert e.start >= ends[Action(a.stage - 1, "F", a.microbatch)].end + 0.5 - 1e-12
        if a.kind == "B" and a.stage < 2:
            assert e.start >= ends[Action(a.stage + 1, "B", a.microbatch)].end + 0.5 - 1e-12
    # the slow middle stage is the bottleneck: it is idle least
    assert t.stage_bubbles[1] == min(t.stage_bubbles)
    with pytest.raises(ConfigError):
        simulate(gpipe(2, 2), [1.0], 1.0)


@settings(max_examples=40, deadline=None)
@given(p=P, m=M, v=st.integers(1, 2), host=st.floats(0.0, 2.0),
       name=st.sampled_from(["gpipe", "1f1b", "zb-h1"]))
def test_host_time_holds_the_rank_not_the_message(p: int, m: int, v: int, host: float,
                                                  name: str) -> None:
    if v > 1 and (name != "1f1b" or p == 1 or m % p):
        v = 1
    sched = make_schedule(name, p, m, v)
    plain = simulate(sched, 1.0, 2.0)
    t = simulate(sched, 1.0, 2.0, host_time=host)
    assert t.busy == pytest.approx(plain.busy)  # host time is not compute
    assert t.makespan >= plain.makespan - 1e-9
    # at most every action pays it on the critical path
    longest = max(len(lane) for lane in t.entries)
    assert t.makespan <= plain.makespan + sum(map(len, t.entries)) * host + 1e-9
    for lane in t.entries:  # a rank's next action starts at least host after the last ended
        for prev, cur in itertools.pairwise(lane):
            assert cur.start >= prev.end + host - 1e-9
    if p == 1:  # one rank: every action but the last pays it, nothing else waits
        assert t.makespan == pytest.approx(plain.makespan + (longest - 1) * host)
    with pytest.raises(ConfigError, match="host_time"):
        simulate(sched, 1.0, 2.0, host_time=-1.0)


def test_validate_rejects_broken_schedules() -> None:
    def sched(text: str, name: str = "custom") -> Schedule:
        s = Schedule.parse(text)
        return Schedule(name, s.num_stages, s.num_microbatches, s.actions)

    with pytest.raises(ConfigError, match="before"):
        sched("0: 0B0 0F0").validate()
    with pytest.raises(ConfigError, match="missing"):
        sched("custom p=1 m=2\n0: 0F0 0B0").validate()
    with pytest.raises(ConfigError, match="repeated"):
        sched("0: 0F0 0F0 0B0").validate()
    with pytest.raises(ConfigError, match="deadlocks"):
        sched("0: 0F0 0B0 0F1 0B1\n1: 1F0 1F1 1B0 1B1").validate()
    with pytest.raises(ConfigError, match="order"):
        sched("0: 0F1 0F0 0B0 0B1\n1: 1F0 1F1 1B0 1B1").validate()
    with pytest.raises(ConfigError, match="in flight"):
        sched(str(gpipe(2, 4)).split("\n", 1)[1], name="1f1b").validate()
    with pytest.raises(ConfigError, match="stage 1"):
        Schedule("x", 2, 1, ((Action(0, "F", 0), Action(0, "B", 0)),
                             (Action(0, "F", 0),))).validate()
    with pytest.raises(ConfigError):
        Schedule.parse("nonsense")
    with pytest.raises(ConfigError, match="twice"):
        Schedule.parse("0: 0F0 0B0\n0: 0F0 0B0")


# -- interleaved 1F1B (virtual stages) and ZB-H1 ---------------------------------------------------

V = st.integers(min_value=2, max_value=4)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 6), v=V, rounds=st.integers(1, 3))
def test_interleaved_is_valid_places_stages_and_meets_theory(p: int, v: int, rounds: int) -> None:
    m = p * rounds
    sched = make_schedule("1f1b", p, m, virtual_stages=v)
    sched.validate()
    assert sched.num_stages == p * v and sched.num_ranks == p and sched.virtual_stages == v
    for r, lst in enumerate(sched.actions):
        assert {a.stage for a in lst} == set(range(r, p * v, p))
        assert len(lst) == 2 * m * v
    assert Schedule.parse(str(sched)) == sched
    t = simulate(sched, 1.0, 2.0)
    assert t.bubble_fraction == pytest.approx(theoretical_bubble(p, m, "1f1b", v), abs=1e-9)
    assert t.bubble_fraction < theoretical_bubble(p, m)


@settings(max_examples=60, deadline=None)
@given(p=st.integers(1, 8), m=M)
def test_zb_h1_is_valid_bounded_and_cuts_the_bubble(p: int, m: int) -> None:
    sched = make_schedule("zb-h1", p, m)
    sched.validate()
    for r, lst in enumerate(sched.actions):
        assert {(a.kind, a.microbatch) for a in lst} == {(k, i) for k in "FIW" for i in range(m)}
        assert sched.rank_inflight_peak(r) <= min(m, p)
    assert Schedule.parse(str(sched)) == sched
    t = simulate(sched, 1.0, 2.0)  # I = W = 1 with the default wgrad fraction
    if m >= p:
        assert t.bubble_fraction == pytest.approx(theoretical_bubble(p, m, "zb-h1"), abs=1e-9)
    assert t.bubble_fraction <= simulate(one_f_one_b(p, m), 1.0, 2.0).bubble_fraction + 1e-9


def test_schedule_names_keep_smp_meanings() -> None:
    from modelparallel.schedule import SMP_SCHEDULES, check_virtual_stages, normalize_schedule

    assert SMP_SCHEDULES == {"simple": "gpipe", "interleaved": "1f1b"}
    assert normalize_schedule("ZB-H1") == "zb-h1"
    assert make_schedule("interleaved", 2, 2).virtual_stages == 1
    with pytest.raises(ConfigError, match="SMP's 'interleaved'"):
        make_schedule("interleaved", 2, 2, virtual_stages=2)
    for name in ("gpipe", "zb-h1"):
        with pytest.raises(ConfigError, match="virtual_stages"):
            check_virtual_stages(name, 2)
    with pytest.raises(ConfigError, match="2 pipeline ranks"):
        make_schedule("1f1b", 1, 2, virtual_stages=2)
    with pytest.raises(ConfigError, match="rounds"):
        make_schedule("1f1b", 2, 5, virtual_stages=2)


def test_validate_checks_links_and_split_backward() -> None:
    good = make_schedule("1f1b", 2, 2, virtual_stages=2)
    # rank 1 receives stage 2's gradients before stage 0's second activations: out of order
    swapped = list(good.actions[1])
    lst = list(good.actions[0])
    lst[1], lst[2] = lst[2], lst[1]  # 0F1 <-> 2F0 on rank 0
    with pytest.raises(ConfigError, match="link rank 0 -> rank 1"):
        Schedule("1f1b", 4, 2, (tuple(lst), tuple(swapped)), 2).validate()
    with pytest.raises(ConfigError, match="before"):
        Schedule.parse("0: 0F0 0W0 0I0").validate()
    with pytest.raises(ConfigError, match="B, or I then W"):
        Schedule.parse("0: 0F0 0I0 0B0").validate()
    with pytest.raises(ConfigError, match="rank 1 of 2"):
        Schedule("x", 4, 1, ((Action(1, "F", 0),), ()), 2)
    t = simulate(make_schedule("zb-h1", 2, 2), 1.0, [2.0, 4.0], wgrad_fraction=[0.5, 0.25])
    took = {e.action: e.end - e.start for lst in t.entries for e in lst}
    assert took[Action(1, "I", 0)] == pytest.approx(3.0) and took[Action(0, "W", 0)] == 1.0


def test_inflight() -> None:
    assert [inflight_microbatches("interleaved", 2, 4, s) for s in range(4)] == [2, 2, 2, 1]
    assert [inflight_microbatches("simple", 3, 4, s) for s in range(4)] == [3, 3, 3, 3]
    with pytest.raises(ConfigError):
        inflight_microbatches("1f1b", 2, 4, 4)
