"""Print the benchmark results in ``benchmarks/results/`` as the Markdown tables of the README.

    python benchmarks/summarize.py                  # every result file found
    python benchmarks/summarize.py partition_quality runtime
    python benchmarks/summarize.py --readme         # rewrite benchmarks/README.md

Each table is read from a result JSON written by one of the benchmark scripts, so the README's
tables can be regenerated after a new run instead of edited by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def partition_quality(data: dict[str, Any]) -> str:
    """ILP against the baselines and the proven bound, one row per model and p."""
    methods = ("ilp", "dp", "param_balanced", "uniform")
    rows = []
    for r in data["rows"]:
        m = r["methods"]
        cells = [r["model"], str(r["partitions"]), str(r["nodes"])]
        for k in methods:
            cells.append(f"{m[k]['ratio_to_bound']:.3f}" if k in m and m[k].get("ratio_to_bound")
                         else "infeasible")
        cells += [f"{m['ilp']['bottleneck_ms']:.2f}", f"{m['ilp']['peak_memory_gib']:.1f}",
                  f"{m['ilp']['solve_seconds']:.1f}", "yes" if r["passes"] else "**no**"]
        rows.append(cells)
    head = ["model", "p", "nodes", "ILP / bound", "DP / bound", "param-balanced / bound",
            "uniform / bound", "ILP bottleneck ms", "ILP peak GiB", "solve s", "bar"]
    misses = data.get("misses") or []
    tail = f"\n\n{len(data['rows']) - len(misses)}/{len(data['rows'])} rows meet the bar."
    return _table(head, rows) + tail + _scale_rows(data.get("scale_rows") or [])


def _scale_rows(scale: list[dict[str, Any]]) -> str:
    """The scale rows (``--scale``): graphs of 5,000 to 10,400 ops at p = 16 and 32."""
    if not scale:
        return ""
    rows = []
    for r in scale:
        ilp = r["methods"]["ilp"]
        bars = ", ".join(k for k, ok in r["bar"].items() if not ok)
        rows.append([r["model"], str(r["partitions"]), r["devices"], str(r["nodes"]),
                     f"{100 * r['gap']:.2f}%", f"{ilp['solve_seconds']:.1f}",
                     f"{r['peak_rss_mib']:.0f}", "yes" if r["passes"] else f"**no** ({bars})"])
    head = ["graph", "p", "devices", "nodes", "ILP gap to bound", "solve s",
            "planner peak MiB", "bar"]
    ok = sum(r["passes"] for r in scale)
    return ("\n\nScale rows (`--scale`, time_limit 60 s; bar: within 2% of the bound in at most "
            "60 s, p = 32: a plan in 60 s):\n\n" + _table(head, rows)
            + f"\n\n{ok}/{len(scale)} scale rows meet the bar.")


def communication(data: dict[str, Any]) -> str:
    """The ILP's objective under direct sends against relaying, one row per model and p."""
    rows = []
    for r in data["rows"]:
        ilp, rel = r["methods"]["ilp"], r["relay"]
        rows.append([r["model"], str(r["partitions"]), f"{ilp['bottleneck_ms']:.2f}",
                     f"{rel['bottleneck_ms']:.2f}", f"{rel['relay_over_direct']:.3f}",
                     str(rel["direct_pairs"]), str(rel["direct_skip_pairs"])])
    head = ["model", "p", "direct ILP bottleneck ms", "relay ILP bottleneck ms",
            "relay / direct objective", "(producer, consumer) pairs", "pairs that skip a stage"]
    return _table(head, rows)


