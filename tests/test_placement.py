"""The rank grid against SMP's placement tables (reference §3) and its own invariants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelparallel.errors import ConfigError
from modelparallel.placement import Placement, normalize_strategy


def test_smp_tables_without_tensor_parallelism() -> None:
    spread = Placement(pp=2, dp=4, strategy="spread")
    assert spread.pipelines() == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert spread.dp_groups() == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [spread.coords(r).pp_rank for r in range(8)] == [r // 4 for r in range(8)]
    cluster = Placement(pp=2, dp=4)
    assert cluster.pipelines() == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert cluster.dp_groups() == [(0, 2, 4, 6), (1, 3, 5, 7)]
    assert [cluster.coords(r).pp_rank for r in range(8)] == [r % 2 for r in range(8)]


def test_smp_tables_with_tensor_parallelism() -> None:
    dpt = Placement(pp=2, dp=4, tp=2, strategy="DPT")
    for r in range(8):
        c = dpt.coords(r)
        assert (c.tp_rank, c.pp_rank, c.rdp_rank) == (r % 2, (r // 2) % 2, r // 4)
        assert c.dp_rank == c.tp_rank + 2 * c.rdp_rank
    ptd = Placement(pp=2, dp=4, tp=2, strategy="ptd")
    for r in range(8):
        c = ptd.coords(r)
        assert (c.rdp_rank, c.tp_rank, c.pp_rank) == (r % 2, (r // 2) % 2, r // 4)


def test_bad_values_are_refused() -> None:
    with pytest.raises(ConfigError, match="permutation"):
        normalize_strategy("DDP")
    with pytest.raises(ConfigError, match="multiple"):
        Placement.for_world(6, 4)
    with pytest.raises(ConfigError, match="tensor-parallel"):
        Placement(pp=2, dp=3, tp=2)
    with pytest.raises(ConfigError, match="outside"):
        Placement(pp=2, dp=2).coords(4)


@given(pp=st.integers(1, 4), rdp=st.integers(1, 4), tp=st.integers(1, 3),
       order=st.sampled_from(["cluster", "spread", "DPT", "DTP", "PDT", "PTD", "TDP", "TPD"]))
def test_grid_is_a_bijection_and_groups_partition_the_world(pp: int, rdp: int, tp: int,
                                                            order: str) -> None:
    grid = Placement(pp=pp, dp=rdp * tp, tp=tp, strategy=order)
    world = grid.world
    seen = set()
    for r in range(world):
        c = grid.coords(r)
        assert grid.rank(c.pp_rank, c.rdp_rank, c.tp_rank) == r
        seen.add(c)
        assert r in grid.pipeline_of(r) and r in grid.dp_group_of(r)
        assert grid.pipeline_of(r)[c.pp_rank] == r
        assert grid.dp_group_of(r)[c.dp_rank] == r
        assert grid.tp_group_of(r)[c.tp_rank] == r
        assert grid.rdp_group_of(r)[c.rdp_rank] == r
        assert grid.mp_group_of(r)[grid.mp_rank(r)] == r
    assert len(seen) == world
    for groups in (grid.pipelines(), grid.dp_groups()):
        flat = sorted(x for g in groups for x in g)
        assert flat == list(range(world))
