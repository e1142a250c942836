"""The microbatch bodies of ``smp.step``: each microbatch's call of the step function as a
coroutine (Note [smp step] in ``modelparallel/torch/stepping.py``, 3).

Note [smp step coroutines]
~~~~~~~~~~~~~~~~~~~~~~~~~~
A body must stop at ``model(...)`` and resume later with the model's output, so it needs its
own stack. Two ways, one interface (:class:`_Body`, :func:`start_all`, :func:`resume_all`):

- **greenlets** (when the ``greenlet`` package is importable, the default): every body is a
  greenlet on the driver's thread, and a hand-over is a stack switch of about a microsecond.
  torch keeps grad mode and autocast state per *thread*, which the bodies and the driver now
  share, so each switch saves the side it leaves and restores the side it enters
  (:func:`_tls_get`/:func:`_tls_set`): a body's ``torch.autocast`` or ``torch.no_grad`` never
  leaks into the schedule, nor the schedule's into a body.
- **threads** (``MODELPARALLEL_SMP_BODIES=threads``, :func:`set_backend`, or without
  greenlet): every body runs on a
  worker thread kept between steps (:class:`_Worker`), control passing through queues, so only
  one thread runs at any time; the bodies start and resume as chains (each hands control to the
  next, the driver wakes once). A hand-over costs an OS thread wake-up (tens to hundreds of
  microseconds), which is most of what an SMP step adds to a plain pipeline step on CPU.

Both give the same results (tests/torch/test_model.py trains with each); a body keeps the
backend it started with, so :func:`set_backend` between steps is safe.

Example:
    >>> backend() in ("greenlet", "threads")
    True
    >>> previous = set_backend("threads"); backend()
    'threads'
    >>> _ = set_backend(previous)
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch

from modelparallel.errors import ConfigError, UsageError

__all__ = ["backend", "current_body", "resume_all", "set_backend", "start_all"]

try:  # Note [smp step coroutines]
    import greenlet as _greenlet
except ImportError:  # pragma: no cover - depends on the environment
    _greenlet = None

_BACKENDS = ("greenlet", "threads")


def _checked(name: str, where: str) -> str:
    if name not in _BACKENDS or (name == "greenlet" and _greenlet is None):
        installed = "installed" if _greenlet is not None else "NOT installed"
        raise ConfigError(f"{where} = {name!r}: smp.step bodies run as 'greenlet' or "
                          f"'threads' (greenlet is {installed}); use 'threads', or install "
                          "greenlet (pip install greenlet) for 'greenlet'")
    return name


_backend = _checked(os.environ.get("MODELPARALLEL_SMP_BODIES",
                                   "greenlet" if _greenlet is not None else "threads"),
                    "MODELPARALLEL_SMP_BODIES")


def backend() -> str:
    """How the next ``smp.step``'s bodies run: ``"greenlet"`` or ``"threads"`` (Note [smp
    step coroutines]); the default is greenlets when the package is installed.

    Example:
        >>> backend() in ("greenlet", "threads")
        True
    """
    return _backend


def set_backend(name: str) -> str:
    """Run the bodies of the next steps as ``name`` (``"greenlet"`` or ``"threads"``);
    returns the previous backend. Raises :class:`ConfigError` for another name, or
    ``"greenlet"`` without the package.

    Example:
        >>> previous = set_backend("threads"); _ = set_backend(previous)
        >>> previous == backend()
        True
    """
    global _backend
    previous, _backend = _backend, _checked(name, "set_backend(name)")
    return previous

_local = threading.local()
_DEVICES = ("cpu", "cuda")


def _tls_get() -> tuple[Any, ...]:
    """torch's per-thread state a body and the driver must not share."""
    return (torch.is_grad_enabled(), torch.is_autocast_cache_enabled(),
            tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                  for d in _DEVICES))


def _tls_set(tls: tuple[Any, ...]) -> None:
    grad, cache, autocast = tls
    torch.set_grad_enabled(grad)
    torch.set_autocast_cache_enabled(cache)
    for d, (enabled, dtype) in zip(_DEVICES, autocast):
        torch.set_autocast_enabled(d, enabled)
        torch.set_autocast_dtype(d, dtype)


class _Abort(BaseException):
    """Unwinds a body whose step failed elsewhere."""


_ABORT = object()