def runtime(data: dict[str, Any]) -> str:
    """Bubble and step time against torch.distributed.pipelining; one stage against plain."""
    rows = [[str(r["p"]), str(r["m"]), r["schedule"], f"{r['bubble_theory']:.3f}",
             f"{r['bubble_simulated']:.3f}", f"{r['bubble_measured']:.3f}",
             f"{r['ours_step_ms']:.1f}", f"{r['torch_step_ms']:.1f}", f"{r['ratio']:.3f}"]
            for r in data["pipeline"]]
    head = ["p", "m", "schedule", "bubble theory", "simulated", "measured", "ours ms",
            "torch.distributed.pipelining ms", "ratio"]
    one = [[r["model"], f"{r['plain_step_ms']:.2f}", f"{r['ours_step_ms']:.2f}",
            f"{r['ratio']:.3f}"] for r in data["one_stage"]]
    # (d): bodies "threads" in files from before the greenlet bodies (Note [smp step coroutines]).
    smp = [[str(r["p"]), str(r["m"]), r["schedule"], r.get("bodies", "threads"),
            f"{r['smp_step_ms']:.1f}", f"{r['pipeline_step_ms']:.1f}", f"{r['ratio']:.3f}",
            f"{r['late_ratio']:.3f}" if "late_ratio" in r else "",
            f"{r['smp_bubble']:.3f}", f"{r['pipeline_bubble']:.3f}",
            f"{r['bubble_difference']:+.3f}"] for r in data.get("smp", [])]
    parts = []
    if rows:
        parts.append(_table(head, rows))
    if one:
        parts.append("partitions=1 against plain PyTorch:\n\n"
                     + _table(["model", "plain ms", "ours ms", "ratio"], one))
    if smp:
        parts.append("(d) an `@smp.step` loop against `modelparallel.pipeline` on the same plan "
                     "(goals: ratio <= 1.05, bubble difference within 0.05; late ratio: the "
                     "bodies resumed after the last action, Note [work after the result]):\n\n"
                     + _table(["p", "m", "schedule", "bodies", "smp ms", "pipeline ms", "ratio",
                               "late ratio", "smp bubble", "pipeline bubble", "difference"],
                              smp))
    return "\n\n".join(parts)


def fidelity(data: dict[str, Any]) -> str:
    """Predicted against measured time and memory per stage on the GPU."""
    rows = []
    for res in data["models"]:
        for s in res["stages"]:
            rows.append([res["model"], str(s["stage"]),
                         f"{s['measured_ms']:.2f} ({s['measured_device_ms']:.2f})",
                         f"{s['roofline_ms']:.2f} ({_pct(s['roofline_error'])})",
                         f"{s['roofline_calibrated_ms']:.2f} "
                         f"({_pct(s['roofline_calibrated_error'])})",
                         f"{s['profiled_ms']:.2f} ({_pct(s['profiled_error'])})",
                         f"{s['memory_measured_bytes'] / 2**30:.2f}",
                         f"{s['memory_predicted_bytes'] / 2**30:.2f} "
                         f"({_pct(s['memory_error'])})"])
    head = ["model", "stage", "measured ms (device only)", "roofline h100", "roofline calibrated",
            "profiled", "memory measured GiB", "predicted GiB"]
    summ = data["summary"]
    srows = [[k, f"{100 * v['median']:.1f}%", f"{100 * v['worst']:.1f}%"]
             for k, v in summ.items()]
    return (f"{data['device']}, {data['dtype']}, {data['partitions']} stages, "
            f"{data['schedule']}:\n\n" + _table(head, rows) + "\n\n"
            + _table(["prediction", "median abs. error", "worst"], srows))


def gpu_overhead(data: dict[str, Any]) -> str:
    """partitions=1 against plain PyTorch on the GPU."""
    rows = [[r["model"], f"{r['batch_size']} x {r['sample']}", f"{r['plain_step_ms']:.2f}",
             f"{r['ours_step_ms']:.2f}", f"{r['ratio']:.3f}"] for r in data["models"]]
    return (f"{data['device']}, {data['dtype']}, {data['optimizer']}:\n\n"
            + _table(["model", "batch", "plain ms", "ours ms", "ratio"], rows))


