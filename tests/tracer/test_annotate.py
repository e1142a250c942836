"""Annotations of the traced graph (modelparallel/tracer/annotate.py): FLOPs and saved bytes checked
by hand, causal attention, random and in-place ops, nodes that cannot be annotated,
annotate=False."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelparallel import models
from modelparallel.ir import OpKind
from modelparallel.tracer import trace


def test_hand_checked_linear_flops_and_saved_bytes() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    x = torch.randn(4, 8)
    g = trace(model, (x,)).graph
    lin = g.node("_0")
    assert lin.flops == 2 * 4 * 8 * 16
    assert lin.backward_flops == 2 * 4 * 8 * 16  # weight gradient only: x needs no grad
    assert lin.saved_bytes == x.numel() * 4  # its input; the weight is a parameter
    relu = g.node("_1")
    assert relu.flops == 0 and relu.saved_bytes == 4 * 16 * 4  # ReLU saves its output
    tm = trace(model, (x.requires_grad_(),))
    assert tm.graph.node("_0").backward_flops == 2 * (2 * 4 * 8 * 16)  # plus the input grad
    assert tm.graph.node(tm.input_names[0]).outputs[0].requires_grad


def test_hand_checked_conv_flops_and_saved_bytes() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    x = torch.randn(2, 3, 10, 10)
    conv = trace(model, (x,)).graph.node("_0")
    assert conv.outputs[0].shape == (2, 8, 10, 10)
    assert conv.flops == 2 * (2 * 8 * 10 * 10) * (3 * 3 * 3)
    assert conv.saved_bytes == x.numel() * 4


def test_attention_flops_counted_on_cpu_kernels() -> None:
    class Attn(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    b, h, s, d = 2, 3, 8, 4
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    node = next(n for n in trace(Attn(), (q, k, v)).graph.nodes if n.flops)
    # QK^T and AV, a multiply-add counts 2, over the causal triangle: s (s + 1) / 2 of the s * s
    # scores (Note [causal attention FLOPs] in annotate.py).
    assert node.flops == 4 * b * h * (s * (s + 1) // 2) * d
    assert node.backward_flops and node.backward_flops > node.flops


def test_real_annotation_fallback_leaves_buffers_untouched() -> None:
    class NormBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x) if bool(x.mean() > -100) else x

    model = nn.Sequential(nn.Linear(4, 4), NormBranch())
    tm = trace(model, (torch.randn(6, 4),), leaf_modules=[NormBranch])
    assert any("for real" in n for n in tm.notes)
    bn = model[1].bn
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert tm.graph.node("_1").saved_bytes is not None


def test_random_ops_are_marked() -> None:
    g = trace(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Dropout(0.0)),
              (torch.randn(2, 4),)).graph
    assert [n.is_random for n in g.nodes] == [False, False, True, False, False]
    case = models.gpt2("tiny", dropout=0.1)
    eg = trace(case.model, case.args).graph
    drop = [n for n in eg.nodes if "dropout" in n.target]
    assert drop and all(n.is_random for n in drop)
    assert not any(n.is_random for n in eg.nodes if "dropout" not in n.target)


def test_inplace_ops_are_annotated_and_failures_become_notes() -> None:
    class Fussy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled():
                raise RuntimeError("cannot run under autograd")
            return x * 2

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), Fussy())
    tm = trace(model, (torch.randn(2, 4),), leaf_modules=[Fussy])
    relu, fussy = tm.graph.node("_1"), tm.graph.node("_2")
    assert relu.saved_bytes is not None and relu.backward_flops is not None
    assert fussy.flops == 0 and fussy.saved_bytes is None and fussy.backward_flops is None
    assert fussy.outputs[0].shape == (2, 4) and fussy.outputs[0].requires_grad
    assert any("'_2'" in n and "could not be annotated" in n for n in tm.notes)


def test_annotate_false_keeps_shapes_only() -> None:
    case = models.skip_mlp()
    g = trace(case.model, case.args, annotate=False).graph
    assert all(n.flops == 0 and n.saved_bytes is None for n in g.nodes
               if n.op is not OpKind.PLACEHOLDER)
    assert g.node("head").outputs[0].shape == (8, 8)
