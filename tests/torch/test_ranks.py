"""Rank layout arithmetic against the reference's placement tables."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelparallel.errors import ConfigError
from modelparallel.torch.ranks import Layout


def test_cluster_and_spread_tables() -> None:
    cluster = Layout(8, pp=2, placement="cluster")
    assert cluster.groups("mp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert cluster.groups("dp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [cluster.mp_rank(r) for r in range(8)] == [r % 2 for r in range(8)]
    spread = Layout(8, pp=2, placement="spread")
    assert spread.groups("mp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert spread.groups("dp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [spread.mp_rank(r) for r in range(8)] == [r // 4 for r in range(8)]


def test_tensor_parallel_orders() -> None:
    dpt = Layout(8, pp=2, tp=2, placement="DPT")
    assert [(c.tp, c.pp, c.rdp) for c in map(dpt.coords, range(8))] == \
        [(r % 2, (r // 2) % 2, r // 4) for r in range(8)]
    ptd = Layout(8, pp=2, tp=2, placement="PTD")
    assert [(c.rdp, c.tp, c.pp) for c in map(ptd.coords, range(8))] == \
        [(r % 2, (r // 2) % 2, r // 4) for r in range(8)]


def test_world_must_divide() -> None:
    with pytest.raises(ConfigError, match="multiple of 3"):
        Layout(4, pp=3)


@given(st.integers(1, 4), st.integers(1, 2), st.integers(1, 3),
       st.sampled_from(["cluster", "spread", "DPT", "TDP", "PDT"]))
def test_identities(pp: int, tp: int, rdp: int, placement: str) -> None:
    lay = Layout(pp * tp * rdp, pp=pp, tp=tp, placement=placement)
    for r in range(lay.world):
        assert lay.rank_of(lay.coords(r)) == r
        assert r in lay.pp_group(r) and r in lay.dp_group(r) and r in lay.mp_group(r)
        assert len(lay.mp_group(r)) * lay.rdp == lay.world
        assert len(lay.pp_group(r)) * len(lay.dp_group(r)) == lay.world
        assert lay.pp_group(r)[lay.coords(r).pp] == r
        assert lay.dp_group(r)[lay.dp_rank(r)] == r
    assert sum(len(g) for g in lay.groups("pp")) == lay.world