def gpu_schedules(data: dict[str, Any]) -> str:
    """Every schedule in one process on one GPU: step time and peak memory."""
    valid = data.get("traced") != "whole batch"  # the first run's predictions: 8x (its note)

    def pred(r: dict[str, Any], key: str, fmt: str) -> str:
        return format(r[key], fmt) if valid else "n/a"

    rows = [[r["schedule"], str(r["stages"]), f"{r['step_ms']:.1f}", f"{r['vs_plain']:.3f}",
             f"{r['vs_plain_accum']:.3f}", f"{r['peak_gib']:.2f}",
             pred(r, "predicted_activations_gib", ".2f"),
             pred(r, "predicted_bubble_on_p_devices", ".3f"), f"{r['loss_rel_diff']:.1e}"]
            for r in data["rows"]]
    head = ["schedule", "stages", "step ms", "/ plain", "/ plain accumulated", "peak GiB",
            "predicted activations GiB (sum of stages)", "predicted bubble on p devices",
            "first loss, rel. diff to plain"]
    text = (f"{data['workload']} on {data['device']}, {data['dtype']}, {data['optimizer']}, "
            f"p = {data['partitions']}, m = {data['microbatches']}; plain (whole batch) "
            f"{data['plain_step_ms']:.1f} ms, peak {data['plain_peak_gib']:.2f} GiB; plain "
            f"accumulated over the microbatches {data['plain_accum_step_ms']:.1f} ms, peak "
            f"{data['plain_accum_peak_gib']:.2f} GiB:\n\n" + _table(head, rows))
    return text + (f"\n\n{data['note']}" if data.get("note") else "")


def bubble(data: dict[str, Any]) -> str:
    """Measured minus simulated bubble per schedule and runtime variant (``bubble.py``)."""
    variants = list(data["config"]["variants"])
    rows = []
    for r in data["rows"]:
        cells = [str(r["p"]), str(r["m"]), r["schedule"], f"{r['bubble_theory']:.3f}"]
        for v in variants:
            e = r["variants"][v]
            cell = (f"{e['bubble_measured']:.3f} / {e['bubble_simulated']:.3f} "
                    f"({e['bubble_measured'] - e['bubble_simulated']:+.3f})")
            if "bubble_simulated_host" in e:  # the simulation charged with the host time
                cell += (f"; with host time {e['bubble_simulated_host']:.3f} "
                         f"({e['bubble_measured'] - e['bubble_simulated_host']:+.3f})")
            cells.append(cell)
        rows.append(cells)
    head = ["p", "m", "schedule", "theory",
            *(f"{v}: measured / simulated (excess)" for v in variants)]
    cpus = data["versions"].get("cpus")
    return (f"{cpus} CPUs, goal: excess <= {data['goal']['measured_minus_simulated']}:\n\n"
            + _table(head, rows))


def multigpu(data: dict[str, Any]) -> str:
    """Throughput of each plan and of torch.distributed.pipelining on several GPUs."""
    rows = []
    for c in data["configs"]:
        ours, theirs = c.get("ours") or {}, c.get("torch") or {}
        if c.get("status") != "ok" or not ours:
            rows.append([c["method"], c["schedule"], str(c["m"]), str(c.get("status"))]
                        + [""] * 7)
            continue
        mem = max(zip(ours["peak_bytes_predicted"], ours["peak_bytes_measured"]),
                  key=lambda pm: pm[1])
        rows.append([c["method"], c["schedule"], str(c["m"]), "ok",
                     f"{ours['tokens_per_s']:,.0f}",
                     f"{theirs['tokens_per_s']:,.0f}" if theirs.get("tokens_per_s") else "",
                     f"{c['ours_over_torch_tokens_per_s']:.3f}"
                     if c.get("ours_over_torch_tokens_per_s") else "",
                     f"{ours['bubble_measured']:.3f} / {c['bubble_theory']:.3f}",
                     f"{1e3 * ours['predicted_step_s']:.0f} / {1e3 * ours['pipeline_step_s']:.0f}",
                     f"{mem[0] / 2**30:.1f} / {mem[1] / 2**30:.1f}"])
    head = ["method", "schedule", "m", "status", "tokens/s ours", "tokens/s torch",
            "ours / torch", "bubble measured / theory", "step ms predicted / measured",
            "peak GiB predicted / measured (fullest GPU)"]
    return (f"{data['device']} x {data['gpus']}, {data['model']['name']}, {data['dtype']}:\n\n"
            + _table(head, rows))


