"""TensorFlow across processes (Note [tf cluster process model] in runtime/tf_cluster.py): the
cluster read from TF_CONFIG or the launcher's variables, and an SMP script on 2 real processes
(told the cluster either way; rank 0 driving the cluster graph, rank 1 serving its stage and
receiving the step's outputs)
trained to single-device parity; a follower without a driver times out with a named error.
The processes get hard timeouts and SIGKILL: a process serving TensorFlow's runtime may ignore
SIGTERM."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelparallel.errors import ConfigError
from modelparallel.runtime.tf_cluster import ClusterConfig, cluster_from_env

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "_tf_cluster_run.py"


def test_cluster_from_tf_config_and_launcher_env() -> None:
    tf_config = {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker",
                                                                        "index": 2}}
    cfg = cluster_from_env({"TF_CONFIG": json.dumps(tf_config), "WORLD_SIZE": "9"})
    assert cfg == ClusterConfig(("a:1", "b:2", "c:3"), 2) and cfg.size == 3
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "100",
           "LOCAL_RANK": "1"}
    assert cluster_from_env(env) == ClusterConfig(("h:101", "h:102"), 1, 1, 2)
    assert cluster_from_env({"WORLD_SIZE": "1"}) is None
    assert cluster_from_env({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]}})}) is None
    with pytest.raises(ConfigError, match="several hosts"):
        cluster_from_env({**env, "LOCAL_WORLD_SIZE": "1"})
    with pytest.raises(ConfigError, match="job 'worker'"):
        cluster_from_env({"TF_CONFIG": json.dumps({"cluster": {"ps": ["a:1"]}})})
    with pytest.raises(ConfigError, match="outside"):
        ClusterConfig(("a:1", "b:2"), 2)


def _free_port(world: int) -> int:
    """A port ``P`` with ``P + 1 .. P + world`` (where the tasks listen) free now: each is bound
    once to check (a port taken by another process would make a task serve or reach the wrong
    server, and the job hang)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            base = int(s.getsockname()[1])
        if base + world >= 65535:
            continue
        try:
            probes = []
            for k in range(1, world + 1):
                t = socket.socket()
                probes.append(t)
                t.bind(("localhost", base + k))
        except OSError:
            continue
        finally:
            for t in probes:
                t.close()
        return base
    raise AssertionError("no run of free ports found for the cluster's tasks")


def _run_ranks(spec: dict[str, Any], world: int = 2, timeout: float = 240.0,
               env_extra: dict[str, str] | None = None,
               tf_config: bool = False) -> list[dict[str, Any]]:
    """``tests/_tf_cluster_run.py`` on ``world`` processes (SIGKILL after ``timeout``), told
    the cluster by the launcher's variables or (``tf_config``) by a ``TF_CONFIG`` alone."""
    pytest.importorskip("tensorflow")
    port = _free_port(world)  # tasks listen on port+1..port+world
    base = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1",
            "WORLD_SIZE": str(world), "MASTER_ADDR": "localhost", "MASTER_PORT": str(port),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **(env_extra or {})}
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    workers = [f"localhost:{port + 1 + r}" for r in range(world)]

    def env(r: int) -> dict[str, str]:
        if not tf_config:
            return {**base, "RANK": str(r), "LOCAL_RANK": str(r)}
        return {**{k: v for k, v in base.items() if k not in launcher}, "TF_CONFIG": json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": r}})}

    procs = [subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(spec)], env=env(r),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs: list[tuple[int, str, str]] = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            outs.append((p.returncode, so, se))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()  # SIGKILL: TensorFlow's runtime may ignore SIGTERM
        tails = [f"rank {r}:\n{so[-1500:]}\n{se[-2500:]}"
                 for r, (so, se) in enumerate(p.communicate() for p in procs)]
        raise AssertionError(f"the {world} processes did not finish in {timeout:.0f} s "
                             f"(ports {port + 1}..{port + world}):\n" + "\n".join(tails)) from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r, (rc, so, se) in enumerate(outs):
        assert rc == 0, f"rank {r} exited {rc}:\n{so[-2000:]}\n{se[-4000:]}"
        line = [ln for ln in so.splitlines() if ln.startswith("RESULT ")]
        assert line, f"rank {r} printed no result:\n{so[-2000:]}\n{se[-3000:]}"
        results.append(json.loads(line[-1][len("RESULT "):]))
    return results


def _check(results: list[dict[str, Any]]) -> None:
    driver, follower = results
    assert driver["size"] == follower["size"] == 2
    assert driver["diff"] < 1e-5, driver
    assert driver["stages"] == [0, 1], driver  # both processes hold a stage
    assert [d.split("/")[3] for d in driver["devices"]] == ["task:0", "task:1"]
    for a, b in zip(driver["losses"], driver["ref_losses"], strict=True):
        assert abs(a - b) < 1e-5
    assert follower["losses"] == driver["losses"]  # the step's outputs on every rank
    assert driver["replica_diff"] == follower["replica_diff"] == 0.0
    assert follower["got"] == {"hello": 1} and follower["broadcast"] == ["to", "all"]


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("tf_config", [False, True], ids=["launcher", "tf_config"])
def test_two_process_pipeline_equals_one_device_training(tf_config: bool) -> None:
    _check(_run_ranks({"partitions": 2, "microbatches": 2, "pipeline": "interleaved",
                       "model": "keras_skip", "optimizer": "sgd",
                       "config": {"memory_weight": 1.0}}, tf_config=tf_config))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_gpt_adam_gpipe_equals_one_device_training() -> None:
    _check(_run_ranks({"partitions": 2, "microbatches": 2, "pipeline": "simple",
                       "model": "keras_gpt", "optimizer": "adam",
                       "config": {"memory_weight": 1.0}}))


@pytest.mark.multiprocess
def test_a_follower_without_its_driver_times_out_with_a_named_error() -> None:
    pytest.importorskip("tensorflow")
    port = _free_port(2)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1", "RANK": "1",
           "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": str(port),
           "MP_TF_TIMEOUT_S": "3",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    spec = {"partitions": 2, "microbatches": 2, "pipeline": "simple", "model": "keras_skip",
            "optimizer": "sgd"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "StepTimeoutError" in err and "from rank 0" in err, err[-3000:]
