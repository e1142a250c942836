"""Bad input to the SMP layer: a named error on every rank, within the timeout, no hang."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _dist import run_ranks
from torch import nn

pytestmark = pytest.mark.multiprocess


def _error_job(rank: int, world: int, case: str) -> tuple[str, str]:
    import torch.nn.functional as F

    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown, state

    state.timeout = 4.0 if case == "state_dict_alone" else 8.0
    try:
        if case == "config":
            smp.init({"partitions": 2, "microbatches": 0})
        smp.init({"partitions": 2, "microbatches": 2, "auto_partition": False,
                  "default_partition": 0})
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        smp.set_partition(model[2], 1)
        dm = smp.DistributedModel(model)

        @smp.step
        def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
            loss = F.mse_loss(model(x), y)
            model.backward(loss)
            return loss

        if case == "outside":
            dm(torch.zeros(2, 4))
        if case == "indivisible":
            train_step(dm, torch.zeros(7, 4), torch.zeros(7, 2))
        if case == "structure":  # rank 1 passes its target inside a list: another structure
            y: Any = torch.zeros(4, 2) if rank == 0 else [torch.zeros(2, 2), torch.zeros(2, 2)]
            train_step(dm, torch.zeros(4, 4), y)
        train_step(dm, torch.zeros(4, 4), torch.zeros(4, 2))
        if case == "structure_later":  # the same, once rank 0 shares its arguments unwaited
            y = torch.zeros(4, 2) if rank == 0 else [torch.zeros(2, 2), torch.zeros(2, 2)]
            train_step(dm, torch.zeros(4, 4), y)
        if case == "state_dict_alone":
            if rank == 0:
                dm.state_dict()
            else:
                train_step(dm, torch.zeros(4, 4), torch.zeros(4, 2))
        return ("ok", "")
    except Exception as e:
        return (type(e).__name__, str(e))
    finally:
        shutdown()


@pytest.mark.parametrize(("case", "want"), [
    ("config", ["ConfigError", "microbatches"]),
    ("outside", ["UsageError", "outside an smp.step"]),
    ("indivisible", ["ConfigError", "does not divide into 2 microbatches"]),
    ("structure", ["ConfigError", "different numbers of tensors"]),
    ("structure_later", ["ConfigError", "different numbers of tensors"]),
])
def test_error_on_every_rank(case: str, want: list[str]) -> None:
    results = [r.unwrap() for r in run_ranks(_error_job, 2, case, timeout=60)]
    for kind, message in results:
        assert kind == want[0] and want[1] in message


def test_state_dict_on_one_rank_is_named_not_hung() -> None:
    results = [r.unwrap() for r in run_ranks(_error_job, 2, "state_dict_alone", timeout=90)]
    kind0, msg0 = results[0]
    assert kind0 == "UsageError" and "state_dict() is collective" in msg0 and "[1]" in msg0
    kind1, msg1 = results[1]
    assert kind1 in ("PeerFailedError", "StepTimeoutError"), (kind1, msg1)


def test_features_not_supported_yet_are_named() -> None:
    """Tensor parallelism, smp.nn.Distributed*, the fused optimizers and DDP's comm hooks raise
    a clear UnsupportedFeatureError (or ConfigError for config keys) naming the call."""
    import modelparallel.torch as smp
    from modelparallel.errors import ConfigError, UnsupportedFeatureError
    from modelparallel.torch.state_mod import shutdown

    with pytest.raises(ConfigError, match="tensor_parallel_degree = 2 is not supported"):
        smp.init({"partitions": 1, "tensor_parallel_degree": 2})
    try:
        smp.init({"partitions": 1})
        cases = [(lambda: smp.nn.DistributedLinear(4, 4), "smp.nn.DistributedLinear"),
                 (lambda: smp.nn.DistributedTransformerLMHead(), "DistributedTransformerLMHead"),
                 (lambda: smp.optimizers.FusedLamb([]), "smp.optimizers.FusedLamb"),
                 (lambda: smp.optimizers.FusedLAMB([]), "smp.optimizers.FusedLAMB"),
                 (lambda: smp.optimizers.FusedNovoGrad([]), "FusedNovoGrad"),
                 (lambda: smp.tensor_parallelism().__enter__(), "smp.tensor_parallelism"),
                 (lambda: smp.set_tensor_parallelism(nn.Linear(2, 2)),
                  "smp.set_tensor_parallelism")]
        for make, name in cases:
            with pytest.raises(UnsupportedFeatureError, match=name):
                make()
        dm = smp.DistributedModel(nn.Linear(2, 2))
        with pytest.raises(UnsupportedFeatureError, match="register_comm_hook"):
            dm.register_comm_hook(None, lambda state, bucket: None)
        with dm.join():  # one replica: nothing to join
            pass
    finally:
        shutdown()