def tensorflow_pipeline(data: dict[str, Any]) -> str:
    """Keras GPT against torch GPT-2 plans, and partitions=1 against plain Keras."""
    kinds = [k for k in ("keras", "torch", "keras_layer") if k in data["plans"][0]]
    def cell(c: dict[str, Any]) -> str:
        gap = f" / {100 * c['gap']:.2f}%" if "gap" in c else ""
        return (f"{c['plan_s']:.2f} / {c['step_ms']:.1f} / {c['bubble']:.2f} / "
                f"{c['balance']:.2f}{gap}")

    rows = [[str(r["p"])] + [cell(r[k]) for k in kinds]
            + [f"{r['step_ratio_keras_over_torch']:.2f}"] for r in data["plans"]]
    gaps = "gap" in data["plans"][0]["keras"]
    tail = " / gap" if gaps else ""
    size, st = data["plans"][0]["size"], data["step"]
    heads = {"keras": f"Keras (module): plan s / step ms / bubble / balance{tail}",
             "torch": f"torch (module): plan s / step ms / bubble / balance{tail}",
             "keras_layer": "Keras (layer, smp's default): plan s / step ms / bubble / "
                            f"balance{tail}"}
    return (f"{data['plans'][0]['params_keras'] / 1e6:.1f}M parameters ({size}), "
            f"m = {data['plans'][0]['microbatches']}, `h100` stages:\n\n"
            + _table(["p", *[heads[k] for k in kinds], "step keras / torch"], rows)
            + f"\n\npartitions = 1 against plain Keras on one CPU device ({st['model']}): "
            f"ours {st['ours_ms']:.1f} ms, plain {st['plain_ms']:.1f} ms, ratio {st['ratio']:.3f}")


def tensorflow_cluster(data: dict[str, Any]) -> str:
    """2 stages on 2 processes and in one process against plain Keras on one device."""
    lo, cl, r = data["local"], data["cluster"], data["ratios"]
    rows = [["plain Keras, 1 device", f"{lo['ms']['plain']:.1f}", f"{cl['ms']['plain']:.1f}", "1"],
            ["1 process, 2 logical devices", f"{lo['ms']['ours']:.1f}", "",
             f"{r['local_over_plain']:.2f}"],
            ["2 processes (cluster runtime)", "", f"{cl['ms']['ours']:.1f}",
             f"{r['cluster_over_plain']:.2f}"]]
    spec = data["spec"]
    return (f"Keras GPT {spec['model']}, m = {spec['microbatches']} {spec['pipeline']}, SGD, "
            f"{data['cpus']} CPUs; weights equal to plain Keras to {cl['weight_diff']:.0e}:\n\n"
            + _table(["step (median ms)", "local run", "cluster run", "over its run's plain"],
                     rows) + f"\n\n2 processes over 1 process: {r['cluster_over_local']:.2f}")


