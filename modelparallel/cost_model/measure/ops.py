"""Measuring an op table (``partition-plan calibrate --ops``): every op family of the analytic
cost model timed on synthetic tensors, forward and backward, device and host (Note [op table] in
``modelparallel/cost_model/op_table.py``; how nodes read it: Note [analytic cost model] in
``analytic.py``).

Note [op calibration]
~~~~~~~~~~~~~~~~~~~~~
Each family is called as a training step calls it: the aten op the generated stage code calls
(``torch.ops.aten.layer_norm.default``...), on inputs that require a gradient, so that autograd
records it. Device and host seconds come from the profiling clock (Note [profiling isolated
nodes] in :mod:`.isolated`: CUDA events around calls queued behind a spin kernel, so the device
figure is the kernels back to back and the host figure the queueing alone; on the CPU the wall
clock and 0). The backward is ``torch.autograd.grad`` of the output (retained graph) for every
input and parameter, plus the addition of each parameter's gradient into a ``.grad`` buffer as
from the second microbatch on; its host time per node is the difference between a chain of
``L`` such ops and one, over ``L - 1`` (what the engine adds per node in a real backward;
families whose output cannot feed their input (convolution, attention, pooling, ...) take one
call less the engine's fixed cost, measured on a chain of negations, which over-counts: Note
[analytic cost model] in ``analytic.py`` says by how much). Host times are the least of two
measurements (the first call of a run can pay CUDA's and cuBLAS's initialisation). Compute-bound families are timed on a grid of shapes (Note
[op table]), bandwidth-bound ones at six sizes from 8 KiB to 128 MiB (``quick``: fewer and
smaller, for tests and the CPU). The grids cover the shapes of common transformer and
convolutional layers; a node outside them takes the edge's efficiency.

Example:
    >>> table = calibrate_ops("cpu", quick=True, families=["relu", "matmul"])
    >>> sorted(table.ops)
    ['matmul:float32', 'relu', 'scalar', 'view']
    >>> table.ops["relu"].forward(1e4) > 0
    True
"""

from __future__ import annotations

import datetime
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from modelparallel.cost_model.analytic import bandwidth_families
from modelparallel.cost_model.measure.clocks import _clock
from modelparallel.cost_model.measure.forward import call_overhead
from modelparallel.cost_model.op_table import Curve, Grid, OpEntry, OpTable
from modelparallel.errors import ConfigError

__all__ = ["calibrate_ops", "compute_families"]

aten = torch.ops.aten
_CHAIN = 8


@dataclass
class _Call:
    """One synthetic op: ``run()`` its forward; ``leaves`` the inputs and ``params`` the
    parameters that get gradients; ``size`` its feature (bytes of its largest tensor)."""

    run: Callable[[], Any]
    leaves: list[torch.Tensor]
    params: list[torch.Tensor]
    size: float = 0.0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _leaf(shape: Sequence[int], dev: torch.device, dtype: torch.dtype,
          grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, device=dev, dtype=dtype).requires_grad_(grad)


