"""The forward's host time of each node, measured in context: inside a whole forward of the
graph's generated code (:func:`forward_host_times`), and each stage's call overhead
(:func:`call_overhead`, Note [call overhead] in :mod:`modelparallel.cost_model.replay`).

Note [in-context forward host time]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The forward's host time of a node measured alone (:class:`_Profiler`: a Python call of the op
on detached leaves, repeated) misses what the host spends around the op when a stage's
generated code runs it: the generated code's own statements (fetching attributes, dropping dead
values), the caching allocator's work on a heap shaped by a whole forward, autograd's
bookkeeping for the graph being built: summed over a host-bound stage, the isolated figures
fall well short of its measured forward (``docs/measurements.md``). So, as for the
backward (Note [in-context backward host time]), the host time is measured where it arises
(:func:`forward_host_times`):

1. *Stamping.* A copy of the graph module gets a call of a recorder (one ``perf_counter`` into a
   list) before every node and before the output (:func:`stamped_module`, an fx rewrite and
   recompile: the code that runs is the generated code, not an Interpreter, whose own cost per
   node would dominate). Node ``k``'s host time is the interval from its stamp to the next,
   less the recorder's own cost (the median interval of a generated function of 200 stamps
   back to back).
2. *Training's forward.* It runs with autograd recording, on the graph's real inputs and
   parameters, one or two warm-up runs, then 3-5 timed runs per node, and in
   :func:`node_times` the nodes of one kind pooled (both with the robust mean of Note [host
   time statistic]).
3. *Free of the device.* On CUDA the forward is queued behind a spin kernel longer than twice
   the host's previous forward (lengthened if short, a warning if the device still ran dry),
   so the host never waits. On the CPU the figures are run times; the profile records 0, as
   for the isolated host forward.

A node without a profile (``getitem``, ``sym_size``, a parameter's ``get_attr``) gives its time
to the first profiled node that reads it, directly or through other unprofiled nodes
(:func:`with_forward_context` with ``users``), else to the next profiled node. The reader is
what decides: an exported graph fetches all parameters at its top (one ``getattr`` chain each),
but each stage's generated code fetches only its own, so charging the next node in order put
the whole model's fetches on stage 0 (by how much: ``docs/measurements.md``). :func:`node_times` uses these
figures by default where the profiles carry them (``forward_host="auto"``), else the isolated
ones; if the stamped run fails, :func:`profile_nodes` warns and the field stays None. Known
limits: a stage's call overhead is outside every node (Note [call overhead] in
:mod:`modelparallel.cost_model.replay` counts it apart, but not the building of a stage's
received leaves); the run needs the memory of one forward with autograd of the whole
graph; a CUDA stream holds about a thousand queued kernels, and a forward or backward that
queues more behind the spin blocks the host until the spin ends, a wait the node then running
gets (the robust mean caps it: Note [host time statistic]).
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from modelparallel.cost_model.measure.backward import _functions, _hooked_backward
from modelparallel.cost_model.measure.clocks import _Spin
from modelparallel.cost_model.measure.nodes import _check_profilable
from modelparallel.cost_model.node_replay import robust_mean
from modelparallel.cost_model.replay import CallOverhead

__all__ = [
    "call_overhead",
    "forward_host_times",
    "stamped_module",
]


_STAMPS: list[float] = []


def _stamp() -> None:
    """The recorder the stamped graph calls before every node (Note [in-context forward host
    time])."""
    _STAMPS.append(time.perf_counter())


def stamped_module(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of ``gm`` whose generated code calls a host timestamp before every node and
    before its output; also the names of the stamped nodes, in order (node ``k`` runs between
    stamps ``k`` and ``k + 1``). It shares ``gm``'s submodules, parameters and buffers and
    takes the graph's flat inputs.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8),
        ...                                                  torch.nn.ReLU()))
        >>> stamped, names = stamped_module(gm)
        >>> x = torch.randn(4, 8)
        >>> names, bool(torch.equal(stamped(x), gm(x)))
        (['_0', '_1'], True)
    """
    graph = copy.deepcopy(gm.graph)
    graph._codegen = torch.fx.graph.CodeGen()  # flat inputs, as the Interpreter takes them
    names: list[str] = []
    for node in list(graph.nodes):
        if node.op == "placeholder":
            continue
        with graph.inserting_before(node):
            graph.call_function(_stamp)
        if node.op != "output":
            names.append(node.name)
    return torch.fx.GraphModule(gm, graph), names


