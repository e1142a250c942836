"""Multi-GPU benchmark: our ILP plan against the baselines and torch.distributed.pipelining.

    # p GPUs, one process per GPU (NCCL); the script sets the three NVLS variables itself,
    # but set them in the launcher too, so nothing started before Python sees them on:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc_per_node 8 benchmarks/multigpu.py --size full \\
        --out benchmarks/results/multigpu-nvidia-h200-x8.json
    # CPU smoke test with gloo (timings mean nothing):
    torchrun --nproc_per_node 2 benchmarks/multigpu.py --size tiny --steps 2
    # one GPU (dry run): p = 1
    torchrun --nproc_per_node 1 benchmarks/multigpu.py --size small

Every rank builds a GPT-style decoder (:func:`modelparallel.models.gpt_decoder`, about 1.5B
parameters per GPU at ``--size full``) on the meta device, in bfloat16, and traces it; no rank
ever allocates the whole model. For every (plan method in ``--methods``) x (schedule in
``--schedules``) x (m = f * p for f in ``--m-factors``), the ranks plan (the ILP plans are solved
in parallel, one per rank, and shared through the c10d store), each rank materialises only its
own stage (:func:`modelparallel.codegen.materialize`), and then:

1. a *check step*: one forward/backward of the same batch through our pipeline and through
   ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe``/``Schedule1F1B``,
   with the very same stage ``GraphModule`` from our codegen, so the same split), from the same
   weights, without an optimizer step: their losses and per-rank gradient norms must agree
   (a correctness check of the comparison itself);
2. our pipeline: ``--warmup`` then ``--steps`` timed training steps (pipeline, then AdamW);
3. ``torch.distributed.pipelining``: the same.

Note [multigpu measurement]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
- **Step time.** Before every timed step the ranks meet at a barrier (through the c10d store,
  so it never depends on a communicator's health) after draining their GPU; each rank then times
  the pipeline step to a ``cuda.synchronize`` and, separately, the optimizer step
  (``opt.step(); opt.zero_grad()``, synchronised). A step's pipeline time is the largest over
  the ranks; the figures are medians over the timed steps. Throughput = tokens per step
  (``m * microbatch size * sequence length``) / median(pipeline + optimizer time).
- **Bubble.** Each forward and each backward action is bracketed by CUDA events on the compute
  stream (our executor's ``on_action`` hook; torch's ``forward_one_chunk``/
  ``backward_one_chunk``), so a rank's *busy* time is the device time between the start and
  the end of its actions (a gap inside an action, e.g. the host queueing kernels slower than the
  GPU runs them, counts as busy). Measured bubble = ``1 - mean over ranks of busy / step
  time``, the median over the timed steps, next to the theory ``(p - 1) / (m + p - 1)`` (equal
  stages, free communication), the plan's own estimate (``PipelineEstimate.bubble_fraction``:
  the idle fraction of the bottleneck stage) and the schedule simulated with the measured
  per-stage forward and backward times (:func:`modelparallel.schedule.simulate`, no
  communication). On the CPU the wall clock replaces the events.
- **Predicted step time**: the plan's ``PipelineEstimate.step_time`` (the roofline of the
  device spec; no optimizer step), against the measured pipeline time.
- **Memory**: ``torch.cuda.max_memory_allocated`` of each rank, reset before our timed steps and
  again before torch's, so each peak covers that runtime's training steps (weights, gradients,
  AdamW state, activations, communication buffers) and nothing of the other's; against the
  plan's ``MemoryEstimate.peak`` of that stage. Not measured on the CPU.
- **Optimizer**: ``torch.optim.AdamW`` (``fused=True`` on CUDA) keeps ``exp_avg`` and
  ``exp_avg_sq`` in the parameter's dtype, so with bfloat16 weights there is no float32 master
  copy: weight 2 + gradient 2 + two states 4 = 8 bytes per parameter, which is what
  ``PlanConfig(optimizer="adamw")`` counts (``param_state_bytes``: ``nbytes * (2 + 2)``).

Note [multigpu failures]
~~~~~~~~~~~~~~~~~~~~~~~~
A configuration that fails (an out-of-memory error, say) is recorded with each rank's error and
the benchmark goes on. The ranks agree on every phase's outcome through the c10d store (a
TCPStore: no NCCL), with ``--timeout``. A step that fails on one rank tears its pipeline process
groups down (Note [failure propagation] in ``modelparallel/runtime/failure.py``); the others'
NCCL operations then end at the process groups' timeout (``--timeout``), through NCCL's watchdog.
Its default (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``) kills the process on such a timeout, so
unless the variable is set, this script sets it to ``2`` (abort the communicator, keep the
process) before starting NCCL. After any failure every rank tears down both process groups and
makes new ones. Configurations whose predicted peak exceeds ``--memory-guard`` times the
smallest GPU's memory are skipped (recorded as such). Rank 0 rewrites the JSON after every
configuration, with the one in progress marked ``running``, so a run that dies keeps what it
measured and says where it died; ``--update`` merges a later run (a subset of the
configurations) into an existing file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

# Leave NVLink multicast (NVLS) off, before torch or NCCL is loaded (see docs/multigpu.md).
# Leave NVLink multicast (NVLS) off, before torch or NCCL is loaded (see docs/multigpu.md).
NVLS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLS_ENV)
# torchrun's agent sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (kill the process on an NCCL error or
# timeout); 2 aborts the communicator and keeps the process (Note [multigpu failures]).
os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = os.environ.get(
    "MGBENCH_NCCL_ASYNC_ERROR_HANDLING", "2")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import versions  # noqa: E402
from _multigpu_report import print_report, ratios  # noqa: E402
from _multigpu_run import (  # noqa: E402
    OPTIMIZER,
    Env,
    configs,
    device_spec,
    make_plans,
    run_config,
)
from _sync import StoreSync  # noqa: E402

from modelparallel import models  # noqa: E402
from modelparallel.runtime.distributed import default_device, init_distributed  # noqa: E402
from modelparallel.tracer import trace  # noqa: E402

METHODS = ("ilp", "param_balanced", "uniform")
SCHEDULES = ("gpipe", "1f1b")
#: Every schedule ``--schedules`` accepts (zb-h1 against torch's ScheduleInterleavedZeroBubble
#: with one stage per rank); interleaved virtual stages are measured by benchmarks/runtime.py.
ALL_SCHEDULES = (*SCHEDULES, "zb-h1")


# -- sizes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """A model size of the benchmark.

    Attributes:
        name: ``full``, ``small`` or ``tiny``.
        make: ``make(p) -> ModelCase`` on the meta device, batch of one microbatch.
        microbatch_size: Samples per microbatch.
        warmup: Default untimed steps per configuration and runtime.
        steps: Default timed steps.
        time_limit: Default ILP seconds per plan.
    """

    name: str
    make: Callable[[int], models.ModelCase]
    microbatch_size: int
    warmup: int
    steps: int
    time_limit: float


SIZES = {
    # ~1.5B parameters per GPU (4096 wide from p = 4 on), 2048 tokens per sample.
    "full": Size("full", lambda p: models.gpt_decoder(1.5e9, p, seq_len=2048, batch_size=1),
                 1, 1, 4, 20.0),
    # ~300M per GPU, 1024 wide, 1024 tokens: the one-GPU dry run.
    "small": Size("small", lambda p: models.gpt_decoder(3e8, p, hidden=1024, seq_len=1024,
                                                        batch_size=2), 2, 2, 5, 10.0),
    # ~1M parameters, for the CPU: 4 layers (2 per stage from p = 2), 32 tokens.
    "tiny": Size("tiny", lambda p: models.gpt_decoder(
        hidden=128, layers=max(4, 2 * p), heads=4, vocab_size=512, seq_len=32, batch_size=2,
        gpus=p), 2, 1, 3, 5.0),
}


# -- main ----------------------------------------------------------------------------------------------


def _start(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    if args.device == "auto":
        device = default_device()
    elif args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if not init_distributed(device, args.timeout):  # not under torchrun: one process
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=args.timeout))
    if device.type == "cpu":
        torch.set_num_threads(1)  # one intra-op thread per rank, as benchmarks/runtime.py
    return device, dist.get_rank(), dist.get_world_size()


def _kind(device: torch.device, world: int) -> str:
    if device.type != "cuda":
        return f"cpu-x{world}"
    name = torch.cuda.get_device_name(device).upper()
    chip = "h200" if "H200" in name else "h100" if "H100" in name else "gpu"
    return f"nvidia-{chip}" + (f"-x{world}" if world > 1 or chip == "h100" else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--schedules", default=",".join(SCHEDULES),
                        help="comma-separated subset of gpipe,1f1b,zb-h1")
    parser.add_argument("--m-factors", default="1,2,4", help="m = factor * p, comma-separated")
    parser.add_argument("--torch-methods", default=",".join(METHODS),
                        help="plan methods also run under torch.distributed.pipelining")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip torch.distributed.pipelining")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (size's default)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before")
    parser.add_argument("--time-limit", type=float, default=None, help="ILP seconds per plan")
    parser.add_argument("--microbatch-size", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--device-spec", default=None,
                        help="device spec for planning (built-in name or JSON); default: the "
                             "GPU's built-in spec with its real memory")
    parser.add_argument("--memory-guard", type=float, default=0.95,
                        help="skip configurations predicted above this fraction of the "
                             "smallest GPU's memory (0: never)")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds after which the remaining configurations are not "
                             "started (recorded as not run)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds any rank waits for another")
    parser.add_argument("--kind", default=None, help="machine kind for the record")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default benchmarks/results/multigpu-<kind>.json)")
    parser.add_argument("--update", action="store_true",
                        help="merge into an existing --out file: its configurations not run "
                             "now are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    parser.add_argument("--inject-failure", default="", metavar="METHOD/SCHEDULE/M:RANK",
                        help="(tests) make that rank fail in the last forward of the first "
                             "timed step of our pipeline in that configuration")
    a = parser.parse_args(argv)
    size = SIZES[a.size]
    a.methods = [x for x in a.methods.split(",") if x]
    a.schedules = [x for x in a.schedules.split(",") if x]
    a.torch_methods = [x for x in a.torch_methods.split(",") if x]
    a.m_factors = [int(x) for x in a.m_factors.split(",") if x]
    for name, got, allowed in (("--methods", a.methods, METHODS),
                               ("--schedules", a.schedules, ALL_SCHEDULES),
                               ("--torch-methods", a.torch_methods, METHODS)):
        bad = [x for x in got if x not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad}; choose from {list(allowed)}")
    if not a.m_factors or min(a.m_factors) < 1:
        parser.error("--m-factors must be positive integers")
    a.steps = size.steps if a.steps is None else a.steps
    a.warmup = size.warmup if a.warmup is None else a.warmup
    a.time_limit = size.time_limit if a.time_limit is None else a.time_limit
    a.microbatch_size = size.microbatch_size if a.microbatch_size is None else a.microbatch_size
    if a.steps < 1 or a.warmup < 0 or a.microbatch_size < 1:
        parser.error("--steps must be >= 1, --warmup >= 0, --microbatch-size >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device, rank, world = _start(args)

    def log(msg: str) -> None:
        print(f"[rank {rank} {time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr,
              flush=True)

    store = dist.distributed_c10d._get_default_store()
    sync = StoreSync(store, rank, world, args.timeout)
    dtype = getattr(torch, args.dtype)
    case = SIZES[args.size].make(world)
    model = case.model.to(dtype)
    mb_args, _, _ = case.make_batch(args.microbatch_size, 0)
    traced = trace(model, mb_args)
    loss_fn = case.loss_fn
    if rank == 0:
        log(f"{case.name}: {case.num_parameters / 1e9:.2f}B parameters "
            f"({case.num_parameters / world / 1e9:.2f}B per rank), {len(traced.graph)} nodes; "
            f"{world} ranks on {device.type}")
    capacity = None
    if device.type == "cuda":
        capacity = min(sync.gather(torch.cuda.mem_get_info(device)[1], "capacity"))
    spec = device_spec(args, device, capacity)
    env = Env(rank, world, device, sync, args, case, traced, loss_fn)
    todo = configs(args.methods, args.schedules, args.m_factors, world)
    plans = make_plans(env, todo, spec, log if rank == 0 else lambda _: None)

    kind = args.kind or _kind(device, world)
    out_path = args.out or Path(__file__).resolve().parent / "results" / f"multigpu-{kind}.json"
    blocks = [m for m in model.modules() if isinstance(m, models.DecoderBlock)]
    result: dict[str, Any] = {
        "benchmark": "multigpu", "kind": kind,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "gpus": world if device.type == "cuda" else 0, "ranks": world,
        "backend": "nccl" if device.type == "cuda" else "gloo",
        "size": args.size, "dtype": args.dtype,
        "model": {"name": case.name, "parameters": case.num_parameters,
                  "parameters_per_rank": case.num_parameters / world,
                  "hidden": model.tok.embedding_dim, "layers": len(blocks),
                  "heads": blocks[0].heads if blocks else 0,
                  "vocab": model.tok.num_embeddings, "seq_len": int(mb_args[0].shape[1]),
                  "graph_nodes": len(traced.graph)},
        "microbatch_size": args.microbatch_size,
        "optimizer": {"name": "torch.optim.AdamW", "fused": device.type == "cuda",
                      "states": "exp_avg and exp_avg_sq in the parameter dtype",
                      "bytes_per_parameter": 4 * torch.empty((), dtype=dtype).element_size(),
                      "plan_optimizer": OPTIMIZER},
        "timing": {"warmup": args.warmup, "steps": args.steps, "statistic": "median",
                   "time_limit": args.time_limit},
        "device_spec": spec.to_dict(), "capacity_bytes": capacity,
        "env": {k: os.environ.get(k) for k in (*NVLS_ENV, "TORCH_NCCL_ASYNC_ERROR_HANDLING")},
        "versions": versions("transformers"), "command": sys.argv,
        "configs": [], "summary": {},
    }
    earlier: list[dict[str, Any]] = []
    if args.update and out_path.exists() and rank == 0:
        old = json.loads(out_path.read_text())
        if (old.get("size"), old.get("ranks"), old.get("device")) == (
                args.size, world, result["device"]):
            keys = {c.key for c in todo}
            earlier = [c for c in old.get("configs", [])
                       if f"{c['method']}/{c['schedule']}/{c['m']}" not in keys]
        else:
            log(f"--update: {out_path} is for another size, rank count or device; replacing it")

    def write(records: list[dict[str, Any]]) -> None:
        if rank != 0:
            return
        result["configs"] = earlier + records
        result["summary"] = ratios(result["configs"])
        result["elapsed_s"] = time.perf_counter() - started
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    records: list[dict[str, Any]] = []
    for cfg in todo:
        over = sync.gather(time.perf_counter() - started > args.budget, "budget")[0]
        plan = plans[cfg.key]
        base = {"method": cfg.method, "schedule": cfg.schedule, "m": cfg.m}
        if over:
            records.append({**base, "status": "not run",
                            "reason": f"--budget {args.budget:g} s used up"})
            continue
        if isinstance(plan, str):
            records.append({**base, "status": "failed", "phase": "planning", "errors": [plan]})
            continue
        write([*records, {**base, "status": "running"}])
        t0 = time.perf_counter()
        record = run_config(env, cfg, plan, capacity, log if rank == 0 else lambda _: None)
        record["elapsed_s"] = time.perf_counter() - t0
        records.append(record)
        if rank == 0:
            log(f"{cfg.key}: {record['status']} in {record['elapsed_s']:.1f} s"
                + (f", {record['ours']['tokens_per_s']:,.0f} tokens/s"
                   if record["status"] == "ok" else ""))
        write(records)
    env.drop_groups()
    if rank == 0:
        write(records)
        print_report(result)
        log(f"wrote {out_path}")
    sync.barrier("end")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