def hybrid(data: dict[str, Any]) -> str:
    """Step time of p = 2 x dp = 2 against p = 4 and DDP; memory of one stage per feature."""
    cfg, ver = data["config"], data.get("versions") or {}
    parts = []
    if "step_time_4_ranks" in data:
        st = data["step_time_4_ranks"]
        threads = cfg.get("threads", 1)
        rows = [[k, f"{1e3 * v['median_s']:.1f}", f"{v['ratio_to_ddp']:.3f}"]
                for k, v in st.items()]
        parts.append(f"{cfg['model']}, global batch {cfg['global_batch']}, m = "
                     f"{cfg['microbatches']}, 4 gloo ranks x {threads} thread(s) on "
                     f"{ver.get('cpus', '?')} CPUs, median of {cfg['steps']} step(s):\n\n"
                     + _table(["layout", "step ms", "vs DDP"], rows))
    if "memory_one_stage" in data:
        mem = data["memory_one_stage"]
        gpu = data.get("memory_device", "GPU" if ver.get("cuda") else "cpu")
        where = ("CPU, the profiler's allocation timeline" if gpu == "cpu"
                 else f"{gpu}, torch {ver.get('torch')}")
        rows = []
        for k, r in mem.items():
            peak = ("predicted_peak_bytes" in r and "measured_peak_bytes" in r)
            rows.append([
                k,
                f"{r['predicted_peak_bytes'] / 2**20:.0f} / {r['measured_peak_bytes'] / 2**20:.0f}"
                if peak else "n/a",
                _pct(r["predicted_peak_bytes"] / r["measured_peak_bytes"] - 1) if peak else "n/a",
                f"{r['predicted_bytes'] / 2**20:.0f} / {r['measured_bytes'] / 2**20:.0f}",
                _pct(r["predicted_bytes"] / r["measured_bytes"] - 1),
                f"{r['predicted_ratio']:.2f} / {r['memory_ratio']:.2f}",
                f"{1e3 * r['step_s']:.1f}", f"{r['time_ratio']:.2f}"])
        parts.append(f"One stage of {cfg['model']} (batch {cfg['global_batch'] // 2}, m = "
                     f"{cfg['microbatches']}, GPipe), {where}; MiB predicted / measured:\n\n"
                     + _table(["feature", "stage peak", "error", "step's part", "error",
                               "vs none", "step ms", "time vs none"], rows))
    return "\n\n".join(parts)


def direct_sends(data: dict[str, Any]) -> str:
    """Step time with direct sends against relaying, same placement (``direct_sends.py``)."""
    rows = [[str(r["p"]), str(r["m"]), r["schedule"], f"{r['direct']['step_ms']:.1f}",
             f"{r['relay']['step_ms']:.1f}", f"{r['relay_over_direct']:.3f}",
             f"{r['direct']['forward_bytes'] / 2**10:.0f} / {r['relay']['forward_bytes'] / 2**10:.0f}",
             " ".join(f"{a}→{b}" for a, b in r["direct"]["pairs"])] for r in data["rows"]]
    return _table(["p", "m", "schedule", "direct ms", "relay ms", "relay / direct",
                   "KiB sent per microbatch direct / relay", "direct pairs"], rows)


_KINDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "partition_quality": partition_quality, "runtime": runtime,
    "partition_quality_communication": communication,
    "cost_model_fidelity": fidelity, "gpu_overhead": gpu_overhead, "multigpu": multigpu,
    "tensorflow_pipeline": tensorflow_pipeline, "tensorflow_cluster": tensorflow_cluster,
    "hybrid": hybrid, "bubble": bubble, "direct_sends": direct_sends,
    "gpu_schedules": gpu_schedules}