def _rows(n: int) -> tuple[int, int]:
    width = 1024 if n >= 1024 * 4 else 64
    return max(1, n // width), width


def _nchw(n: int) -> tuple[int, int, int, int]:
    """An NCHW shape of about ``n`` elements, from few channels at a large image to many at
    a small one (ResNet's layers)."""
    for c, s in ((2048, 7), (1024, 14), (512, 28), (256, 56), (128, 112), (64, 112)):
        b = n // (c * s * s)
        if b >= 1:
            return min(b, 256), c, s, s
    side = max(2, int(math.sqrt(n / 64)))
    return 1, 64, side, max(1, n // (64 * side))


def _bandwidth_call(family: str, n: int, dev: torch.device, dtype: torch.dtype) -> _Call:
    """The synthetic call of a bandwidth-bound family at about ``n`` elements."""
    r, w = _rows(n)
    x = _leaf((r, w), dev, dtype)
    unary: dict[str, Callable[[torch.Tensor], Any]] = {
        "relu": aten.relu.default, "gelu": aten.gelu.default, "silu": aten.silu.default,
        "tanh": aten.tanh.default, "sigmoid": aten.sigmoid.default, "neg": aten.neg.default,
        "rsqrt": aten.rsqrt.default, "exp": aten.exp.default,
        "pow": lambda t: aten.pow.Tensor_Scalar(t, 2),
        "copy": aten.clone.default,
        "softmax": lambda t: aten._softmax.default(t, -1, False),
        "mean": lambda t: aten.mean.dim(t, [-1], True),
        "to": lambda t: aten._to_copy.default(t, dtype=torch.float32),
        "dropout": lambda t: aten.native_dropout.default(t, 0.1, True)[0],
        "slice": lambda t: aten.slice.Tensor(t, 1, 0, w // 2),
        "split": lambda t: aten.split.Tensor(t, max(1, w // 4), 1),
    }
    if family in unary:
        fn = unary[family]
        size = _nbytes(x) * (2 if family == "to" and dtype != torch.float32 else 1)
        return _Call(lambda: fn(x), [x], [], size)
    if family in ("add", "mul"):
        y = _leaf((r, w), dev, dtype)
        op = aten.add.Tensor if family == "add" else aten.mul.Tensor
        return _Call(lambda: op(x, y), [x, y], [], _nbytes(x))
    if family == "cat":
        a, b = _leaf((r, w // 2), dev, dtype), _leaf((r, w // 2), dev, dtype)
        return _Call(lambda: aten.cat.default([a, b], -1), [a, b], [], _nbytes(a) * 2)
    if family == "expand":
        e = _leaf((max(1, r // 8), 1, w), dev, dtype)
        return _Call(lambda: aten.expand.default(e, [max(1, r // 8), 8, w]), [e], [],
                     _nbytes(e) * 8)
    if family == "layer_norm":
        g, b = _leaf((w,), dev, dtype), _leaf((w,), dev, dtype)
        return _Call(lambda: aten.layer_norm.default(x, [w], g, b, 1e-5, True), [x], [g, b],
                     _nbytes(x))
    if family == "embedding":
        weight = _leaf((32768, w), dev, dtype)
        idx = torch.randint(0, 32768, (r,), device=dev)
        return _Call(lambda: aten.embedding.default(weight, idx), [], [weight],
                     r * w * weight.element_size())
    shape = _nchw(n)
    img = _leaf(shape, dev, dtype)
    c = shape[1]
    if family == "batch_norm":
        g, b = _leaf((c,), dev, dtype), _leaf((c,), dev, dtype)
        mean, var = torch.zeros(c, device=dev, dtype=dtype), torch.ones(c, device=dev, dtype=dtype)
        return _Call(lambda: F.batch_norm(img, mean, var, g, b, training=True), [img], [g, b],
                     _nbytes(img))
    if family == "group_norm":
        g, b = _leaf((c,), dev, dtype), _leaf((c,), dev, dtype)
        return _Call(lambda: aten.group_norm.default(img, 32, g, b, 1e-5, True), [img],
                     [g, b], _nbytes(img))
    if family == "max_pool":
        return _Call(lambda: F.max_pool2d(img, 3, 2, 1), [img], [], _nbytes(img))
    if family == "avg_pool":
        return _Call(lambda: aten.adaptive_avg_pool2d.default(img, [1, 1]), [img], [],
                     _nbytes(img))
    raise ConfigError(f"no calibration for op family {family!r}")


def _align8(x: int) -> int:
    return max(8, int(x) // 8 * 8)


def _compute_call(family: str, dims: tuple[int, int, int], dev: torch.device,
                  dtype: torch.dtype) -> tuple[_Call, float]:
    """The synthetic call of a compute-bound family at grid point ``dims``, and its work."""
    a, b, c = dims
    if family.startswith("matmul"):
        m, n, k = a, b, c
        x, w, bias = _leaf((m, k), dev, dtype), _leaf((n, k), dev, dtype), _leaf((n,), dev, dtype)
        return _Call(lambda: aten.linear.default(x, w, bias), [x], [w, bias]), float(m) * n * k
    if family.startswith("conv"):
        m, n, k = a, b, c
        ksize = {"conv_k1": 1, "conv_k3": 3, "conv_k7": 7}[family]
        stride = 2 if ksize == 7 else 1
        cin = max(1, k // (ksize * ksize))
        side = max(1, round(math.sqrt(m / 32)))
        batch = max(1, m // (side * side))
        x = _leaf((batch, cin, side * stride, side * stride), dev, dtype,
                  grad=ksize != 7)  # the stem's input needs no gradient
        w = _leaf((n, cin, ksize, ksize), dev, dtype)
        pad = ksize // 2
        call = _Call(lambda: aten.convolution.default(x, w, None, [stride] * 2, [pad] * 2,
                                                      [1, 1], False, [0, 0], 1),
                     [x] if ksize != 7 else [], [w])
        return call, float(batch * side * side) * n * cin * ksize * ksize
    bh, s, d = a, b, c
    heads = 16 if bh % 16 == 0 else 1
    shape = (bh // heads, heads, s, d)
    q, kk, v = (_leaf(shape, dev, dtype) for _ in range(3))
    if family.startswith("attention_mask"):
        mask = torch.zeros(bh // heads, 1, s, s, device=dev, dtype=dtype)
        run: Callable[[], Any] = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q, kk, v, attn_mask=mask)
    else:
        causal = family.startswith("attention_causal")
        run = lambda: F.scaled_dot_product_attention(q, kk, v, is_causal=causal)  # noqa: E731
    return _Call(run, [q, kk, v], []), float(bh) * s * s * d


def _grid_axes(family: str, quick: bool, cpu: bool) -> tuple[tuple[int, ...], ...]:
    if quick or cpu:
        small = {"matmul": ((64, 256), (64, 256), (64, 256)),
                 "matmul_unaligned": ((64,), (63, 255), (64,)),
                 "matmul_even": ((64,), (62, 254), (64,)),
                 "conv_k1": ((256, 1024), (16, 64), (16, 64)),
                 "conv_k3": ((256,), (16,), (144,)),
                 "conv_k7": ((256,), (16,), (147,))}
        return small.get(family, ((2, 4), (16, 32), (8,)))
    full = {"matmul": ((256, 1024, 4096, 16384),) * 3,
            "matmul_unaligned": ((1024, 8192), (1023, 8191, 32767, 65535), (1024, 4096)),
            "matmul_even": ((1024, 8192), (1022, 8190, 32766, 65534), (1024, 4096)),
            "conv_k1": ((1568, 6272, 25088, 100352), (64, 256, 1024), (64, 256, 1024)),
            "conv_k3": ((1568, 6272, 25088, 100352), (64, 256, 512), (576, 2304, 4608)),
            "conv_k7": ((25088, 100352, 401408), (64,), (147,))}
    return full.get(family, ((32, 128, 512), (256, 1024, 4096), (64, 128)))


def compute_families() -> tuple[str, ...]:
    """The compute-bound families an op table may hold, per dtype (Note [analytic cost
    model]).

    Example:
        >>> "attention_causal" in compute_families()
        True
    """
    return ("matmul", "matmul_even", "matmul_unaligned", "conv_k1", "conv_k3", "conv_k7", "attention",
            "attention_causal", "attention_mask")


class _Timer:
    """Device and host seconds of one synthetic call's forward and backward (Note [op
    calibration])."""

    def __init__(self, dev: torch.device, repeat: int) -> None:
        self.dev, self.repeat = dev, repeat
        self.clock = _clock(dev)

    def forward(self, call: _Call) -> tuple[float, float]:
        call.run()
        return self.clock(call.run, self.repeat)

    def backward(self, call: _Call) -> tuple[float, float] | None:
        out = call.run()
        outs = [t for t in (out if isinstance(out, list | tuple) else [out])
                if isinstance(t, torch.Tensor) and t.requires_grad]
        wrt = [*call.leaves, *call.params]
        if not outs or not wrt:
            return None
        grads = [torch.randn_like(t) for t in outs]
        acc = [torch.zeros_like(p) for p in call.params]
        n = len(call.leaves)

        def step() -> None:
            got = torch.autograd.grad(outs, wrt, grads, retain_graph=True, allow_unused=True)
            for a, g in zip(acc, got[n:]):
                if g is not None:
                    a.add_(g)
        step()
        return self.clock(step, self.repeat)

    def chain_host(self, op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   length: int) -> float:
        """Host seconds of the backward of ``length`` chained calls of ``op`` (parameters'
        gradients accumulated into ``.grad``, as in training)."""
        y = x
        for _ in range(length):
            y = op(y)
        g = torch.ones_like(y)

        def step() -> None:
            torch.autograd.backward([y], [g], retain_graph=True)
        step()
        return self.clock(step, self.repeat)[1]


def _chain_op(family: str, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A shape-keeping call of ``family`` for the host-time chain, or None."""
    dev, dtype = x.device, x.dtype
    w = x.shape[-1]
    ops: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": aten.relu.default, "gelu": aten.gelu.default, "silu": aten.silu.default,
        "tanh": aten.tanh.default, "sigmoid": aten.sigmoid.default, "neg": aten.neg.default,
        "rsqrt": aten.rsqrt.default, "exp": aten.exp.default, "copy": aten.clone.default,
        "pow": lambda t: aten.pow.Tensor_Scalar(t, 2),
        "softmax": lambda t: aten._softmax.default(t, -1, False),
        "dropout": lambda t: aten.native_dropout.default(t, 0.1, True)[0],
        "view": lambda t: aten.view.default(t, list(t.shape)),
        "to": lambda t: aten._to_copy.default(t, dtype=t.dtype),
    }
    if family in ops:
        return ops[family]
    if family in ("add", "mul"):
        other = _leaf(tuple(x.shape), dev, dtype)
        op = aten.add.Tensor if family == "add" else aten.mul.Tensor
        return lambda t: op(t, other)
    if family == "layer_norm":
        g, b = _leaf((w,), dev, dtype), _leaf((w,), dev, dtype)
        return lambda t: aten.layer_norm.default(t, [w], g, b, 1e-5, True)
    if family in ("batch_norm", "group_norm"):  # (8, 64): 64 channels
        g, b = _leaf((w,), dev, dtype), _leaf((w,), dev, dtype)
        if family == "group_norm":
            return lambda t: aten.group_norm.default(t, 32, g, b, 1e-5, True)
        mean, var = torch.zeros(w, device=dev, dtype=dtype), torch.ones(w, device=dev, dtype=dtype)
        return lambda t: F.batch_norm(t, mean, var, g, b, training=True)
    if family.startswith("matmul"):
        wt, bias = _leaf((w, w), dev, dtype), _leaf((w,), dev, dtype)
        return lambda t: aten.linear.default(t, wt, bias)
    return None


def _host_backward(timer: _Timer, family: str, dev: torch.device, dtype: torch.dtype,
                   single: float | None, fixed: float) -> float:
    x = _leaf((8, 64), dev, dtype)
    op = _chain_op(family, x)
    if op is None:
        return max(0.0, (single or 0.0) - fixed)
    one, many = timer.chain_host(op, x, 1), timer.chain_host(op, x, _CHAIN)
    return max(0.0, (many - one) / (_CHAIN - 1))


def _module_call(timer: _Timer, dev: torch.device, dtype: torch.dtype) -> float:
    """Extra host seconds of calling an ``nn.Module`` rather than its aten op."""
    x = _leaf((4, 8, 8, 8), dev, dtype)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False).to(dev, dtype)
    relu = torch.nn.ReLU()
    pairs = [(lambda: relu(x), lambda: aten.relu.default(x)),
             (lambda: conv(x), lambda: aten.convolution.default(
                 x, conv.weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1))]
    extra = [timer.forward(_Call(m, [], []))[1] - timer.forward(_Call(f, [], []))[1]
             for m, f in pairs]
    return max(0.0, sum(extra) / len(extra))


def calibrate_ops(device: str | torch.device | None = None, *, quick: bool = False,
                  dtypes: Iterable[str] = ("bfloat16", "float32"),
                  families: Iterable[str] | None = None, repeat: int | None = None,
                  console: Any = None) -> OpTable:
    """Measure the op table of ``device`` (default: the current CUDA device, else the CPU;
    Note [op calibration]).

    Args:
        device: A torch device or its name.
        quick: Small grids and sizes (seconds; for tests and the CPU).
        dtypes: Dtypes of the compute-bound families (bandwidth-bound ones are measured in
            the first and read by bytes).
        families: Only these families (default: all of :func:`compute_families` and
            :func:`~modelparallel.cost_model.analytic.bandwidth_families`).
        repeat: Timed calls per measurement (default 5, quick 2).
        console: A ``rich`` console to report progress on.

    Raises:
        ConfigError: if the device is not available or a family is unknown.
    """
    dev = torch.device(device if device is not None else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("calibrate --ops was asked for CUDA but no CUDA device is available; "
                          "run it on the GPU machine or pass --device cpu")
    known = set(compute_families()) | set(bandwidth_families())
    wanted = list(families) if families is not None else [*compute_families(),
                                                          *bandwidth_families()]
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise ConfigError(f"unknown op families {unknown}; known: {sorted(known)}")
    cpu = dev.type == "cpu"
    dtype_names = list(dtypes)
    if cpu:  # CPUs emulate half precision slowly; the CPU table is float32
        dtype_names = ["float32"]
    timer = _Timer(dev, repeat or (2 if quick else 5))

    def say(msg: str) -> None:
        if console is not None:
            console.print(f"[dim]calibrate --ops: {msg}[/dim]")

    ops: dict[str, OpEntry] = {}
    base = getattr(torch, dtype_names[0])
    fixed = 0.0
    if dev.type == "cuda":
        x = _leaf((8, 64), dev, base)
        one, many = timer.chain_host(aten.neg.default, x, 1), timer.chain_host(
            aten.neg.default, x, _CHAIN)
        fixed = max(0.0, one - (many - one) / (_CHAIN - 1))
    for family in [f for f in wanted if f in compute_families()]:
        for name in dtype_names:
            if name != dtype_names[0] and not family.startswith("matmul"):
                continue  # other dtypes: matrix products only (the rest keeps the roofline)
            dtype = getattr(torch, name)
            axes = _grid_axes(family, quick, cpu)
            if name != dtype_names[0] and not (quick or cpu):
                axes = ((256, 1024, 8192),) * 3 if family == "matmul" else (
                    (1024,), (1022, 8190, 32766) if family == "matmul_even" else
                    (1023, 8191, 32767), (1024,))
            if family.startswith("attention") and (cpu or quick):
                axes = ((2, 4), (16, 32), (8,))
            fwd, bwd = [], []
            for a in axes[0]:
                for b in axes[1]:
                    for c in axes[2]:
                        call, work = _compute_call(family, (a, b, c), dev, dtype)
                        fwd.append(timer.forward(call)[0] / work)
                        back = timer.backward(call)
                        bwd.append((back[0] if back else fwd[-1] * 2 * work) / work)
                        del call
            small, _ = _compute_call(family, tuple(ax[0] for ax in axes), dev, dtype)  # type: ignore[arg-type]
            # the least of two: the first call of a run can pay the library's initialisation
            host_f = min(timer.forward(small)[1] for _ in range(2))
            back = timer.backward(small)
            host_b = _host_backward(timer, family, dev, dtype, back[1] if back else None, fixed)
            ops[f"{family}:{name}"] = OpEntry(Grid(axes, tuple(fwd)), Grid(axes, tuple(bwd)),  # type: ignore[arg-type]
                                              host_f, host_b)
            say(f"{family}:{name} {len(fwd)} shapes, host {host_f * 1e6:.1f} us")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    sizes = (2**12, 2**15, 2**18, 2**21, 2**24, 2**26) if not (quick or cpu) else (
        2**10, 2**14)
    for family in [f for f in wanted if f in bandwidth_families()]:
        xs: list[float] = []
        f_times: list[float] = []
        b_times: list[float] = []
        host_f, host_b_single = 0.0, None
        for n in sizes:
            call = _bandwidth_call(family, n, dev, base)
            if xs and call.size <= xs[-1]:
                continue
            dev_f, h_f = timer.forward(call)
            back = timer.backward(call)
            xs.append(call.size)
            f_times.append(max(dev_f, 1e-9))
            b_times.append(max(back[0] if back else 2 * dev_f, 1e-9))
            if len(xs) == 1:
                host_f = min(h_f, timer.forward(call)[1])
                host_b_single = back[1] if back else None
            del call
        host_b = _host_backward(timer, family, dev, base, host_b_single, fixed)
        ops[family] = OpEntry(Curve(tuple(xs), tuple(f_times)), Curve(tuple(xs), tuple(b_times)),
                              host_f, host_b)
        say(f"{family}: {len(xs)} sizes, host {host_f * 1e6:.1f} us")
    host_ops: list[tuple[str, Callable[[torch.Tensor], Any]]] = [
        ("view", lambda t: aten.view.default(t, list(t.shape))),
        ("scalar", lambda t: aten.sym_size.int(t, 0))]
    for family, op in host_ops:
        x = _leaf((8, 64), dev, base)
        h_f = timer.forward(_Call(functools.partial(op, x), [x], []))[1]
        h_b = _host_backward(timer, family, dev, base, None, fixed) if family == "view" else 0.0
        ops[family] = OpEntry(Curve((1.0,), (1e-9,)), None, h_f, h_b)
    overhead = call_overhead(dev)
    product = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return OpTable(
        device=product, ops=ops, module_call=_module_call(timer, dev, base),
        call_forward=overhead.forward, call_backward=overhead.backward,
        metadata={"torch": torch.__version__, "measured": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"), "quick": quick,
            "dtypes": dtype_names, "bandwidth_dtype": dtype_names[0],
            "repeat": timer.repeat, "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
            "derived": False})
