"""Materialised attention masks: causal ones become ``is_causal=True``, all-true ones go away, every
other mask stays (Note [causal masks] in modelparallel/tracer/masks.py)."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelparallel import models
from modelparallel.tracer import TracedModel, trace
from modelparallel.tracer.masks import simplify_attention_masks


def _sdpa_calls(traced: TracedModel) -> list[dict[str, Any]]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    return [{**dict(zip(names, n.args)), **n.kwargs} for n in traced.gm.graph.nodes
            if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]


def _attention_notes(traced: TracedModel) -> list[str]:
    return [n for n in traced.notes if n.startswith("attention:")]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def causal_lm(request: pytest.FixtureRequest) -> tuple[models.ModelCase, TracedModel]:
    case = models.get(f"{request.param}-tiny")
    return case, trace(case.model, case.args, case.kwargs)


def test_causal_lm_masks_become_is_causal(causal_lm: tuple[models.ModelCase, TracedModel]
                                          ) -> None:
    _, traced = causal_lm
    assert traced.method == "export"
    calls = _sdpa_calls(traced)
    assert len(calls) == 2
    assert all(c.get("attn_mask") is None and c.get("is_causal") is True for c in calls)
    assert "attention: 2 materialised causal mask(s) replaced by is_causal=True" in \
        _attention_notes(traced)[0]
    # The mask's subgraph is gone: no op of the graph builds an L x L tensor any more.
    sdpa = [n for n in traced.graph.nodes if "scaled_dot_product_attention" in n.target]
    assert all(len(n.inputs) == 3 for n in sdpa)


@pytest.mark.parametrize("seq_len", [16, 11])
def test_causal_lm_outputs_unchanged(causal_lm: tuple[models.ModelCase, TracedModel],
                                     seq_len: int) -> None:
    case, traced = causal_lm
    assert case.args[0].shape[1] == 16
    ids = torch.randint(0, 256, (3, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = case.model(ids).logits
        got = traced.unflatten_outputs(traced.gm(*traced.flatten_inputs((ids,)))).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_meta_model_gets_the_rewrite() -> None:
    case = models.gpt2("tiny", device="meta")
    traced = trace(case.model, case.args, case.kwargs)
    calls = _sdpa_calls(traced)
    assert calls and all(c.get("is_causal") is True and c.get("attn_mask") is None
                         for c in calls)
    # The cost model sees causal attention (Note [causal attention FLOPs] in annotate.py).
    sdpa = next(n for n in traced.graph.nodes if "scaled_dot_product_attention" in n.target)
    b, s = case.args[0].shape
    h, dh = 4, 16
    assert sdpa.flops == 4 * b * h * (s * (s + 1) // 2) * dh


def test_padding_mask_is_kept() -> None:
    case = models.bert("tiny")
    (ids,), kwargs, _ = case.args, case.kwargs, case.target
    padding = torch.ones_like(kwargs["attention_mask"])
    padding[0, 10:] = 0
    padding[2, 5:] = 0
    traced = trace(case.model, (ids,), {"attention_mask": padding})
    calls = _sdpa_calls(traced)
    assert calls and all(isinstance(c.get("attn_mask"), torch.fx.Node) for c in calls)
    assert not any(c.get("is_causal") for c in calls)
    assert any("kept: not shape-only: it reads the values of input 'attention_mask'" in n
               for n in _attention_notes(traced))
    other = torch.ones_like(padding)
    other[1, 3:] = 0
    for mask in (padding, other):
        with torch.no_grad():
            expected = case.model(ids, attention_mask=mask).logits
            flat = traced.flatten_inputs((ids,), {"attention_mask": mask})
            got = traced.unflatten_outputs(traced.gm(*flat)).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_opt_out_keeps_masks() -> None:
    case = models.gpt2("tiny")
    traced = trace(case.model, case.args, case.kwargs, simplify_masks=False)
    calls = _sdpa_calls(traced)
    assert calls and all(isinstance(c.get("attn_mask"), torch.fx.Node) for c in calls)
    assert not _attention_notes(traced)


# -- hand-written masks (torch.fx graphs) -------------------------------------------------------


class _Masked(nn.Module):
    """Self-attention over ``x`` (batch, heads, L, d) with a mask made by ``kind``."""

    def __init__(self, kind: str, width: int = 0) -> None:
        super().__init__()
        self.kind, self.width = kind, width
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        n = h.size(-2)
        i = torch.arange(n, device=h.device)
        below = i[:, None] >= i[None, :]
        if self.kind == "causal":
            mask = below
        elif self.kind == "band":
            mask = below & (i[:, None] - i[None, :] < self.width)
        elif self.kind == "float":
            mask = h.new_zeros(n, n).masked_fill(~below, float("-inf"))
        elif self.kind == "ones":
            mask = h.new_ones(n, n, dtype=torch.bool)
        elif self.kind == "mutated":
            mask = h.new_ones(n, n, dtype=torch.bool).tril()
            mask.logical_and_(x[0, 0, :, 0] > 0)
        else:
            raise AssertionError(self.kind)
        return F.scaled_dot_product_attention(h, h, h, attn_mask=mask)


def _trace_masked(model: nn.Module, length: int = 8) -> tuple[TracedModel, torch.Tensor]:
    x = torch.randn(2, 3, length, 8, generator=torch.Generator().manual_seed(0))
    traced = trace(model, (x,))
    assert traced.method == "fx"
    for n in (length, length + 5):
        y = torch.randn(2, 3, n, 8)
        with torch.no_grad():
            torch.testing.assert_close(traced.gm(y)[0], model(y), rtol=1e-5, atol=1e-5)
    return traced, x


@pytest.mark.parametrize(("kind", "causal"), [("causal", True), ("float", True),
                                              ("ones", False)])
def test_hand_written_masks_rewritten(kind: str, causal: bool) -> None:
    traced, _ = _trace_masked(_Masked(kind))
    (call,) = _sdpa_calls(traced)
    assert call.get("attn_mask") is None
    assert bool(call.get("is_causal")) is causal
    word = "causal mask(s) replaced" if causal else "all-true mask(s) dropped"
    assert any(word in n for n in _attention_notes(traced))


@pytest.mark.parametrize(("model", "reason"), [
    (_Masked("band", width=3), "neither causal nor all-true"),
    # Causal at the example's 8 tokens, a band at 16: the second length catches it.
    (_Masked("band", width=12), "causal at the example's length but other at twice it"),
    (_Masked("mutated"), "modifies the mask in place"),
])
def test_other_masks_kept(model: nn.Module, reason: str) -> None:
    traced, _ = _trace_masked(model)
    (call,) = _sdpa_calls(traced)
    assert isinstance(call.get("attn_mask"), torch.fx.Node)
    assert not call.get("is_causal")
    assert any(reason in n for n in _attention_notes(traced)), traced.notes


def test_sliding_window_config_disables_the_pass() -> None:
    # A band wider than twice the example looks causal at both lengths checked (a documented
    # limit); a Hugging Face style config that declares the window turns the pass off.
    wide = _Masked("band", width=64)
    traced, _ = _trace_masked(wide)
    assert _sdpa_calls(traced)[0].get("is_causal") is True
    wide.config = types.SimpleNamespace(sliding_window=64)  # type: ignore[assignment]
    traced, _ = _trace_masked(wide)
    (call,) = _sdpa_calls(traced)
    assert isinstance(call.get("attn_mask"), torch.fx.Node)
    assert any("sliding_window=64" in n for n in _attention_notes(traced))


def test_pass_on_a_graph_module_directly() -> None:
    gm = torch.fx.symbolic_trace(_Masked("causal"))
    x = torch.randn(1, 2, 6, 8)
    done = simplify_attention_masks(gm, [x])
    assert (done.causal, done.dropped, done.kept) == (1, 0, {})
    assert done.erased > 0
    again = simplify_attention_masks(gm, [x])
    assert (again.causal, again.erased, again.notes) == (0, 0, [])


def test_wrong_number_of_inputs_is_a_config_error() -> None:
    from modelparallel.errors import ConfigError

    gm = torch.fx.symbolic_trace(_Masked("causal"))
    with pytest.raises(ConfigError, match="one example value per placeholder"):
        simplify_attention_masks(gm, [])
