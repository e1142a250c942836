"""smp.step's microbatch bodies under both backends (Note [smp step coroutines]): order,
hand-over of values, torch state kept apart from the driver's, errors and aborts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from modelparallel.errors import ConfigError, UsageError
from modelparallel.torch import _bodies
from modelparallel.torch._bodies import _Body, current_body, resume_all, start_all

BACKENDS = ["greenlet", "threads"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    previous = _bodies.set_backend(request.param)
    try:
        yield request.param
    finally:
        _bodies.set_backend(previous)


def _bodies_of(fn: Any, n: int, grad: bool = True) -> list[_Body]:
    return [_Body(i, fn, (i,), {}, grad, torch.device("cpu")) for i in range(n)]


def test_bodies_stop_at_the_model_and_resume_in_order(backend: str) -> None:
    log: list[tuple[str, int]] = []

    def fn(i: int) -> Any:
        log.append(("start", i))
        body = current_body()
        assert body is not None and body.index == i
        out = body.model_call((torch.full((1,), float(i)),), {})
        log.append(("resumed", i))
        body.backward(out * 2, None)
        return float(out) + 10

    bodies = _bodies_of(fn, 3)
    assert start_all(bodies) == ["model"] * 3
    assert log == [("start", 0), ("start", 1), ("start", 2)] and current_body() is None
    assert [float(b.model_inputs[0][0]) for b in bodies] == [0.0, 1.0, 2.0]  # type: ignore[index]
    assert resume_all(bodies, [torch.tensor(5.0), torch.tensor(6.0), torch.tensor(7.0)]) == \
        ["done"] * 3
    assert log[3:] == [("resumed", 0), ("resumed", 1), ("resumed", 2)]
    assert [b.result for b in bodies] == [15.0, 16.0, 17.0]
    assert all(b.backward_call is not None for b in bodies)


def test_torch_state_stays_with_its_side(backend: str) -> None:
    """A body's autocast and grad mode reach its model call and its rest, never the driver;
    the driver's never reach a body."""
    seen: list[Any] = []

    def fn(i: int) -> Any:
        seen.append(("begin", torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        body = current_body()
        assert body is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            body.model_call((), {})
            seen.append(("after", torch.is_autocast_enabled("cpu"),
                         torch.get_autocast_dtype("cpu")))
        return None

    bodies = _bodies_of(fn, 2, grad=False)
    with torch.enable_grad():
        start_all(bodies)
        assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        assert [b.autocast for b in bodies] == [{"cpu": torch.bfloat16}] * 2
        with torch.autocast("cpu", dtype=torch.float16):  # the driver's autocast
            resume_all(bodies, [None, None])
            assert torch.get_autocast_dtype("cpu") == torch.float16
    assert seen == [("begin", False, False)] * 2 + [("after", True, torch.bfloat16)] * 2


def test_errors_reach_the_driver_after_every_body_stopped(backend: str) -> None:
    def fn(i: int) -> Any:
        body = current_body()
        assert body is not None
        if i == 0:
            raise KeyError("body 0 failed")
        body.model_call((), {})
        body.model_call((), {})  # a second call in one body is a named error

    bodies = _bodies_of(fn, 3)
    with pytest.raises(KeyError, match="body 0 failed"):
        start_all(bodies)
    assert [b.where for b in bodies] == ["done", "model", "model"]
    with pytest.raises(UsageError, match="the model was called twice"):
        resume_all(bodies[1:], [None, None])


def test_a_waiting_body_is_aborted_and_its_worker_reused(backend: str) -> None:
    after: list[int] = []

    def fn(i: int) -> Any:
        body = current_body()
        assert body is not None
        body.model_call((), {})
        after.append(i)  # never reached: aborted

    for _ in range(2):  # the second round takes the first round's workers (threads)
        bodies = _bodies_of(fn, 2)
        start_all(bodies)
        for b in bodies:
            b.abort()
        assert [b.where for b in bodies] == ["done", "done"] and after == []


def test_backend_names_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"'fibers'.*use 'threads'"):
        _bodies.set_backend("fibers")
    assert _bodies.backend() in BACKENDS


def test_without_greenlet_the_bodies_are_threads() -> None:
    """The fallback: greenlet not importable -> threads, and asking for greenlets is named."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['greenlet'] = None  # import greenlet now raises ImportError\n"
        "from modelparallel.errors import ConfigError\n"
        "from modelparallel.torch import _bodies\n"
        "assert _bodies.backend() == 'threads', _bodies.backend()\n"
        "try:\n"
        "    _bodies.set_backend('greenlet')\n"
        "except ConfigError as e:\n"
        "    assert 'NOT installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("MODELPARALLEL_SMP_BODIES", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