class _Body:
    """One microbatch's call of the step function, as a coroutine (Note [smp step
    coroutines]). The driver calls :func:`start_all`/:meth:`resume`/:func:`resume_all`; the
    body side calls :meth:`model_call`/:meth:`backward` (through ``DistributedModel``)."""

    def __init__(self, index: int, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], grad: bool, device: torch.device) -> None:
        self.index = index
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.grad, self.device = grad, device
        self.model_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self.autocast: dict[str, torch.dtype] = {}
        self.backward_call: tuple[list[torch.Tensor], list[Any]] | None = None
        self.result: Any = None
        self.where = "new"  # new, model, done
        self.green = _backend == "greenlet"
        if self.green:
            self._green: Any = None
            base = _tls_get()
            self._tls = (grad, True, tuple((False, dtype) for _, dtype in base[2]))
        else:
            self._to_body: queue.SimpleQueue[Any] = queue.SimpleQueue()
            self._to_driver: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
            self._worker: _Worker | None = None
            #: Run on the body's thread right after its next message to the driver: hands
            #: control straight to the next body of a chain.
            self._then: Callable[[], None] | None = None

    # -- driver side --------------------------------------------------------------------------------

    def resume(self, value: Any = None) -> str:
        """Hand ``value`` to the stopped body and run it until it stops again."""
        assert self.where == "model", self.where
        if self.green:
            return self._take(self._enter(value))
        self._to_body.put(value)
        return self._take(self._to_driver.get())

    def abort(self) -> None:
        """Unwind a body that is waiting (after a failure)."""
        if self.where != "model":
            return
        if self.green:
            self._enter(_ABORT)
        else:
            self._to_body.put(_ABORT)
            self._to_driver.get()
            self._release()
        self.where = "done"

    def _enter(self, *args: Any) -> tuple[str, Any]:
        """Switch into the body's greenlet with the body's torch state; back with ours."""
        mine = _tls_get()
        if self._tls != mine:  # setting costs a dozen torch calls: only on a difference
            _tls_set(self._tls)
        _local.body = self
        try:
            return self._green.switch(*args)  # type: ignore[no-any-return]
        finally:
            _local.body = None
            self._tls = _tls_get()
            if self._tls != mine:
                _tls_set(mine)

    def _take(self, message: tuple[str, Any]) -> str:
        kind, value = message
        if kind == "error":
            self.where = "done"
            self._release()
            raise value
        self.where = kind
        if kind == "done":
            self.result = value
            self._release()
        return kind

    def _release(self) -> None:
        if not self.green and self._worker is not None:
            self._worker.give_back()
            self._worker = None

    def _run(self) -> tuple[str, Any]:
        try:
            value = self.fn(*self.args, **self.kwargs)
        except _Abort:
            message: tuple[str, Any] = ("aborted", None)
        except BaseException as e:  # handed to the driver, which raises it
            message = ("error", e)
        else:
            message = ("done", value)
        self.args, self.kwargs = (), {}
        return message

    def _thread_main(self) -> None:
        _local.body = self
        torch.set_grad_enabled(self.grad)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        message = self._run()
        _local.body = None
        self._send(message)

    def _send(self, message: tuple[str, Any]) -> None:
        then, self._then = self._then, None
        self._to_driver.put(message)
        if then is not None:
            then()

    # -- body side ----------------------------------------------------------------------------------

    def model_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``model(*args, **kwargs)`` inside the step: stops, returns the model's output."""
        if self.model_inputs is not None:
            raise UsageError(
                f"the model was called twice in microbatch {self.index} of one smp.step; call "
                "it once per step function (put both calls in the model's forward)")
        self.model_inputs = (args, kwargs)
        self.autocast = {dev: torch.get_autocast_dtype(dev) for dev in _DEVICES
                         if torch.is_autocast_enabled(dev)}
        if self.green:
            reply = self._green.parent.switch(("model", None))
        else:
            self._send(("model", None))
            reply = self._to_body.get()
        if reply is _ABORT:
            raise _Abort()
        return reply

    def backward(self, tensors: Any, grad_tensors: Any) -> None:
        """``model.backward(tensors, grad_tensors)`` inside the step: records what to
        back-propagate and returns; the executor back-propagates it when the body has returned
        (on the last stage, inside the schedule; elsewhere the stage's backward already ran)."""
        if self.model_inputs is None:
            raise UsageError("model.backward was called before the model in an smp.step "
                             "function; call model(...) first")
        if self.backward_call is not None:
            raise UsageError(f"model.backward was called twice in microbatch {self.index}; "
                             "call it once per step function (sum the losses first)")
        ts = list(tensors) if isinstance(tensors, (list, tuple)) else [tensors]
        if grad_tensors is None:
            gs: list[Any] = [None] * len(ts)
        else:
            gs = list(grad_tensors) if isinstance(grad_tensors, (list, tuple)) else [grad_tensors]
        if len(gs) != len(ts):
            raise ConfigError(f"model.backward got {len(ts)} tensors and {len(gs)} "
                              "grad_tensors; give one gradient per tensor")
        self.backward_call = (ts, gs)


