"""Runtime pieces that need no second process: microbatch splitting (SMP rules), boundary
templates, the failure board and error mapping, setup agreement, one-stage pipelines."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from modelparallel.api import pipeline
from modelparallel.errors import (
    ConfigError,
    InfeasiblePlanError,
    PeerFailedError,
    StepTimeoutError,
)
from modelparallel.runtime.boundary import allocate, pack, slots, unpack
from modelparallel.runtime.distributed import SetupRound
from modelparallel.runtime.failure import FailureBoard, map_comm_error, report_for
from modelparallel.runtime.microbatch import (
    first_microbatch,
    merge_outputs,
    resolve_split,
    shape_key,
    split_inputs,
    split_target,
)

RTOL = 1e-5


class Sliceable:
    """An object that splits itself (SMP's ``smp_slice``)."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def smp_slice(self, num_mb: int, mb: int, axis: int) -> Sliceable:
        n = len(self.items) // num_mb
        return Sliceable(self.items[mb * n:(mb + 1) * n])


# -- microbatches ----------------------------------------------------------------------------------


def test_split_follows_smp_rules() -> None:
    x = torch.arange(24).reshape(4, 6)
    seq_first = torch.arange(12).reshape(3, 4)
    whole = torch.ones(5)
    spec = resolve_split(("x", "seq_first", "whole", "obj", "flag", "scalar"), 2,
                         {"seq_first": 1}, ["whole"])
    mbs = split_inputs([x, seq_first, whole, Sliceable([1, 2, 3, 4]), "abc", torch.tensor(3.0)],
                       spec)
    assert len(mbs) == 2
    assert torch.equal(mbs[1][0], x[2:]) and torch.equal(mbs[0][1], seq_first[:, :2])
    assert mbs[0][2] is whole and mbs[1][2] is whole
    assert mbs[1][3].items == [3, 4]
    assert mbs[0][4] == "abc" and float(mbs[1][5]) == 3.0
    assert mbs[0][0].data_ptr() == x.data_ptr(), "pieces are views, not copies"
    by_index = resolve_split(("a", "b"), 2, {1: 1}, [0])
    assert by_index.axes == {1: 1} and by_index.whole == frozenset({0})


def test_split_errors_name_the_input_and_the_fix() -> None:
    spec = resolve_split(("input_ids",), 4)
    with pytest.raises(ConfigError, match=r"'input_ids' has size 6 along axis 0.*4 microbatches"):
        split_inputs([torch.zeros(6, 3)], spec)
    with pytest.raises(ConfigError, match="cannot be split along axis 2"):
        split_inputs([torch.zeros(4, 3)], resolve_split(("x",), 2, {"x": 2}))
    with pytest.raises(ConfigError, match="model's inputs are"):
        resolve_split(("x",), 2, {"y": 1})
    with pytest.raises(ConfigError, match="out of range"):
        resolve_split(("x",), 2, non_split_inputs=[3])
    with pytest.raises(ConfigError):
        resolve_split(("x",), 2, {"x": -1})
    with pytest.raises(ConfigError):
        resolve_split(("x",), 0)
    with pytest.raises(ConfigError, match="target"):
        split_target({"labels": torch.zeros(5)}, 2)


def test_targets_and_outputs() -> None:
    target = {"labels": torch.arange(4), "weight": 0.5}
    parts = split_target(target, 2)
    assert parts[1]["labels"].tolist() == [2, 3] and parts[1]["weight"] == 0.5
    merged = merge_outputs([{"logits": torch.ones(2, 3), "aux": torch.tensor(1.0), "n": 7},
                            {"logits": torch.zeros(2, 3), "aux": torch.tensor(2.0), "n": 7}])
    assert merged["logits"].shape == (4, 3) and merged["aux"].tolist() == [1.0, 2.0]
    assert merged["n"] == 7
    assert shape_key([torch.zeros(2, 3)], "train") != shape_key([torch.zeros(2, 4)], "train")
    assert shape_key([torch.zeros(2, 3)], "train") != shape_key([torch.zeros(2, 3)], "eval")
    assert shape_key([torch.zeros(2)], "x") == shape_key([torch.ones(2)], "x")


# -- boundary templates ----------------------------------------------------------------------------


def test_boundary_template_round_trip() -> None:
    a = torch.randn(2, 3, requires_grad=True) * 2
    values = (a, [torch.ones(1, dtype=torch.int64), 4], None, torch.Size([2, 3]),
              {"k": torch.zeros(5)})
    template, tensors = pack(values)
    assert [s.shape for s in slots(template)] == [(2, 3), (1,), (5,)]
    assert [s.requires_grad for s in slots(template)] == [True, False, False]
    rebuilt = unpack(template, tensors)
    assert rebuilt[0] is a and rebuilt[1][1] == 4 and rebuilt[2] is None
    assert rebuilt[3] == torch.Size([2, 3]) and rebuilt[4]["k"] is tensors[2]
    buffers = allocate(template, torch.device("cpu"))
    assert [b.dtype for b in buffers] == [torch.float32, torch.int64, torch.float32]
    assert pack(values)[0] == template, "templates compare equal for equal shapes"


# -- failure board and error mapping ---------------------------------------------------------------


def test_failure_board_keeps_the_first_report() -> None:
    store = dist.HashStore()
    board1, board2 = FailureBoard(store, "p", rank=1), FailureBoard(store, "p", rank=2)
    assert board1.first() is None
    board1.post(origin=1, kind="error", message="ValueError: boom")
    board1.post(origin=1, kind="error", message="ignored: posted once")
    board2.post(origin=1, kind="peer", message="ValueError: boom")
    first = board2.first()
    assert first is not None and (first.origin, first.reporter) == (1, 1)
    assert first.describe() == "rank 1 failed: ValueError: boom"


def test_comm_errors_become_named_errors() -> None:
    store = dist.HashStore()
    board = FailureBoard(store, "q", rank=0)
    closed = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
    err = map_comm_error(closed, board, rank=0, peer=1, what="the gradients of microbatch 2",
                         timeout=30)
    assert isinstance(err, PeerFailedError) and err.peer == 1 and "rank 1" in str(err)
    assert report_for(err, 0).kind == "exited"
    timed = RuntimeError("[unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation")
    err2 = map_comm_error(timed, board, rank=0, peer=1, what="activations", timeout=30)
    assert isinstance(err2, StepTimeoutError) and "30 s" in str(err2)
    FailureBoard(store, "q", rank=3).post(origin=3, kind="error", message="KeyError: 'x'")
    err3 = map_comm_error(closed, board, rank=0, peer=1, what="activations", timeout=30)
    assert isinstance(err3, PeerFailedError) and err3.peer == 3 and "KeyError" in str(err3)
    own = report_for(ValueError("bad"), 5)
    assert (own.origin, own.kind) == (5, "error") and "ValueError: bad" in own.message


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


# -- one-stage pipelines (no second process) -------------------------------------------------------


class SeqFirst(nn.Module):
    """Takes (seq, batch, features) and a per-feature scale that is not split."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.lin(x.transpose(0, 1) * scale)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_split_axes_non_split_inputs_and_summed_gradients() -> None:
    torch.manual_seed(0)
    model = SeqFirst()
    ref = copy.deepcopy(model)
    x, scale, y = torch.randn(3, 8, 4), torch.randn(4), torch.randn(8, 3, 2)
    pipe = pipeline(model, (x, scale), loss_fn=nn.functional.mse_loss, microbatches=4,
                    input_split_axes={"x": 1}, non_split_inputs=["scale"], average_grads=False)
    res = pipe.step((x, scale), y)
    ref_loss = nn.functional.mse_loss(ref(x, scale), y)
    ref_loss.backward()
    assert float(res.loss) == pytest.approx(ref_loss.item(), rel=RTOL)
    got, want = _grads(model), _grads(ref)
    for name in want:  # summed over 4 microbatches of a mean loss: 4x the full-batch gradient
        torch.testing.assert_close(got[name], 4 * want[name], rtol=RTOL, atol=1e-6)


def test_eval_step_and_outputs_structure() -> None:
    from modelparallel import models

    case = models.gpt2("tiny", batch_size=4, seq_len=8)
    ref = copy.deepcopy(case.model)
    pipe = pipeline(case.model, case.args, loss_fn=case.loss_fn, microbatches=2)
    out = pipe.eval_step(case.args)
    assert type(out).__name__ == type(ref(*case.args)).__name__
    torch.testing.assert_close(out.logits, ref(*case.args).logits, rtol=RTOL, atol=1e-5)


def test_first_microbatch_cuts_along_the_given_axis() -> None:
    model = torch.nn.Linear(4, 2)
    (x,), _ = first_microbatch(model, (torch.zeros(8, 4),), {}, 4)
    assert tuple(x.shape) == (2, 4)
    (x,), _ = first_microbatch(model, (torch.zeros(4, 8),), {}, 4, axes={0: 1})
    assert tuple(x.shape) == (4, 2)
    with pytest.raises(ConfigError, match="divide"):
        first_microbatch(model, (torch.zeros(6, 4),), {}, 4)
