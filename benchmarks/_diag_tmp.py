"""GPU memory diagnostics of one stage of GPT-2 medium per feature (run on the device)."""
import copy, json, os, sys, time, collections
import torch, modelparallel
from modelparallel import models

OUT = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
case = models.gpt2(sys.argv[1] if len(sys.argv) > 1 else "medium", batch_size=8, seq_len=128)
res = {}
feats_list = (("none", {}), ("checkpointing", {"checkpointing": "all"}),
              ("offload", {"offload_activations": True}), ("bf16", {"precision": "bf16"}))
for label, feats in feats_list:
    t0 = time.time()
    torch.cuda.empty_cache()
    a0 = torch.cuda.memory_allocated()
    model = copy.deepcopy(case.model).to(dev)
    x, y = case.args[0].to(dev), case.target.to(dev)
    a_model = torch.cuda.memory_allocated()
    pipe = modelparallel.pipeline(model, x, loss_fn=case.loss_fn, microbatches=4,
                                  schedule="gpipe", method="uniform", device=dev, **feats)
    m = pipe.plan.stages[0].memory
    pred = dict(parameters=m.parameters, gradients=m.gradients, optimizer=m.optimizer,
                activations=m.activations, workspace=m.workspace, peak=m.peak)
    opt = torch.optim.AdamW(pipe.parameters(), lr=1e-4)
    steps = 2
    info = {}
    for i in range(steps + 1):
        opt.zero_grad()
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        last = i == steps
        if last:
            torch.cuda.memory._record_memory_history(max_entries=400000, stacks="python")
        ts = time.perf_counter()
        pipe.step(x, y, return_outputs=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - ts
        peak = torch.cuda.max_memory_allocated()
        after = torch.cuda.memory_allocated()
        if last:
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
        opt.step()
        info = dict(base=base, peak=peak, after_step=after, step_s=dt,
                    after_opt=torch.cuda.memory_allocated())
    # replay events of the last step
    ev = snap["device_traces"][0] if snap["device_traces"] else []
    live = {}
    cur, best, best_k = 0, 0, 0
    timeline = []
    def tag(e):
        fr = e.get("frames") or []
        phase = "B" if any("backward" in f.get("name", "") for f in fr) else "F"
        where = next((f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in fr
                      if "torch/" not in f["filename"] or "checkpoint" in f["filename"]
                      or "autograd/graph" in f["filename"]), "?")
        return phase, where
    best_live = {}
    for k, e in enumerate(ev):
        act = e["action"]
        if act == "alloc":
            live[e["addr"]] = (e["size"], k)
            cur += e["size"]
        elif act == "free_completed":
            if e["addr"] in live:
                cur -= live.pop(e["addr"])[0]
        else:
            continue
        if cur > best:
            best, best_k = cur, k
            best_live = dict(live)
        if k % 50 == 0:
            timeline.append((k, cur, tag(e)[0]))
    groups = collections.Counter(); counts = collections.Counter()
    for addr, (size, k) in best_live.items():
        ph, where = tag(ev[k])
        key = f"{ph} {size} {where}"
        groups[key] += size; counts[key] += 1
    top = [(k, v / 2**20, counts[k]) for k, v in groups.most_common(40)]
    res[label] = dict(pred_mib={k: v / 2**20 for k, v in pred.items()},
                      meas_mib={k: (v / 2**20 if k != "step_s" else v) for k, v in info.items()},
                      model_mib=(a_model - a0) / 2**20,
                      peak_delta_mib=(info["peak"] - info["base"]) / 2**20,
                      replay_peak_mib=best / 2**20, peak_event=best_k, n_events=len(ev),
                      peak_phase=tag(ev[best_k])[0] if ev else None,
                      top_live_at_peak=top, timeline=timeline[::max(1, len(timeline) // 300)],
                      build_s=time.time() - t0)
    print(label, json.dumps({k: res[label][k] for k in ("pred_mib", "meas_mib", "peak_delta_mib", "replay_peak_mib", "peak_phase", "model_mib")}), flush=True)
    for t in top[:15]:
        print("   ", t, flush=True)
    pipe.close()
    del pipe, opt, model, snap
    torch.cuda.empty_cache()
json.dump(res, open(os.path.join(OUT, "diag.json"), "w"), indent=1)
