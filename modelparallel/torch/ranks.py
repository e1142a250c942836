"""Where a rank sits, in SMP's terms: a thin view of :class:`modelparallel.placement.Placement`
(Note [placement order] there: SMP's ``cluster``/``spread``/``"DPT"`` strategies) with the rank
lists ``smp.get_*_group()`` return.

Example:
    >>> lay = Layout(world=8, pp=2, tp=1, placement="cluster")
    >>> [lay.coords(r).pp for r in range(4)], lay.pp_group(0), lay.dp_group(1)
    ([0, 1, 0, 1], [0, 1], [1, 3, 5, 7])
    >>> Layout(world=8, pp=2, tp=1, placement="spread").pp_group(0)
    [0, 4]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelparallel.placement import Placement

__all__ = ["Coords", "Layout"]


@dataclass(frozen=True)
class Coords:
    """One rank's coordinates.

    Attributes:
        rdp: Rank among the replicas that hold the same pipeline and tensor shard.
        pp: Pipeline stage.
        tp: Tensor-parallel rank.
    """

    rdp: int
    pp: int
    tp: int


@dataclass(frozen=True)
class Layout:
    """The rank layout of a job.

    Attributes:
        world: Number of processes.
        pp: Pipeline degree (``partitions``).
        tp: Tensor-parallel degree.
        placement: ``placement_strategy``.
        grid: The :class:`~modelparallel.placement.Placement` it reads.
    """

    world: int
    pp: int
    tp: int = 1
    placement: str = "cluster"
    grid: Placement = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", Placement.for_world(self.world, self.pp,
                                                             self.placement, self.tp))

    @property
    def rdp(self) -> int:
        """Reduced data-parallel degree."""
        return self.grid.rdp

    @property
    def dp(self) -> int:
        """Data-parallel degree (``tp * rdp``)."""
        return self.grid.dp

    def coords(self, rank: int) -> Coords:
        """The coordinates of global ``rank``."""
        c = self.grid.coords(rank)
        return Coords(c.rdp_rank, c.pp_rank, c.tp_rank)

    def rank_of(self, c: Coords) -> int:
        """The global rank at coordinates ``c``."""
        return self.grid.rank(c.pp, c.rdp, c.tp)

    def mp_rank(self, rank: int) -> int:
        """Rank within the model-parallel group (``pp + pp_size * tp``)."""
        return self.grid.mp_rank(rank)

    def dp_rank(self, rank: int) -> int:
        """Rank within the data-parallel group (``tp + tp_size * rdp``)."""
        return self.grid.coords(rank).dp_rank

    def pp_group(self, rank: int) -> list[int]:
        """Ranks of ``rank``'s pipeline, by pipeline rank."""
        return list(self.grid.pipeline_of(rank))

    def tp_group(self, rank: int) -> list[int]:
        """Ranks splitting the same tensor-parallel modules, by tp rank."""
        return list(self.grid.tp_group_of(rank))

    def rdp_group(self, rank: int) -> list[int]:
        """Ranks holding the same pipeline stage and tensor shard, by rdp rank."""
        return list(self.grid.rdp_group_of(rank))

    def dp_group(self, rank: int) -> list[int]:
        """Ranks holding the same pipeline stage, by dp rank."""
        return list(self.grid.dp_group_of(rank))

    def mp_group(self, rank: int) -> list[int]:
        """Ranks holding one full model replica, by mp rank."""
        return list(self.grid.mp_group_of(rank))

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of ``kind`` (``"pp"``, ``"dp"``, ``"tp"``, ``"rdp"``, ``"mp"``), each
        once, in order of their smallest rank (the order every rank creates them in)."""
        fn = {"pp": self.pp_group, "dp": self.dp_group, "tp": self.tp_group,
              "rdp": self.rdp_group, "mp": self.mp_group}[kind]
        seen: dict[tuple[int, ...], list[int]] = {}
        for r in range(self.world):
            g = fn(r)
            seen.setdefault(tuple(sorted(g)), g)
        return sorted(seen.values(), key=min)
