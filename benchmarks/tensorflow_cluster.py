"""TensorFlow across processes: a 2-stage pipeline of a Keras GPT on 2 processes (TensorFlow's
cluster runtime, Note [tf cluster process model]) against the same pipeline in one process (2
logical CPU devices) and against plain Keras training on one device, ratios side by side.

    python benchmarks/tensorflow_cluster.py            # Keras GPT, 4 layers, width 128
    python benchmarks/tensorflow_cluster.py --quick    # tiny sizes, no JSON (a smoke test)

Two runs, each in fresh processes (TensorFlow's devices are fixed at its first op): ``local``
(one process, 2 logical CPU devices) and ``cluster`` (2 processes, ``RANK``/``WORLD_SIZE``/
``MASTER_*`` as the launcher sets them, one stage on each). In each run rank 0 times our
``@smp.step`` training step (``partitions=2``) interleaved with a plain ``tf.function`` Keras
step of the same model on its first device (the same-run baseline: the 2 cores are shared), and
checks that both trained to the same weights. Ratios: each pipeline over its run's plain Keras,
and cluster over local. Writes ``benchmarks/results/tensorflow_cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
FULL = {"batch_size": 16, "vocab": 512, "hidden": 128, "layers": 4, "heads": 4, "seq": 64}
QUICK = {"batch_size": 8, "vocab": 64, "hidden": 32, "layers": 2, "heads": 2, "seq": 16}


def _measure(role: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One rank of one run: time ours (and, on rank 0, plain Keras) interleaved."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    if role == "local":
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration() for _ in range(2)])
    import keras
    import numpy as np

    import modelparallel.tensorflow as smp
    from modelparallel.tensorflow.models import keras_gpt

    t_setup = time.perf_counter()
    smp.init({"partitions": 2, "microbatches": spec["microbatches"],
              "pipeline": spec["pipeline"], "memory_weight": 1.0})
    ours_case, ref_case = keras_gpt(**spec["model"]), keras_gpt(**spec["model"])
    model = smp.DistributedModel(ours_case.model)
    opt, opt_ref = keras.optimizers.SGD(0.01), keras.optimizers.SGD(0.01)
    x, y = ours_case.args[0], ours_case.target

    @smp.step
    def get_grads(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = ours_case.loss_fn(y, model(x, training=True))
        return tape.gradient(loss, model.trainable_variables), loss

    @tf.function
    def ours(x: Any, y: Any) -> Any:
        grads, loss = get_grads(x, y)
        opt.apply_gradients(zip([g.accumulate() for g in grads], model.trainable_variables))
        return loss.reduce_mean()

    @tf.function
    def plain(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = ref_case.loss_fn(y, ref_case.model(x, training=True))
        grads = tape.gradient(loss, ref_case.model.trainable_variables)
        opt_ref.apply_gradients(zip(grads, ref_case.model.trainable_variables))
        return loss

    lead = smp.rank() == 0
    fns = {"ours": ours, "plain": plain} if lead else {"ours": ours}
    for fn in fns.values():  # trace, partition, warm up
        for _ in range(2):
            fn(x, y).numpy()
    setup_s = time.perf_counter() - t_setup
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(spec["repeats"]):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(spec["steps"] - 1):
                fn(x, y)
            fn(x, y).numpy()
            samples[name].append((time.perf_counter() - t0) / spec["steps"])
    out: dict[str, Any] = {"rank": smp.rank(), "size": smp.size(), "setup_s": round(setup_s, 2)}
    if lead:
        out["ms"] = {k: round(statistics.median(v) * 1e3, 3) for k, v in samples.items()}
        out["spread_ms"] = {k: [round(min(v) * 1e3, 3), round(max(v) * 1e3, 3)]
                            for k, v in samples.items()}
        out["weight_diff"] = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(model.get_weights(), ref_case.model.get_weights(), strict=True))
        out["devices"] = list(model._mp_state["devices"])
        out["stages"] = sorted({n.stage for n in model.plan.nodes if n.stage >= 0})
    smp.barrier()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def _launch(role: str, spec: dict[str, Any], world: int, timeout: float) -> dict[str, Any]:
    """``world`` processes of this script in ``--role``; rank 0's result (SIGKILL on timeout:
    a process serving TensorFlow's runtime may ignore SIGTERM)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if world > 1:
        env.update({"WORLD_SIZE": str(world), "MASTER_ADDR": "localhost",
                    "MASTER_PORT": str(_free_port())})
    cmd = [sys.executable, __file__, "--role", role, "--spec", json.dumps(spec)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}
                              if world > 1 else env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r, (so, se) in enumerate(outs):
        line = [ln for ln in so.splitlines() if ln.startswith("RESULT ")]
        if procs[r].returncode != 0 or not line:
            raise RuntimeError(f"{role} rank {r} exited {procs[r].returncode}:\n{se[-3000:]}")
        results.append(json.loads(line[-1][len("RESULT "):]))
    return results[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed repeat")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--pipeline", default="interleaved", choices=["simple", "interleaved"])
    parser.add_argument("--role", choices=["local", "cluster"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                            "tensorflow_cluster.json"))
    a = parser.parse_args()
    if a.role:
        print("RESULT", json.dumps(_measure(a.role, json.loads(a.spec))), flush=True)
        return
    spec = {"model": QUICK if a.quick else FULL, "microbatches": a.microbatches,
            "pipeline": a.pipeline, "repeats": 2 if a.quick else a.repeats, "steps": a.steps}
    local = _launch("local", spec, 1, 900)
    cluster = _launch("cluster", spec, 2, 900)
    for name, r in (("local", local), ("cluster", cluster)):
        if r["weight_diff"] > 1e-5 or r["stages"] != [0, 1]:
            raise RuntimeError(f"{name}: pipelined training differs from plain Keras: {r}")
    rows = {"plain Keras, 1 device": (local["ms"]["plain"], cluster["ms"]["plain"]),
            "1 process, 2 stages": (local["ms"]["ours"], None),
            "2 processes, 2 stages": (None, cluster["ms"]["ours"])}
    ratios = {"local_over_plain": round(local["ms"]["ours"] / local["ms"]["plain"], 3),
              "cluster_over_plain": round(cluster["ms"]["ours"] / cluster["ms"]["plain"], 3),
              "cluster_over_local": round(cluster["ms"]["ours"] / local["ms"]["ours"], 3)}
    m = spec["model"]
    print(f"Keras GPT {m}, m={spec['microbatches']} {spec['pipeline']}, SGD; median ms per step "
          f"of {spec['repeats']} x {spec['steps']} steps (rank 0; plain Keras timed beside "
          "ours in each run)")
    print(f"{'':24} | {'local run':>10} | {'cluster run':>11}")
    for label, (lo, cl) in rows.items():
        print(f"{label:24} | {lo if lo is not None else '':>10} | {cl if cl is not None else '':>11}")
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items())
          + f"; weights vs plain: {local['weight_diff']:.1e} / {cluster['weight_diff']:.1e}")
    if a.quick:
        return
    import tensorflow as tf

    result = {"spec": spec, "local": local, "cluster": cluster, "ratios": ratios,
              "tensorflow": tf.__version__, "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
