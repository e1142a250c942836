"""TensorFlow front end: plans of a Keras GPT beside the PyTorch GPT-2 of the same size, and the
step time of the pipelined Keras model against plain Keras training on one device.

    python benchmarks/tensorflow_pipeline.py            # GPT-2 small size, p in {2, 4, 8}
    python benchmarks/tensorflow_pipeline.py --quick    # tiny sizes (CPU smoke test)

Part 1 traces the Keras GPT (``modelparallel.tensorflow.models.KerasGPT``) with TensorFlow and
HF's GPT-2 (untied head, like the Keras model) with torch, plans both with the same ILP for
``h100`` stages at each ``p``, and prints the planning time, the predicted step time, bubble and
stage balance side by side. Part 2 times a training step of the same small Keras model both ways
on this machine: ``smp.step`` with ``partitions=1`` (our step: microbatch split, placement,
``tf.gradients``, ``accumulate``) and a plain ``tf.function`` Keras step; the ratio is ours/plain.
Writes ``benchmarks/results/tensorflow_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _plan_row(graph: Any, p: int, m: int, samples: int, granularity: str = "module",
              tied: str = "replicate") -> dict[str, Any]:
    from modelparallel.partitioner import partition
    from modelparallel.plan import PlanConfig

    start = time.perf_counter()
    plan = partition(graph, PlanConfig(partitions=p, microbatches=m, granularity=granularity,
                                       tied=tied, time_limit=60), "h100",
                     samples_per_microbatch=samples)
    wall = time.perf_counter() - start
    times = [s.forward_time + s.backward_time for s in plan.stages]
    return {"p": p, "nodes": len(graph), "plan_s": round(wall, 3),
            "step_ms": round(plan.pipeline.step_time * 1e3, 3),
            "bubble": round(plan.pipeline.bubble_fraction, 4),
            "balance": round(max(times) / max(min(times), 1e-12), 3),
            "status": plan.solver.status, "gap": round(plan.solver.gap, 4)}


def plans(quick: bool) -> list[dict[str, Any]]:
    """Part 1: the two IRs planned at each p."""
    import tensorflow as tf

    from modelparallel.tensorflow.models import KerasGPT
    from modelparallel.tracer.tf_capture import trace_keras

    size = ({"vocab": 256, "hidden": 64, "layers": 4, "heads": 4, "seq": 32} if quick else
            {"vocab": 50257, "hidden": 768, "layers": 12, "heads": 12, "seq": 128})
    m, samples = 8, 1
    keras_model = KerasGPT(**size, name="gpt")
    ids = tf.zeros((samples, size["seq"]), tf.int32)
    keras_model(ids)
    t0 = time.perf_counter()
    kg = trace_keras(keras_model, ids).graph
    keras_trace = time.perf_counter() - t0

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from modelparallel.tracer import trace

    cfg = GPT2Config(vocab_size=size["vocab"], n_embd=size["hidden"], n_layer=size["layers"],
                     n_head=size["heads"], n_positions=size["seq"], tie_word_embeddings=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    with torch.device("meta"):
        torch_model = GPT2LMHeadModel(cfg)
    t0 = time.perf_counter()
    tg = trace(torch_model, (torch.zeros((samples, size["seq"]), dtype=torch.int64),)).graph
    torch_trace = time.perf_counter() - t0
    rows = []
    for p in (2, 4, 8):
        k, t = _plan_row(kg, p, m, samples), _plan_row(tg, p, m, samples)
        # what smp.DistributedModel plans by default (Note [layer granularity])
        kl = _plan_row(kg, p, m, samples, granularity="layer", tied="colocate")
        rows.append({"p": p, "keras": k, "torch": t, "keras_layer": kl,
                     "step_ratio_keras_over_torch": round(k["step_ms"] / t["step_ms"], 3)})
    print(f"Keras GPT: {kg.num_parameters / 1e6:.1f}M params, {len(kg)} nodes, traced in "
          f"{keras_trace:.1f} s; torch GPT-2: {tg.num_parameters / 1e6:.1f}M params, "
          f"{len(tg)} nodes, traced in {torch_trace:.1f} s")
    print(f"{'p':>2} | {'keras plan s':>12} {'step ms':>8} {'bubble':>6} {'bal':>5} | "
          f"{'torch plan s':>12} {'step ms':>8} {'bubble':>6} {'bal':>5} | keras/torch")
    for r in rows:
        k, t = r["keras"], r["torch"]
        print(f"{r['p']:>2} | {k['plan_s']:>12} {k['step_ms']:>8} {k['bubble']:>6} "
              f"{k['balance']:>5} | {t['plan_s']:>12} {t['step_ms']:>8} {t['bubble']:>6} "
              f"{t['balance']:>5} | {r['step_ratio_keras_over_torch']} (gap keras "
              f"{100 * k['gap']:.2f}%, torch {100 * t['gap']:.2f}%)")
        kl = r["keras_layer"]
        print(f"   keras at layer granularity (smp's default): plan {kl['plan_s']} s, step "
              f"{kl['step_ms']} ms, bubble {kl['bubble']}, balance {kl['balance']}")
    return [{"size": size, "microbatches": m, "params_keras": kg.num_parameters,
             "params_torch": tg.num_parameters, **r} for r in rows]


def step_times(quick: bool, repeats: int) -> dict[str, Any]:
    """Part 2: our one-stage step against a plain Keras step, interleaved, on this machine."""
    import keras
    import tensorflow as tf

    import modelparallel.tensorflow as smp
    from modelparallel.tensorflow.models import keras_gpt

    kw = {"batch_size": 8, "hidden": 64, "layers": 2, "seq": 32, "vocab": 256}
    smp.init({"partitions": 1, "microbatches": 1})
    ours_case, ref_case = keras_gpt(**kw), keras_gpt(**kw)
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

    fns = {"ours": ours, "plain": plain}
    for fn in fns.values():
        for _ in range(3):
            fn(x, y).numpy()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(10):
                fn(x, y)
            fn(x, y).numpy()
            samples[name].append((time.perf_counter() - t0) / 11)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["ours"] / med["plain"]
    print(f"step time, partitions=1, one device: ours {med['ours'] * 1e3:.2f} ms, plain Keras "
          f"{med['plain'] * 1e3:.2f} ms, ratio {ratio:.3f} (median of {repeats} x 11 steps)")
    return {"model": kw, "ours_ms": med["ours"] * 1e3, "plain_ms": med["plain"] * 1e3,
            "ratio": round(ratio, 4), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                            "tensorflow_pipeline.json"))
    a = parser.parse_args()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    result = {"plans": plans(a.quick), "step": step_times(a.quick, a.repeats),
              "tensorflow": tf.__version__, "quick": a.quick,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if not a.quick:
        Path(a.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
