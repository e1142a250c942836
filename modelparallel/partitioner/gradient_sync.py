"""What averaging the gradients over data-parallel replicas costs a step.

Note [data-parallel gradient time]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
With ``data_parallel = d > 1`` every stage all-reduces its trainable parameters' gradients over
the ``d`` ranks that hold it, once per step, in buckets of :data:`BUCKET_BYTES` whose
all-reduce starts as soon as the step's *last* microbatch backward has produced them (Note
[data-parallel gradient sync] in ``modelparallel/runtime/data_parallel.py``). The model:

- *One all-reduce.* ``G`` bytes over ``d`` ranks take a ring all-reduce's
  ``2 (d - 1) / d * G / bw + 2 (d - 1) * latency`` per bucket (:func:`allreduce_seconds`), on
  the device's link (``extra["dp_link_bandwidth"]`` / ``extra["dp_link_latency"]`` when the
  replicas talk over another link, e.g. across hosts). Gradients are fp32 (master weights)
  whatever the precision.
- *Per node* (what every method sees, linear in the assignment): node ``i`` carries the
  all-reduce seconds ``a_i`` of the gradients of the parameters it is the first reader of (a
  bucket's latency spread over its bytes). Its bucket overlaps the backward of the layers
  before it, about its own backward ``b_i``, so the step pays ``max(0, a_i - b_i)``; spread
  over the ``m`` microbatches it is added to the node's time per microbatch
  (``Problem.time``, hence every method's stage time ``T_s`` and the objective). The sum of
  these positive parts is at least the positive part of the stage's sum: conservative.
- *Step time*: a stage's time per microbatch grows by its nodes' exposure divided by ``m``,
  so a step (``m`` of the bottleneck's microbatches plus the fill) pays about one exposed
  all-reduce, the same in every method, the bounds and
  :func:`~modelparallel.partitioner.evaluate.step_time`; ``build_problem`` does this
  (``_charge_gradient_sync``) and notes the total in the solver report. :func:`sync_finish`
  is the closed form for one stage whose ``k`` buckets (``A`` seconds in all) become ready
  evenly during its last backward ``B`` (starting at ``t``): ``t + max(B + A / k, B / k + A)``,
  for reports and benchmarks.

Tied parameters replicated on several stages are charged to their first reader's node only
(each holding stage all-reduces them: an under-count of one embedding-sized bucket).

Example:
    >>> from modelparallel.cost_model import get_device_spec
    >>> dev = get_device_spec("h100")
    >>> allreduce_seconds(100e6, 1, dev)
    0.0
    >>> allreduce_seconds(100e6, 4, dev) > allreduce_seconds(100e6, 2, dev) > 0
    True
    >>> sync_finish(start=1.0, backward=0.5, allreduce=0.2, buckets=4)  # hidden but one bucket
    1.55
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["BUCKET_BYTES", "allreduce_seconds", "node_allreduce", "sync_finish"]

BUCKET_BYTES = 25 * 2**20
"""Bucket size of the runtime's gradient sync (DDP's ``bucket_cap_mb=25``; equal to
``modelparallel.runtime.data_parallel.DEFAULT_BUCKET_BYTES``, a test checks it)."""


def _link(device: object) -> tuple[float, float]:
    extra = getattr(device, "extra", {}) or {}
    bw = float(extra.get("dp_link_bandwidth", getattr(device, "link_bandwidth", 0.0)))
    lat = float(extra.get("dp_link_latency", getattr(device, "link_latency", 0.0)))
    return bw, lat


def allreduce_seconds(nbytes: float, replicas: int, device: object, *,
                      bucket_bytes: int = BUCKET_BYTES) -> float:
    """Seconds of a ring all-reduce of ``nbytes`` over ``replicas`` ranks in buckets
    (Note [data-parallel gradient time]); 0 for one replica or no bytes.

    Example:
        >>> from modelparallel.cost_model import get_device_spec
        >>> round(allreduce_seconds(2**30, 2, get_device_spec("h100")), 4) > 0
        True
    """
    if replicas <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = _link(device)
    buckets = math.ceil(nbytes / bucket_bytes)
    return 2 * (replicas - 1) / replicas * nbytes / bw + buckets * 2 * (replicas - 1) * lat


def node_allreduce(grad_bytes: np.ndarray, replicas: int, devices: Sequence[object], *,
                   bucket_bytes: int = BUCKET_BYTES) -> np.ndarray:
    """Per node and stage device, the all-reduce seconds of the gradient bytes the node is the
    first reader of, a bucket's latency spread over its bytes, ``(n, p)``.

    Example:
        >>> from modelparallel.cost_model import get_device_spec
        >>> a = node_allreduce(np.array([0.0, 4e6]), 2, [get_device_spec("h100")])
        >>> a.shape, float(a[0, 0]), bool(a[1, 0] > 0)
        ((2, 1), 0.0, True)
    """
    out = np.zeros((len(grad_bytes), len(devices)))
    if replicas <= 1:
        return out
    for s, d in enumerate(devices):
        bw, lat = _link(d)
        per_byte = 2 * (replicas - 1) / replicas / bw + 2 * (replicas - 1) * lat / bucket_bytes
        out[:, s] = grad_bytes * per_byte
    return out


def sync_finish(start: float, backward: float, allreduce: float, buckets: int) -> float:
    """When a stage's bucketed all-reduce ends, given its last backward's start and length
    (Note [data-parallel gradient time]).

    Example:
        >>> sync_finish(start=0.0, backward=1.0, allreduce=4.0, buckets=4)  # exposed 3.25
        4.25
    """
    if allreduce <= 0:
        return start + backward
    k = max(1, buckets)
    return start + max(backward + allreduce / k, backward / k + allreduce)