#: The README's sections: kind, title, and what the benchmark does, how to run it, its bar.
_SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("partition_quality", "Partition quality (`partition_quality.py`)", """\
The planner on 8 models (GPT-2 small and medium, BERT-base, a Llama-style decoder, T5-small,
ResNet-50, a UNet with long skips, an Inception-like CNN) plus two graphs of about 2,000 and
2,600 ops (GPT-2 XL, a 48-layer Llama, both on the meta device), p in {2, 4, 8}, costed on the
built-in `h100` spec (m = 8, 1F1B, optimize=speed). Each method's objective is divided by the proven
lower bound of that row (1.000 = provably optimal). The bar: the ILP is never worse than a
baseline, within 2% of the bound, and solves in at most 10 s on a 2-core machine.
`python benchmarks/partition_quality.py` (about 4 minutes; `--quick` for 4 rows)."""),
    ("partition_quality_communication",
     "Direct sends against relaying (`partition_quality.py --compare-communication`)", """\
The same rows planned twice, with `communication="direct"` (each value sent once from its stage
to every stage that reads it) and `"relay"` (through every stage in between): the ILP's objective
under relaying divided by the one under direct sends (above 1.000: direct sends plan better).
`python benchmarks/partition_quality.py --compare-communication`."""),
    ("runtime", "Pipeline runtime on CPU (`runtime.py`)", """\
A stack of equal residual MLP blocks (so the stages are equal), gloo, one thread per rank.
(a) measured bubble against `(p - 1) / (m + p - 1)` and against the schedule simulated with the
measured stage times and link latency; (b) step time against `torch.distributed.pipelining`
(`ScheduleGPipe` / `Schedule1F1B` / `ScheduleInterleaved1F1B` for `1f1b-v2`, two stages per rank /
`ScheduleInterleavedZeroBubble` for `zb-h1`) on the same split, goal ratio <= 1.0; (c) `partitions=1`
against plain PyTorch, goal <= 1.03; (d) an SMP loop (`@smp.step`) against
`modelparallel.pipeline` on the same plan, goal ratio <= 1.05 and bubble within 0.05.
`python benchmarks/runtime.py` (about 2 minutes on 16 CPUs, 11 on 2). Where the bubble goes, per
schedule, against the simulation: `benchmarks/bubble.py` and [docs/schedules.md](../docs/schedules.md)."""),
    ("bubble", "Where the bubble goes (`bubble.py`)", """\
The MLP of `runtime.py`, every schedule, each rank's timeline of a step against the schedule
simulated with the measured action times and link latency, in variants of the runtime side by
side: `before` (one receive posted ahead, the result broadcast at the end, posts on the computing
thread), `ahead+early` (Note [receives ahead], Note [early result]) and `after` (also Note
[posting thread]; the default). Goal: measured minus simulated bubble <= 0.03. Figures and the
breakdown: [docs/schedules.md](../docs/schedules.md).
`python benchmarks/bubble.py --partitions 2 --steps 4` (about 3 minutes on 2 CPUs)."""),
    ("direct_sends", "Direct sends against relaying, executed (`direct_sends.py`)", """\
A stack of linear blocks that all read the input's embedding (as T5's decoder layers read the
encoder output), p = 4 gloo ranks, one thread each: the planner's placement run with
`communication="direct"` and the same placement with `"relay"`, steps of the two alternating in
one job; the slowest rank's step time, median. Above 1.000: direct sends are faster.
`python benchmarks/direct_sends.py` (about a minute on 2 CPUs, most of it tracing and planning)."""),
    ("cost_model_fidelity", "Cost model against an H100 (`cost_model_fidelity.py`)", """\
A 4-stage ILP plan of GPT-2 medium, a 1.1B Llama, ResNet-50 and BERT-large (bf16, 1F1B, m = 4);
each stage runs alone on the GPU on the values it really receives: forward+backward time (CUDA
events, median) and `torch.cuda.max_memory_allocated` against the predictions of the roofline
(built-in and calibrated spec) and of profiling mode. The bar: profiled time error <= 10% median
and <= 20% worst; memory error <= 10%. How it is measured, and what the misses are:
[docs/gpu.md](../docs/gpu.md)."""),
    ("gpu_overhead", "One stage against plain PyTorch on a GPU (`gpu_overhead.py`)", """\
`partitions=1` (traced, codegen, `LocalPipeline`) against plain PyTorch training of the same
model on the same batch, AdamW, 4 alternating rounds of 20 steps. Goal: <= 1.03."""),
    ("gpu_schedules", "Every schedule on one GPU (`gpu_schedules.py`)", """\
GPT-2 medium planned for p = 4 (interleaved 1F1B: 8 stages) and m = 8, every stage in one
process on one GPU (`LocalPipeline`, the single-GPU runtime), each schedule against plain PyTorch
on the whole batch and accumulated over the same 8 microbatches, AdamW, bf16, alternating rounds.
In one process there is no bubble: a schedule changes the peak memory and the host cost of its
actions. `python benchmarks/gpu_schedules.py --device cuda` (about 2 minutes on an H200;
`--device cpu --quick` for GPT-2 tiny). What the figures mean: [docs/schedules.md](../docs/schedules.md)."""),
    ("multigpu", "Several GPUs (`multigpu.py`)", """\
A GPT-style decoder of about 1.5B parameters per GPU, p = number of GPUs, m in {p, 2p, 4p}, both
schedules: our ILP plan against the parameter-balanced and uniform splits and against
`torch.distributed.pipelining` on the same split, bubble, predicted against measured step time
and peak memory. **Not run on several GPUs yet: no multi-GPU machine was lent.** What is below
is the one-GPU dry run (p = 1). How to run it: [docs/multigpu.md](../docs/multigpu.md)."""),
    ("tensorflow_pipeline", "TensorFlow: Keras against torch plans (`tensorflow_pipeline.py`)", """\
The Keras GPT (`modelparallel.tensorflow.models.KerasGPT`) and HF's torch GPT-2 of the same shape
(untied head), each traced by its own front end and planned by the same ILP at p in {2, 4, 8}
at `module` granularity, and the Keras IR also at `layer` granularity with `tied=colocate`
(what `smp.DistributedModel` plans); and `partitions=1` against a plain `tf.function` Keras step on one CPU device (goal <= 1.05).
`python benchmarks/tensorflow_pipeline.py` (about 5 minutes). More: [docs/tensorflow.md](../docs/tensorflow.md)."""),
    ("tensorflow_cluster", "TensorFlow across processes (`tensorflow_cluster.py`)", """\
A 2-stage pipeline of a Keras GPT on 2 processes (TensorFlow's cluster runtime) and in one
process (2 logical CPU devices), each timed beside plain Keras on one device in the same run.
`python benchmarks/tensorflow_cluster.py` (about 3 minutes)."""),
    ("hybrid", "Data x pipeline parallelism and the memory features (`hybrid.py`)", """\
(a) Step time on 4 gloo ranks, same global batch: p = 2 stages x dp = 2 replicas against
p = 4 x dp = 1 and against `torch.nn.parallel.DistributedDataParallel` over 4 ranks (ratios to
DDP). (b) One stage (the whole model, GPipe, every microbatch in flight) with none /
`checkpointing="all"` / `offload_activations` / `precision="bf16"`: the planner's memory
(`plan.stages[0].memory`) against the measured one, the whole stage's peak (parameters,
optimizer state, the step) and the step's part above what it starts with (files from before the
peak was recorded show n/a). `python benchmarks/hybrid.py --quick` (GPT-2 tiny, about a minute);
what the figures mean: [docs/hybrid.md](../docs/hybrid.md)."""),
)


