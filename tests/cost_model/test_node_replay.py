"""Per-node host and device replay (modelparallel/cost_model/node_replay.py): made-up profiles,
in-context host times folded in, the robust mean, the stage replay."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelparallel.errors import ConfigError


def test_backward_host_replay_on_a_made_up_profile() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, node_times

    # a: big kernels (the host runs ahead); b, c: tiny kernels queued slowly.
    p = {"a": NodeProfile(1.0, 0.1, 2.0, 0.1, "A"), "b": NodeProfile(0.1, 0.5, 0.1, 1.0, "B"),
         "c": NodeProfile(0.1, 0.5, 0.1, 1.0, "B")}
    device_only = node_times(["a", "b", "c"], p)
    assert [round(b, 6) for _, b in device_only.values()] == [2.0, 0.1, 0.1]
    replay = node_times(["a", "b", "c"], p, backward_host=True)
    # Forward: host queues a at 0.1, b at 0.6, c at 1.1; the device finishes a at 1.1, b at
    # 1.2, c at 1.3. Backward in reverse: c queued at 2.1 (device waits 0.8), b at 3.1, a at
    # 3.2 (then 2.0 of kernels).
    assert [round(f, 6) for f, _ in replay.values()] == [1.1, 0.1, 0.1]
    assert [round(b, 6) for _, b in replay.values()] == [2.0, 1.0, 0.9]
    assert sum(sum(v) for v in replay.values()) == pytest.approx(5.2)


def test_context_backward_replay_on_a_made_up_profile() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, node_times

    # a: big kernels; b, c: tiny kernels whose backward the host queues slowly (1.0 in context).
    p = {"a": NodeProfile(1.0, 0.1, 2.0, 5.0, "A", 0.3),
         "b": NodeProfile(0.1, 0.5, 0.1, 5.0, "B", 1.0),
         "c": NodeProfile(0.1, 0.5, 0.1, 5.0, "B", 1.0)}
    ctx = node_times(["a", "b", "c"], p)  # default: the in-context times, since they exist
    assert ctx == node_times(["a", "b", "c"], p, backward_host="context")
    # Forward: the host has queued everything at 1.1; the device finishes a at 1.1, b at 1.2,
    # c at 1.3. Backward, reverse order, the host going on from 1.1: c queued at 2.1 (the
    # device waits), done 2.2 (adds 0.9); b queued 3.1, done 3.2 (+1.0); a queued 3.4, its
    # 2.0 of kernels done at 5.4 (+2.2).
    assert [round(f, 6) for f, _ in ctx.values()] == [1.1, 0.1, 0.1]
    assert [round(b, 6) for _, b in ctx.values()] == [2.2, 1.0, 0.9]
    assert sum(sum(v) for v in ctx.values()) == pytest.approx(5.4)
    device = node_times(["a", "b", "c"], p, backward_host="device")
    assert [round(b, 6) for _, b in device.values()] == [2.0, 0.1, 0.1]
    # with no host cost (the CPU) the replay is the plain sum of device times
    cpu = {k: NodeProfile(v.device_forward, 0.0, v.device_backward, 0.0, v.kind, 0.0)
           for k, v in p.items()}
    assert [b for _, b in node_times(["a", "b", "c"], cpu).values()] == pytest.approx(
        [2.0, 0.1, 0.1])
    with pytest.raises(ConfigError, match="backward_host"):
        node_times(["a"], p, backward_host="sometimes")  # type: ignore[arg-type]


def test_context_times_fold_skipped_nodes_into_their_neighbour() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, with_backward_context

    p = {"a": NodeProfile(1.0, 0.0, 1.0, 0.0), "c": NodeProfile(1.0, 0.0, 1.0, 0.0),
         "d": NodeProfile(1.0, 0.0, 1.0, 0.0)}
    out = with_backward_context(p, ["x", "a", "b", "c", "d"], {"x": 0.25, "a": 1.0, "b": 0.5,
                                                              "c": 2.0})
    # b (not profiled) goes to a, which the engine runs next; x has nothing before it
    assert [out[n].host_backward_context for n in "acd"] == [1.75, 2.0, 0.0]
    assert all(v.host_backward_context == 0.0 for v in
               with_backward_context(p, ["a", "c", "d"], {"a": 1.0}, host_is_device=True)
               .values())


def test_context_forward_replay_on_a_made_up_profile() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, node_times, with_forward_context

    p = {"a": NodeProfile(1.0, 0.1, 0.0, 0.0, "A", None, 0.5),
         "b": NodeProfile(0.1, 0.1, 0.0, 0.0, "B", None, 2.0)}
    # Isolated: a queued at 0.1, done 1.1; b queued 0.2, done 1.2.
    iso = node_times(["a", "b"], p, forward_host="isolated")
    assert [round(f, 6) for f, _ in iso.values()] == [1.1, 0.1]
    # In context (the default where present): a queued at 0.5, done 1.5; b queued 2.5 (the
    # device waits), done 2.6.
    ctx = node_times(["a", "b"], p)
    assert ctx == node_times(["a", "b"], p, forward_host="context")
    assert [round(f, 6) for f, _ in ctx.values()] == [1.5, 1.1]
    with pytest.raises(ConfigError, match="forward_host"):
        node_times(["a"], p, forward_host="sometimes")  # type: ignore[arg-type]
    # skipped nodes (x before a, y after b) go to the profiled node they delay, else the last
    bare = {k: NodeProfile(v.device_forward, 0.1, 0.0, 0.0, v.kind) for k, v in p.items()}
    out = with_forward_context(bare, ["x", "a", "y", "b", "z"],
                               {"x": 0.25, "a": 1.0, "y": 0.5, "b": 2.0, "z": 0.125})
    assert [out[n].host_forward_context for n in "ab"] == [1.25, 2.625]


def test_forward_context_of_a_fetch_goes_to_its_reader() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, with_forward_context

    # An exported graph fetches every parameter at its top; each stage fetches its own, so a
    # fetch's host time belongs to the node that reads it (through unprofiled nodes too).
    p = {n: NodeProfile(1.0, 0.0, 0.0, 0.0) for n in ("a", "b", "c")}
    order = ["w0", "w1", "w2", "t", "a", "b", "c"]
    context = {"w0": 0.5, "w1": 0.25, "w2": 0.125, "t": 0.0625, "a": 1.0, "b": 2.0, "c": 4.0}
    users = {"w0": ["a"], "w1": ["t"], "t": ["c", "b"], "w2": [], "a": ["b"], "b": ["c"]}
    out = with_forward_context(p, order, context, users=users)
    # w1 reaches b and c through t: the earlier, b, gets it; w2 has no reader: next in order
    assert {n: out[n].host_forward_context for n in "abc"} == {
        "a": 1.0 + 0.5 + 0.125, "b": 2.0 + 0.25 + 0.0625, "c": 4.0}
    by_order = with_forward_context(p, order, context)
    assert by_order["a"].host_forward_context == 1.0 + 0.5 + 0.25 + 0.125 + 0.0625
    total = sum(v.host_forward_context or 0.0 for v in out.values())
    assert total == pytest.approx(sum(context.values()))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=1,
                max_size=30),
       st.floats(min_value=1e-3, max_value=1e3))
def test_robust_mean_property(values: list[float], scale: float) -> None:
    import statistics

    from modelparallel.cost_model.node_replay import HOST_OUTLIER_CAP, robust_mean

    r = robust_mean(values)
    assert min(values) - 1e-9 <= r <= statistics.fmean(values) + 1e-9
    assert r <= HOST_OUTLIER_CAP * statistics.median(values) + 1e-9
    if max(values) <= HOST_OUTLIER_CAP * statistics.median(values):
        assert r == pytest.approx(statistics.fmean(values))
    assert robust_mean([v * scale for v in values]) == pytest.approx(r * scale, abs=1e-9)


def test_host_times_of_a_kind_are_pooled_with_the_robust_mean() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, host_replay

    # five nodes of one kind, one stalled once: the stall is capped at 3x the median (1.0),
    # the slow-but-real 2.0 is kept (a median would drop it)
    ctx = [1.0, 2.0, 1.0, 1.0, 100.0]
    p = {f"n{i}": NodeProfile(0.0, 0.0, 0.0, 0.0, "K", None, c) for i, c in enumerate(ctx)}
    replay = host_replay(list(p), p)
    assert list(replay.host_forward.values()) == pytest.approx([(1 + 2 + 1 + 1 + 3) / 5] * 5)


def test_stage_replay_starts_host_and_device_together() -> None:
    from modelparallel.cost_model.node_replay import NodeProfile, node_times, stage_replay

    # a: device-bound; b, c: host-bound (1.0 of queueing, 0.1 of kernels each)
    p = {"a": NodeProfile(3.0, 0.1, 0.0, 0.0, "A"), "b": NodeProfile(0.1, 1.0, 0.0, 0.0, "B"),
         "c": NodeProfile(0.1, 1.0, 0.0, 0.0, "B")}
    order = ["a", "b", "c"]
    whole = node_times(order, p)
    # one timeline: b and c are queued (1.1, 2.1) while a's kernels run to 3.1: hidden
    assert [round(f, 6) for f, _ in whole.values()] == [3.1, 0.1, 0.1]
    # the stage {b, c} alone: the host queues b at 1.0, c at 2.0; done at 2.1
    assert stage_replay(order, p, ["b", "c"]) == (pytest.approx(2.1), 0.0)
    # the whole graph as one stage is node_times' sum
    assert stage_replay(order, p, order)[0] == pytest.approx(sum(f for f, _ in whole.values()))
