"""Setup agreement (Note [setup agreement], modelparallel/runtime/distributed.py): a rank's setup
error reaches the others."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from modelparallel.errors import InfeasiblePlanError, StepTimeoutError
from modelparallel.runtime.distributed import SetupRound


def test_setup_round_raises_other_ranks_errors() -> None:
    store = dist.HashStore()
    r0 = SetupRound(store, "ns", 0, [0, 1], timeout=5)
    r1 = SetupRound(store, "ns", 1, [0, 1], timeout=5)
    r0.publish("plan", "{}")
    assert r1.fetch("plan", 0) == "{}"
    r1.fail(InfeasiblePlanError("needs 9 GiB"))
    with pytest.raises(InfeasiblePlanError, match="rank 1 failed while building"):
        r0.agree()
    lonely = SetupRound(dist.HashStore(), "ns", 0, [0, 1], timeout=0.2)
    with pytest.raises(StepTimeoutError, match=r"ranks \[1\]"):
        lonely.agree()