def _stamp_cost(length: int = 200, repeat: int = 7) -> float:
    """Host seconds one stamp adds between two nodes: the median interval of a generated
    function that calls ``length`` stamps back to back."""
    graph = torch.fx.Graph()
    for _ in range(length):
        graph.call_function(_stamp)
    graph.output(None)
    chain = torch.fx.GraphModule(torch.nn.Module(), graph)
    costs = []
    for _ in range(repeat + 1):
        _STAMPS.clear()
        chain()
        costs.append(statistics.median(b - a for a, b in itertools.pairwise(_STAMPS)))
    _STAMPS.clear()
    return statistics.median(costs[1:])


def _stamped_run(stamped: torch.fx.GraphModule, flat_inputs: Sequence[Any], spin: _Spin
                 ) -> tuple[Any, list[float], float, float]:
    """One forward of a stamped module with autograd on, queued behind ``spin``: its output,
    its stamps, and the host's clock at the call and at the return."""
    if spin.device.type == "cuda":
        torch.cuda.synchronize(spin.device)
    _STAMPS.clear()
    spin()
    t0 = time.perf_counter()
    with torch.enable_grad():
        out = stamped(*flat_inputs)
    t1 = time.perf_counter()
    stamps = list(_STAMPS)
    _STAMPS.clear()
    spin.check(t1 - t0)
    return out, stamps, t0, t1


def forward_host_times(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any], *,
                       warmup: int = 1, repeat: int = 3) -> dict[str, float]:
    """Host seconds of each node's forward inside a whole forward of ``gm``'s generated code.

    Runs a copy of ``gm`` with a host timestamp before every node (:func:`stamped_module`),
    with autograd recording as in training (Note [in-context forward host time]): a node's
    time is the interval from its stamp to the next, less the stamp's own cost. On CUDA the
    forward is queued behind a spin kernel, so the figures are the host's work alone; on the
    CPU they are the run time (the host is the device).

    Args:
        gm: A traced graph module, on the device to measure, with real weights.
        flat_inputs: Its inputs for one microbatch.
        warmup: Untimed forwards first (at least one: it sizes the spin).
        repeat: Timed forwards; each node gets their robust mean (Note [host time
            statistic]).

    Returns:
        Node name to seconds, for every node but placeholders and the output.

    Raises:
        ConfigError: for a meta module or bad ``warmup``/``repeat``.

    Example:
        >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8),
        ...                                                  torch.nn.ReLU()))
        >>> sorted(forward_host_times(gm, [torch.randn(4, 8)], repeat=1))
        ['_0', '_1']
    """
    device = _check_profilable(gm, flat_inputs, warmup, repeat)
    stamped, names = stamped_module(gm)
    cost = _stamp_cost()
    spin = _Spin(device)
    runs: list[list[float]] = []
    for i in range(max(1, warmup) + repeat):
        _, stamps, _, _ = _stamped_run(stamped, flat_inputs, spin)
        assert len(stamps) == len(names) + 1, (len(stamps), len(names))
        if i >= max(1, warmup):
            runs.append([max(0.0, b - a - cost) for a, b in itertools.pairwise(stamps)])
    if spin.waited > 1:
        warnings.warn(f"the device ran out of queued work in {spin.waited} of "
                      f"{max(1, warmup) + repeat} in-context forward runs; the host times "
                      "may include waiting for the device", stacklevel=2)
    return {n: robust_mean(r[k] for r in runs) for k, n in enumerate(names)}


def call_overhead(device: torch.device | str, *, warmup: int = 2, repeat: int = 7
                  ) -> CallOverhead:
    """Host seconds a stage pays per microbatch outside its nodes (Note [call overhead] in
    :mod:`modelparallel.cost_model.replay`), measured on a small generated module: from the
    module call to its first op's timestamp and from its last to the return, and from the
    backward call to the first function's pre-hook and from the last function's hook to the
    return; both queued behind a spin kernel on CUDA, as the in-context times are. On the
    CPU, where the host is the device and host times are recorded as 0, it is 0 too.

    Example:
        >>> call_overhead("cpu")
        CallOverhead(forward=0.0, backward=0.0)
    """
    device = torch.device(device)
    if device.type != "cuda":
        return CallOverhead()
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(64, 64),
                                                     torch.nn.ReLU())).to(device)
    stamped, _ = stamped_module(gm)
    x = torch.randn(8, 64, device=device, requires_grad=True)  # a received leaf
    spin = _Spin(device)
    forward: list[float] = []
    backward: list[float] = []
    for i in range(max(1, warmup) + repeat):
        out, stamps, t0, t1 = _stamped_run(stamped, [x], spin)
        spans, b0, b1 = _hooked_backward(_functions([out]), [out], [torch.ones_like(out)],
                                         before=spin)
        spin.check(b1 - b0)
        if i >= max(1, warmup):
            forward.append(stamps[0] - t0 + t1 - stamps[-1])
            backward.append(min(s for s, _, _ in spans) - b0 + b1 - max(e for _, e, _ in spans))
    return CallOverhead(robust_mean(forward), robust_mean(backward))