def start_all(bodies: Sequence[_Body]) -> list[str]:
    """Run every body up to its first stop, one after the other (with threads, as a chain:
    each body starts the next itself and the driver wakes once). Returns where each stopped;
    raises the first body's error after all have stopped."""
    if not bodies:
        return []
    assert len({b.green for b in bodies}) == 1, "one step's bodies share one backend"
    if bodies[0].green:
        assert _greenlet is not None
        here = _greenlet.getcurrent()
        for b in bodies:
            b._green = _greenlet.greenlet(b._run, parent=here)
        return _each(bodies, [None] * len(bodies))
    for b in bodies:
        b._worker = _Worker.take()
    for b, nxt in itertools.pairwise(bodies):
        worker = nxt._worker
        assert worker is not None
        b._then = functools.partial(worker.run, nxt._thread_main)
    assert bodies[0]._worker is not None
    bodies[0]._worker.run(bodies[0]._thread_main)
    return _drain(bodies, [b._to_driver.get for b in bodies])


def resume_all(bodies: Sequence[_Body], values: Sequence[Any]) -> list[str]:
    """Resume every body with its value, one after the other, like :func:`start_all`."""
    if not bodies:
        return []
    for b in bodies:
        assert b.where == "model", b.where
    if bodies[0].green:
        return _each(bodies, list(values))
    for b, nxt, v in zip(bodies, bodies[1:], values[1:]):
        b._then = functools.partial(nxt._to_body.put, v)
    bodies[0]._to_body.put(values[0])
    return _drain(bodies, [b._to_driver.get for b in bodies])


def _each(bodies: Sequence[_Body], values: list[Any]) -> list[str]:
    def enter(b: _Body, v: Any) -> Callable[[], tuple[str, Any]]:
        return lambda: b._enter() if b.where == "new" else b._enter(v)

    return _drain(bodies, [enter(b, v) for b, v in zip(bodies, values)])


def _drain(bodies: Sequence[_Body], messages: Sequence[Callable[[], tuple[str, Any]]]
           ) -> list[str]:
    error: BaseException | None = None
    where = []
    for b, message in zip(bodies, messages):  # in order: body k stopped before body k+1 ran
        try:
            where.append(b._take(message()))
        except BaseException as e:  # the first one is raised once every body stopped
            where.append("done")
            error = error or e
    if error is not None:
        raise error
    return where


class _Worker:
    """A thread that runs microbatch bodies, kept between steps (Note [smp step coroutines]):
    starting a thread per microbatch per step, and each new thread's first torch call, cost
    more than the hand-overs themselves. Only the driver thread takes and gives back workers."""

    _idle: ClassVar[list[_Worker]] = []

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # torch.set_num_threads is per thread for OpenMP: the worker uses the driver's count.
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="smp-step-microbatch")
        self._thread.start()

    @classmethod
    def take(cls) -> _Worker:
        """An idle worker, or a new one."""
        return cls._idle.pop() if cls._idle else cls()

    def run(self, job: Callable[[], None]) -> None:
        """Run ``job`` on this worker's thread."""
        self._jobs.put(job)

    def give_back(self) -> None:
        """Return this worker to the idle ones (its job has handed over its last message)."""
        _Worker._idle.append(self)

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            self._jobs.get()()


# A forked child has none of its parent's threads.
os.register_at_fork(after_in_child=_Worker._idle.clear)


def current_body() -> _Body | None:
    """The microbatch body running now, or ``None`` outside ``smp.step``."""
    return getattr(_local, "body", None)
