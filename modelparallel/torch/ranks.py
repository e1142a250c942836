"""Where a rank sits: its (data, pipeline, tensor) coordinates under SMP's placement strategy.

Pure arithmetic (no torch.distributed): :class:`Layout` maps global ranks to coordinates and back,
and lists the groups. SMP's rules (reference §3): ``placement_strategy`` is ``"cluster"``
(≡ ``"DPT"``), ``"spread"`` (≡ ``"TPD"``) or a permutation of ``"DPT"``, read right to left: the
right-most letter's coordinate varies fastest over consecutive global ranks. Then
``mp_rank = pp_rank + pp_size * tp_rank`` and ``dp_rank = tp_rank + tp_size * rdp_rank``.

Example:
    >>> lay = Layout(world=8, pp=2, tp=1, placement="cluster")
    >>> [lay.coords(r).pp for r in range(4)], lay.pp_group(0), lay.dp_group(1)
    ([0, 1, 0, 1], [0, 1], [1, 3, 5, 7])
    >>> Layout(world=8, pp=2, tp=1, placement="spread").pp_group(0)
    [0, 4]
"""

from __future__ import annotations

from dataclasses import dataclass

from modelparallel.errors import ConfigError

__all__ = ["Coords", "Layout"]

_NAMED = {"cluster": "DPT", "spread": "TPD"}


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
    """

    world: int
    pp: int
    tp: int = 1
    placement: str = "cluster"

    def __post_init__(self) -> None:
        if self.pp < 1 or self.tp < 1 or self.world % (self.pp * self.tp):
            raise ConfigError(
                f"{self.world} processes do not divide into partitions = {self.pp} x "
                f"tensor_parallel_degree = {self.tp}; start a multiple of {self.pp * self.tp} "
                "processes")
        order = _NAMED.get(self.placement, self.placement)
        if sorted(order) != ["D", "P", "T"]:
            raise ConfigError(f"placement_strategy = {self.placement!r}; use 'cluster', "
                              "'spread' or a permutation of 'DPT'")
        object.__setattr__(self, "_order", order)

    @property
    def rdp(self) -> int:
        """Reduced data-parallel degree."""
        return self.world // (self.pp * self.tp)

    @property
    def dp(self) -> int:
        """Data-parallel degree (``tp * rdp``)."""
        return self.tp * self.rdp

    def _sizes(self) -> dict[str, int]:
        return {"D": self.rdp, "P": self.pp, "T": self.tp}

    def coords(self, rank: int) -> Coords:
        """The coordinates of global ``rank``."""
        if not 0 <= rank < self.world:
            raise ConfigError(f"rank {rank} is out of range for {self.world} processes")
        sizes, values = self._sizes(), {}
        rest = rank
        for letter in reversed(self._order):  # type: ignore[attr-defined]
            values[letter] = rest % sizes[letter]
            rest //= sizes[letter]
        return Coords(values["D"], values["P"], values["T"])

    def rank_of(self, c: Coords) -> int:
        """The global rank at coordinates ``c``."""
        sizes, values = self._sizes(), {"D": c.rdp, "P": c.pp, "T": c.tp}
        rank = 0
        for letter in self._order:  # type: ignore[attr-defined]
            rank = rank * sizes[letter] + values[letter]
        return rank

    def mp_rank(self, rank: int) -> int:
        """Rank within the model-parallel group (``pp + pp_size * tp``)."""
        c = self.coords(rank)
        return c.pp + self.pp * c.tp

    def dp_rank(self, rank: int) -> int:
        """Rank within the data-parallel group (``tp + tp_size * rdp``)."""
        c = self.coords(rank)
        return c.tp + self.tp * c.rdp

    def pp_group(self, rank: int) -> list[int]:
        """Ranks of ``rank``'s pipeline, by pipeline rank."""
        c = self.coords(rank)
        return [self.rank_of(Coords(c.rdp, p, c.tp)) for p in range(self.pp)]

    def tp_group(self, rank: int) -> list[int]:
        """Ranks splitting the same tensor-parallel modules, by tp rank."""
        c = self.coords(rank)
        return [self.rank_of(Coords(c.rdp, c.pp, t)) for t in range(self.tp)]

    def rdp_group(self, rank: int) -> list[int]:
        """Ranks holding the same pipeline stage and tensor shard, by rdp rank."""
        c = self.coords(rank)
        return [self.rank_of(Coords(d, c.pp, c.tp)) for d in range(self.rdp)]

    def dp_group(self, rank: int) -> list[int]:
        """Ranks holding the same pipeline stage, by dp rank."""
        c = self.coords(rank)
        out = [self.rank_of(Coords(d, c.pp, t)) for d in range(self.rdp) for t in range(self.tp)]
        return sorted(out, key=self.dp_rank)

    def mp_group(self, rank: int) -> list[int]:
        """Ranks holding one full model replica, by mp rank."""
        c = self.coords(rank)
        out = [self.rank_of(Coords(c.rdp, p, t)) for t in range(self.tp) for p in range(self.pp)]
        return sorted(out, key=self.mp_rank)

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