def readme() -> str:
    """The text of ``benchmarks/README.md`` from the result files present."""
    out = ["# Benchmarks", "",
           "Every script prints a table and writes JSON to `results/` (with the machine and the",
           "software versions); timings are compared side by side in one run (ratios). This page",
           "is generated from those files: `python benchmarks/summarize.py --readme`.", ""]
    for kind, title, intro in _SECTIONS:
        files = [f for f in sorted(RESULTS.glob("*.json")) if _kind(f) == kind]
        out += [f"## {title}", "", intro, ""]
        for f in files:
            data = json.loads(f.read_text())
            when = (data.get("versions") or {}).get("date") or data.get("date") or ""
            out += [f"`results/{f.name}`" + (f" ({when[:10]})" if when else "") + ":", "",
                    _KINDS[kind](data), ""]
    return "\n".join(out)


def _kind(path: Path) -> str | None:
    for k in sorted(_KINDS, key=len, reverse=True):
        if path.stem.startswith(k) and not path.stem.endswith(".raw"):
            return k
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help="result kinds to print (default: all)")
    parser.add_argument("--readme", action="store_true", help="rewrite benchmarks/README.md")
    a = parser.parse_args(argv)
    if a.readme:
        (RESULTS.parent / "README.md").write_text(readme())
        return 0
    for path in sorted(RESULTS.glob("*.json")):
        kind = _kind(path)
        if kind is None or (a.only and kind not in a.only):
            continue
        print(f"### {path.name}\n")
        print(_KINDS[kind](json.loads(path.read_text())))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
