"""modelparallel.tracer: trace a PyTorch model into a flat graph module and an IR graph.

:func:`trace` is the entry point (Note [tracer paths] in ``tracing.py``). The module-level path
(torch.fx with leaf modules) lives in :mod:`.fx_path`, the op-level path (torch.export) in
:mod:`.export_path`; both are normalised by :mod:`.normalize`, their materialised causal
attention masks turned back into ``is_causal=True`` by :mod:`.masks`, annotated on fake tensors by
:mod:`.annotate` and turned into IR by :mod:`.to_ir`.

Example:
    >>> import torch
    >>> traced = trace(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> traced.method, len(traced.graph)
    ('fx', 3)
"""

from modelparallel.errors import TracingError
from modelparallel.tracer.annotate import NodeInfo, propagate
from modelparallel.tracer.fx_path import LeafSpec
from modelparallel.tracer.masks import MaskSimplification, simplify_attention_masks
from modelparallel.tracer.normalize import input_device
from modelparallel.tracer.to_ir import ParamTable
from modelparallel.tracer.traced import TracedModel
from modelparallel.tracer.tracing import METHODS, trace

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
