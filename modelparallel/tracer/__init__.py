"""modelparallel.tracer: trace a PyTorch model into a flat graph module and an IR graph.

:func:`trace` is the entry point (Note [tracer paths] in ``tracing.py``). The module-level path
(torch.fx with leaf modules) lives in :mod:`.fx_path`, the op-level path (torch.export) in
:mod:`.export_path`; both are normalised by :mod:`.normalize`, their materialised causal
attention masks turned back into ``is_causal=True`` by :mod:`.masks`, annotated on fake tensors by
:mod:`.annotate` and turned into IR by :mod:`.to_ir`. Keras models are traced by
:mod:`.tf_capture` (Note [keras capture]), their op FLOPs counted by :mod:`.tf_flops`; the torch
modules load on first use, so ``modelparallel.tracer.tf_capture`` imports without torch.

Example:
    >>> import torch
    >>> from modelparallel.tracer import trace
    >>> traced = trace(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> traced.method, len(traced.graph)
    ('fx', 3)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelparallel.errors import TracingError

if TYPE_CHECKING:
    from modelparallel.tracer.annotate import NodeInfo, propagate
    from modelparallel.tracer.fx_path import LeafSpec
    from modelparallel.tracer.masks import MaskSimplification, simplify_attention_masks
    from modelparallel.tracer.normalize import input_device
    from modelparallel.tracer.to_ir import ParamTable
    from modelparallel.tracer.traced import TracedModel
    from modelparallel.tracer.tracing import METHODS, trace

_LAZY = {
    **dict.fromkeys(("NodeInfo", "propagate"), "annotate"),
    "LeafSpec": "fx_path",
    **dict.fromkeys(("MaskSimplification", "simplify_attention_masks"), "masks"),
    "input_device": "normalize",
    "ParamTable": "to_ir",
    "TracedModel": "traced",
    **dict.fromkeys(("METHODS", "trace"), "tracing"),
}

__all__ = [
    "METHODS",
    "LeafSpec",
    "MaskSimplification",
    "NodeInfo",
    "ParamTable",
    "TracedModel",
    "TracingError",
    "input_device",
    "propagate",
    "simplify_attention_masks",
    "trace",
]


def __getattr__(name: str) -> Any:
    """The torch-backed names, imported on first use."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"modelparallel.tracer.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'modelparallel.tracer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
