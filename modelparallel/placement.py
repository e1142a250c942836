"""Where each rank of a hybrid job sits: ``rank -> (data-parallel, pipeline, tensor)`` coordinates.

A job of ``world = pp × tp × rdp`` ranks runs ``dp = tp × rdp`` copies of each pipeline stage
(``tp = 1`` for now, so ``dp = rdp``). :class:`Placement` maps global ranks to coordinates and
back and lists the rank groups of SMP's reference (``../shared/reference/smp-v1-reference.md``
§3): the pipeline group of a rank (one replica's stages, ordered by stage), its data-parallel
group (every rank holding the same stage, ordered by ``dp_rank``), and the tensor-parallel,
reduced-data-parallel and model-parallel groups.

Note [placement order]
~~~~~~~~~~~~~~~~~~~~~~
The placement strategy is a permutation of ``"D"``, ``"P"``, ``"T"`` read right to left: the
right-most letter's coordinate varies fastest over consecutive global ranks (neighbours on one
host). ``"cluster"`` is ``"DPT"`` (a replica's stages on consecutive ranks, the default: pipeline
sends stay on one host) and ``"spread"`` is ``"TPD"`` (a stage's replicas on consecutive ranks:
the gradient all-reduce stays on one host). As in SMP, ``dp_rank = tp_rank + tp·rdp_rank`` and
``mp_rank = pp_rank + pp·tp_rank``. With 8 ranks and 2 stages, ``cluster`` gives pipelines
``[0, 1] [2, 3] [4, 5] [6, 7]`` and ``spread`` gives ``[0, 4] [1, 5] [2, 6] [3, 7]``, SMP's
tables. This module imports no framework; the process groups over these rank lists are created
in :mod:`modelparallel.runtime.data_parallel`.

Example:
    >>> grid = Placement(pp=2, dp=2)
    >>> grid.coords(3)
    RankCoords(pp_rank=1, dp_rank=1, tp_rank=0, rdp_rank=1)
    >>> grid.pipelines()
    [(0, 1), (2, 3)]
    >>> grid.dp_groups()
    [(0, 2), (1, 3)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from modelparallel.errors import ConfigError

__all__ = ["STRATEGIES", "Placement", "RankCoords", "normalize_strategy"]

STRATEGIES = {"cluster": "DPT", "spread": "TPD"}
"""The named placement strategies and the permutation each stands for."""


def normalize_strategy(strategy: str) -> str:
    """The ``"D"/"P"/"T"`` permutation a placement strategy stands for.

    Args:
        strategy: ``"cluster"``, ``"spread"`` or a permutation of ``"DPT"`` (any case).

    Returns:
        The permutation, upper case.

    Raises:
        ConfigError: for anything else.

    Example:
        >>> normalize_strategy("spread"), normalize_strategy("pdt")
        ('TPD', 'PDT')
    """
    s = strategy.strip()
    if s.lower() in STRATEGIES:
        return STRATEGIES[s.lower()]
    if sorted(s.upper()) == ["D", "P", "T"]:
        return s.upper()
    raise ConfigError(f"placement_strategy = {strategy!r}; use 'cluster', 'spread' or a "
                      "permutation of 'D', 'P', 'T' such as 'DPT'")


class RankCoords(NamedTuple):
    """A rank's coordinates (Note [placement order]).

    Attributes:
        pp_rank: Its pipeline stage.
        dp_rank: Its data-parallel rank among the ranks holding the same stage
            (``tp_rank + tp·rdp_rank``).
        tp_rank: Its tensor-parallel rank (0 while ``tp = 1``).
        rdp_rank: Its replica: the reduced data-parallel rank.
    """

    pp_rank: int
    dp_rank: int
    tp_rank: int
    rdp_rank: int


@dataclass(frozen=True)
class Placement:
    """The rank grid of a hybrid job (Note [placement order]).

    Attributes:
        pp: Pipeline stages (partitions).
        dp: Data-parallel degree: ranks per stage (``tp × rdp``).
        tp: Tensor-parallel degree (divides ``dp``).
        strategy: ``"cluster"``, ``"spread"`` or a ``"DPT"`` permutation.

    Example:
        >>> spread = Placement(pp=2, dp=4, strategy="spread")
        >>> spread.pipelines(), spread.pipeline_of(5)
        ([(0, 4), (1, 5), (2, 6), (3, 7)], (1, 5))
    """

    pp: int
    dp: int = 1
    tp: int = 1
    strategy: str = "cluster"

    def __post_init__(self) -> None:
        for name in ("pp", "dp", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} = {value!r} must be an integer >= 1")
        if self.dp % self.tp:
            raise ConfigError(f"the data-parallel degree {self.dp} must be a multiple of the "
                              f"tensor-parallel degree {self.tp} (dp = tp × rdp)")
        normalize_strategy(self.strategy)

    @property
    def world(self) -> int:
        """Ranks in the job: ``pp × dp``."""
        return self.pp * self.dp

    @property
    def rdp(self) -> int:
        """Replicas of the model (reduced data-parallel degree ``dp / tp``)."""
        return self.dp // self.tp

    @property
    def order(self) -> str:
        """The ``"D"/"P"/"T"`` permutation (right-most varies fastest)."""
        return normalize_strategy(self.strategy)

    def _sizes(self) -> dict[str, int]:
        return {"D": self.rdp, "P": self.pp, "T": self.tp}

    def coords(self, rank: int) -> RankCoords:
        """The coordinates of global rank ``rank``.

        Raises:
            ConfigError: if ``rank`` is outside ``[0, world)``.
        """
        if not 0 <= rank < self.world:
            raise ConfigError(f"rank {rank} is outside the job's {self.world} ranks")
        sizes, left, c = self._sizes(), rank, {}
        for letter in reversed(self.order):
            c[letter] = left % sizes[letter]
            left //= sizes[letter]
        return RankCoords(pp_rank=c["P"], dp_rank=c["T"] + self.tp * c["D"], tp_rank=c["T"],
                          rdp_rank=c["D"])

    def rank(self, pp_rank: int, rdp_rank: int = 0, tp_rank: int = 0) -> int:
        """The global rank at these coordinates (inverse of :meth:`coords`)."""
        sizes = self._sizes()
        c = {"P": pp_rank, "D": rdp_rank, "T": tp_rank}
        for letter, value in c.items():
            if not 0 <= value < sizes[letter]:
                raise ConfigError(f"coordinate {letter} = {value} is outside [0, "
                                  f"{sizes[letter]})")
        rank = 0
        for letter in self.order:
            rank = rank * sizes[letter] + c[letter]
        return rank

    def mp_rank(self, rank: int) -> int:
        """SMP's model-parallel rank: ``pp_rank + pp·tp_rank``."""
        c = self.coords(rank)
        return c.pp_rank + self.pp * c.tp_rank

    # -- groups ----------------------------------------------------------------------------------

    def pipelines(self) -> list[tuple[int, ...]]:
        """Every pipeline's ranks in stage order, one per (replica, tensor rank), ordered by
        ``dp_rank`` (the pipeline groups of every rank)."""
        return [tuple(self.rank(s, r, t) for s in range(self.pp))
                for r in range(self.rdp) for t in range(self.tp)]

    def dp_groups(self) -> list[tuple[int, ...]]:
        """For each stage, the ranks holding it, ordered by ``dp_rank``."""
        return [tuple(self.rank(s, r, t) for r in range(self.rdp) for t in range(self.tp))
                for s in range(self.pp)]

    def pipeline_of(self, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s pipeline (SMP's PP group), in stage order."""
        c = self.coords(rank)
        return tuple(self.rank(s, c.rdp_rank, c.tp_rank) for s in range(self.pp))

    def dp_group_of(self, rank: int) -> tuple[int, ...]:
        """The ranks holding ``rank``'s stage (SMP's DP group), ordered by ``dp_rank``."""
        return self.dp_groups()[self.coords(rank).pp_rank]

    def tp_group_of(self, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s tensor-parallel group, ordered by ``tp_rank``."""
        c = self.coords(rank)
        return tuple(self.rank(c.pp_rank, c.rdp_rank, t) for t in range(self.tp))

    def rdp_group_of(self, rank: int) -> tuple[int, ...]:
        """The ranks holding the same stage and tensor shard, ordered by ``rdp_rank``."""
        c = self.coords(rank)
        return tuple(self.rank(c.pp_rank, r, c.tp_rank) for r in range(self.rdp))

    def mp_group_of(self, rank: int) -> tuple[int, ...]:
        """The ranks of ``rank``'s model replica (SMP's MP group), ordered by ``mp_rank``."""
        c = self.coords(rank)
        return tuple(self.rank(s, c.rdp_rank, t) for t in range(self.tp) for s in range(self.pp))

    @classmethod
    def for_world(cls, world: int, pp: int, strategy: str = "cluster", tp: int = 1
                  ) -> Placement:
        """The placement of ``world`` ranks running ``pp``-stage pipelines.

        Raises:
            ConfigError: if ``pp × tp`` does not divide ``world``.

        Example:
            >>> Placement.for_world(6, 3).dp
            2
        """
        if pp < 1 or world % (pp * tp):
            raise ConfigError(
                f"{world} processes cannot run {pp}-stage pipelines (× tensor-parallel {tp}): "
                f"the world size must be a multiple of {pp * tp}; start "
                f"torchrun --nproc_per_node {pp * tp * max(1, world // max(1, pp * tp))}")
        return cls(pp=pp, dp=world // pp, tp=tp, strategy=strategy)
