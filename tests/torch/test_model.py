"""DistributedModel and smp.step on real gloo processes: pipelined SMP training equals
single-device training (same data, same seed) to fp32 rounding, under both pipelines."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _dist import run_ranks
from torch import nn

pytestmark = pytest.mark.multiprocess


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.conv2 = nn.Conv2d(4, 8, 3, 1)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)


def _model(kind: str, world: int) -> nn.Module:
    import modelparallel.torch as smp

    torch.manual_seed(0)
    if kind == "cnn":
        model: nn.Module = _CNN()
        smp.set_partition(model.fc1, world - 1 if world < 4 else world - 2)
        smp.set_partition(model.fc2, world - 1)
        if world >= 4:  # one layer per stage
            smp.set_partition(model.conv2, 1)
        return model
    layers = [nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16),
              nn.Tanh(), nn.Linear(16, 4)]
    model = nn.Sequential(*layers)
    for i, layer in enumerate(model):
        smp.set_partition(layer, min(world - 1, i * world // len(layers)))
    return model


def _batch(kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "cnn":
        return torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)
    return torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def _parity_job(rank: int, world: int, kind: str, pipeline: str, opt_name: str,
                steps: int, active: int | None = None) -> dict[str, Any]:
    import torch.nn.functional as F

    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    try:
        smp.init({"partitions": world, "microbatches": 4, "pipeline": pipeline,
                  "auto_partition": False, "default_partition": 0,
                  "active_microbatches": active})
        model = _model(kind, world)
        ref = copy.deepcopy(model)
        dm = smp.DistributedModel(model)

        def make(params: Any) -> torch.optim.Optimizer:
            if opt_name == "adamw":
                return torch.optim.AdamW(params, lr=1e-2)
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)

        opt = smp.DistributedOptimizer(make(dm.parameters()))
        ref_opt = make(ref.parameters())

        @smp.step
        def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
            out = model(x)
            loss = F.nll_loss(out, y) if kind == "cnn" else F.cross_entropy(out, y)
            model.backward(loss)
            return loss

        @smp.step
        def eval_step(model: Any, x: torch.Tensor) -> Any:
            return model(x)

        g = torch.Generator().manual_seed(1)
        losses, ref_losses = [], []
        for _ in range(steps):
            x, y = _batch(kind, g)
            if smp.pp_rank() != 0:  # only pipeline rank 0's data counts (SMP's rule)
                x, y = torch.zeros(x.shape[0], 0), torch.zeros_like(y)
            opt.zero_grad()
            losses.append(float(train_step(dm, x, y).reduce_mean()))
            opt.step()
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x, y = _batch(kind, g)
            ref_opt.zero_grad()
            out = ref(x)
            loss = F.nll_loss(out, y) if kind == "cnn" else F.cross_entropy(out, y)
            loss.backward()
            ref_opt.step()
            ref_losses.append(float(loss))
        x, _ = _batch(kind, torch.Generator().manual_seed(5))
        with torch.no_grad():
            evaluated = eval_step(dm, x).concat()
            expected = ref(x)
        full = dm.state_dict()
        diff = max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items())
        return {"losses": losses, "ref": ref_losses, "diff": diff,
                "eval_diff": float((evaluated - expected).abs().max()),
                "local": sorted(n for n, _ in dm.local_named_parameters()),
                "waves": _sched_name(dm)}
    finally:
        shutdown()


def _sched_name(dm: Any) -> str:
    ex = dm.pipeline.executor
    return next(iter(ex._schedules.values())).name if ex._schedules else ""


@pytest.mark.parametrize("pipeline", ["interleaved", "simple"])
@pytest.mark.parametrize(("kind", "opt"), [("cnn", "sgd"), ("mlp", "adamw")])
def test_two_ranks_train_like_one_device(pipeline: str, kind: str, opt: str) -> None:
    results = [r.unwrap() for r in run_ranks(_parity_job, 2, kind, pipeline, opt, 3)]
    for r in results:
        assert r["losses"] == pytest.approx(r["ref"], abs=1e-5)
        assert r["diff"] < 1e-5
        assert r["eval_diff"] < 1e-5
    assert results[0]["losses"] == results[1]["losses"]  # every rank returns the same values
    assert results[0]["local"] and results[1]["local"]  # each stage holds parameters
    assert not set(results[0]["local"]) & set(results[1]["local"])


def _threads_job(rank: int, world: int, job: str, *args: Any) -> dict[str, Any]:
    """``job`` with the bodies on worker threads (Note [smp step coroutines]: the fallback
    without greenlet)."""
    from modelparallel.torch import _bodies

    previous = _bodies.set_backend("threads")
    try:
        return globals()[job](rank, world, *args)  # type: ignore[no-any-return]
    finally:
        _bodies.set_backend(previous)


def test_thread_bodies_train_and_autocast_like_greenlet_bodies() -> None:
    results = [r.unwrap() for r in
               run_ranks(_threads_job, 2, "_parity_job", "mlp", "interleaved", "adamw", 2)]
    for r in results:
        assert r["losses"] == pytest.approx(r["ref"], abs=1e-5)
        assert r["diff"] < 1e-5 and r["eval_diff"] < 1e-5
    for r in [r.unwrap() for r in run_ranks(_threads_job, 2, "_autocast_job")]:
        assert r["dtype"] == "torch.bfloat16" and r["diff"] == 0.0 and r["vs_fp32"] > 0


def test_active_microbatches_run_in_waves_with_the_same_result() -> None:
    results = [r.unwrap() for r in run_ranks(_parity_job, 2, "mlp", "simple", "sgd", 2, 2)]
    for r in results:
        assert r["losses"] == pytest.approx(r["ref"], abs=1e-5) and r["diff"] < 1e-5
        assert r["waves"] == "gpipe-waves2"


def _delayed_job(rank: int, world: int) -> dict[str, Any]:
    import torch.nn.functional as F

    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    try:
        smp.init({"partitions": world, "microbatches": 2, "auto_partition": False,
                  "default_partition": 0, "delayed_parameter_initialization": True})
        with smp.model_creation():
            model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        smp.set_partition(model[2], 1)
        dm = smp.DistributedModel(model)
        opt = smp.DistributedOptimizer(torch.optim.SGD(dm.parameters(), lr=0.1))

        @smp.step
        def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
            loss = F.mse_loss(model(x), y)
            model.backward(loss)
            return loss

        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            losses.append(float(train_step(dm, x, y).reduce_mean()))
            opt.step()
        return {"losses": losses,
                "meta": sorted(n for n, p in dm.module.named_parameters() if p.is_meta),
                "local": sorted(n for n, _ in dm.local_named_parameters())}
    finally:
        shutdown()


def test_delayed_initialisation_materialises_only_the_stage() -> None:
    results = [r.unwrap() for r in run_ranks(_delayed_job, 2)]
    assert results[0]["local"] == ["0.bias", "0.weight"] == results[1]["meta"]
    assert results[1]["local"] == ["2.bias", "2.weight"] == results[0]["meta"]
    losses = results[0]["losses"]
    assert losses == results[1]["losses"] and losses[-1] < losses[0]  # it trains


def _ddp_job(rank: int, world: int) -> dict[str, Any]:
    import torch.nn.functional as F

    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    try:
        smp.init({"partitions": 1, "microbatches": 2, "ddp": True})
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        ref = copy.deepcopy(model)
        dm = smp.DistributedModel(model)
        opt = smp.DistributedOptimizer(torch.optim.SGD(dm.parameters(), lr=0.1))
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)

        @smp.step
        def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
            loss = F.mse_loss(model(x), y)
            model.backward(loss)
            return loss

        for step in range(3):
            batches = [(torch.randn(4, 4, generator=torch.Generator().manual_seed(10 * step + r)),
                        torch.randn(4, 2, generator=torch.Generator().manual_seed(99 + r)))
                       for r in range(world)]
            x, y = batches[smp.dp_rank()]  # each replica its own shard
            opt.zero_grad()
            train_step(dm, x, y)
            opt.step()
            ref_opt.zero_grad()
            F.mse_loss(ref(torch.cat([b[0] for b in batches])),
                       torch.cat([b[1] for b in batches])).backward()
            ref_opt.step()
        diff = max(float((a - b).abs().max()) for a, b in zip(dm.parameters(),
                                                                 ref.parameters()))
        return {"diff": diff, "dp": (smp.dp_rank(), smp.dp_size(), smp.pp_size())}
    finally:
        shutdown()


def test_ddp_replicas_train_like_one_device_on_the_whole_batch() -> None:
    results = [r.unwrap() for r in run_ranks(_ddp_job, 2)]
    assert [r["dp"] for r in results] == [(0, 2, 1), (1, 2, 1)]
    assert all(r["diff"] < 1e-6 for r in results), results


def _memory_job(rank: int, world: int, strategy: str | None = None) -> dict[str, Any]:
    import torch.nn.functional as F

    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    try:
        smp.init({"partitions": world, "microbatches": 2, "auto_partition": False,
                  "default_partition": 0, "offload_activations": strategy is None})
        model = _model("mlp", world)
        ref = copy.deepcopy(model)
        if strategy is None:
            smp.set_activation_checkpointing(model[2])
        else:  # the whole Sequential, its children grouped by the strategy
            smp.set_activation_checkpointing(model, strategy=strategy)
        dm = smp.DistributedModel(model)
        opt = smp.DistributedOptimizer(torch.optim.SGD(dm.parameters(), lr=0.1))
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)

        @smp.step
        def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
            loss = F.cross_entropy(model(x), y)
            model.backward(loss)
            return loss

        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            x, y = _batch("mlp", g)
            opt.zero_grad()
            train_step(dm, x, y)
            opt.step()
            ref_opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            ref_opt.step()
        full = dm.state_dict()
        cfg = dm.pipeline.plan.config
        outlined = sum(1 for n in dm.pipeline.program.module.graph.nodes
                       if n.op == "call_function" and getattr(n.target, "__name__", "")
                       .startswith("checkpointed_region"))
        return {"diff": max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items()),
                "checkpointing": cfg.checkpointing, "offload": cfg.offload_activations,
                "outlined": outlined}
    finally:
        shutdown()


def test_activation_checkpointing_and_offload_reach_the_plan_and_train_the_same() -> None:
    for r in [r.unwrap() for r in run_ranks(_memory_job, 2)]:
        assert r["diff"] < 1e-5 and r["checkpointing"] == ("2",) and r["offload"]


@pytest.mark.parametrize(("strategy", "regions"), [
    ("group_2", ("0+1", "2+3", "4+5", "6")), ("contiguous", ("0+1+2+3+4+5+6",))])
def test_sequential_checkpointing_strategies_group_children_and_train_the_same(
        strategy: str, regions: tuple[str, ...]) -> None:
    """SMP's ``group_N`` and ``contiguous``: runs of a Sequential's children recomputed as one
    region (per stage), training as the plain model does."""
    for r in [r.unwrap() for r in run_ranks(_memory_job, 2, strategy)]:
        assert r["diff"] < 1e-5 and r["checkpointing"] == regions and r["outlined"] >= 1, r


def test_unknown_checkpointing_strategy_is_a_named_error() -> None:
    import modelparallel.torch as smp
    from modelparallel.errors import ConfigError

    with pytest.raises(ConfigError, match="'each', 'contiguous' or 'group_N'"):
        smp.set_activation_checkpointing(nn.Sequential(nn.Linear(2, 2)), strategy="group_0")


def _hf_job(rank: int, world: int, pipeline: str, name: str = "gpt2") -> dict[str, Any]:
    import modelparallel.torch as smp
    from modelparallel import models
    from modelparallel.torch.state_mod import shutdown

    try:
        smp.init({"partitions": world, "microbatches": 2, "pipeline": pipeline})
        case = (models.gpt2("tiny", batch_size=4, seq_len=16) if name == "gpt2"
                else models.encoder_decoder(batch_size=4, seq_len=8))
        ref = copy.deepcopy(case.model)
        dm = smp.DistributedModel(case.model)
        opt = smp.DistributedOptimizer(torch.optim.AdamW(dm.parameters(), lr=1e-3))
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)

        @smp.step
        def train_step(model: Any, args: Any, kwargs: Any, target: Any) -> Any:
            out = model(*args, **kwargs)  # a Hugging Face ModelOutput on every rank
            loss = case.loss_fn(out, target)
            model.backward(loss)
            return out, loss

        losses, ref_losses = [], []
        for step in range(2):
            args, kwargs, target = case.make_batch(4, step)
            opt.zero_grad()
            out, loss = train_step(dm, args, kwargs, target)
            opt.step()
            losses.append(float(loss.reduce_mean()))
            ref_opt.zero_grad()
            ref_loss = case.loss_fn(ref(*args, **kwargs), target)
            ref_loss.backward()
            ref_opt.step()
            ref_losses.append(float(ref_loss))
        full = dm.state_dict()
        diff = max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items())
        return {"losses": losses, "ref": ref_losses, "diff": diff,
                "logits": tuple(out["logits"].concat().shape)}
    finally:
        shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["interleaved", "simple"])
@pytest.mark.parametrize("name", ["gpt2", "encoder-decoder"])
def test_hf_models_on_two_ranks_train_like_one_device(pipeline: str, name: str) -> None:
    for r in [r.unwrap() for r in run_ranks(_hf_job, 2, pipeline, name, timeout=300)]:
        assert r["losses"] == pytest.approx(r["ref"], abs=1e-5) and r["diff"] < 1e-5
        assert r["logits"][0] == 4


def _four_job(rank: int, world: int, pipeline: str) -> dict[str, Any]:
    """The issue's parity models on 4 ranks in one pool call: MLP, CNN (manual placement, one
    layer per stage), GPT-2 tiny and an encoder-decoder (placed by the ILP)."""
    return {"mlp": _parity_job(rank, world, "mlp", pipeline, "adamw", 2),
            "cnn": _parity_job(rank, world, "cnn", pipeline, "sgd", 2),
            "gpt2": _hf_job(rank, world, pipeline, "gpt2"),
            "encoder-decoder": _hf_job(rank, world, pipeline, "encoder-decoder")}


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["interleaved", "simple"])
def test_four_ranks_train_like_one_device(pipeline: str) -> None:
    results = [r.unwrap() for r in run_ranks(_four_job, 4, pipeline, timeout=600)]
    for name in ("mlp", "cnn", "gpt2", "encoder-decoder"):
        for r in results:
            assert r[name]["losses"] == pytest.approx(r[name]["ref"], abs=1e-5), name
            assert r[name]["diff"] < 1e-5, name
    for name in ("mlp", "cnn"):
        assert all(r[name]["local"] for r in results), name  # every stage holds parameters
        assert results[0][name]["eval_diff"] < 1e-5


def _autocast_job(rank: int, world: int) -> dict[str, Any]:
    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    try:
        smp.init({"partitions": world, "microbatches": 2, "auto_partition": False,
                  "default_partition": 0})
        model = _model("mlp", world)
        ref = copy.deepcopy(model)
        dm = smp.DistributedModel(model)

        @smp.step
        def forward(model: Any, x: torch.Tensor) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x)

        x, _ = _batch("mlp", torch.Generator().manual_seed(4))
        with torch.no_grad():
            out = forward(dm, x).concat()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                expected = ref(x)
            plain = ref(x)
        return {"dtype": str(out.dtype), "diff": float((out.float() - expected.float()).abs().max()),
                "vs_fp32": float((out.float() - plain).abs().max())}
    finally:
        shutdown()


def test_autocast_in_the_step_applies_on_every_stage() -> None:
    for r in [r.unwrap() for r in run_ranks(_autocast_job, 2)]:
        assert r["dtype"] == "torch.bfloat16" and r["diff"] == 0.0 and r["vs_fp32"] > 0


def _hybrid_job(rank: int, world: int) -> dict[str, Any]:
    """pp 2 × dp 2 (cluster placement: replica 0 = ranks 0, 1; replica 1 = ranks 2, 3)."""
    import torch.nn.functional as F

    import modelparallel.torch as smp
    from modelparallel.torch.state_mod import shutdown

    try:
        smp.init({"pipeline_parallel_degree": 2, "microbatches": 2, "ddp": True,
                  "auto_partition": False, "default_partition": 0})
        model = _model("mlp", 2)
        ref = copy.deepcopy(model)
        dm = smp.DistributedModel(model)
        opt = smp.DistributedOptimizer(torch.optim.AdamW(dm.parameters(), lr=1e-2))
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)

        @smp.step
        def train_step(model: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
            loss = F.cross_entropy(model(x), y)
            model.backward(loss)
            return loss

        losses = []
        for step in range(2):
            shards = [_batch("mlp", torch.Generator().manual_seed(10 * step + d))
                      for d in range(smp.dp_size())]
            x, y = shards[smp.dp_rank()]
            if smp.pp_rank() != 0:
                x, y = torch.zeros(x.shape[0], 0), torch.zeros_like(y)
            opt.zero_grad()
            losses.append(float(train_step(dm, x, y).reduce_mean()))
            opt.step()
            ref_opt.zero_grad()  # one device, the replicas' batches concatenated
            F.cross_entropy(ref(torch.cat([s[0] for s in shards])),
                            torch.cat([s[1] for s in shards])).backward()
            ref_opt.step()
        full = dm.state_dict()
        diff = max(float((full[k] - v).abs().max()) for k, v in ref.state_dict().items())
        ranks = {"pp": (smp.pp_rank(), smp.pp_size()), "dp": (smp.dp_rank(), smp.dp_size()),
                 "mp": (smp.mp_rank(), smp.mp_size()), "rdp": (smp.rdp_rank(), smp.rdp_size()),
                 "tp": (smp.tp_rank(), smp.tp_size()), "groups": (
                     smp.get_pp_group(), smp.get_dp_group(), smp.get_mp_group(),
                     smp.get_rdp_group(), smp.get_tp_group())}
        # object communication across ranks and groups
        if smp.pp_rank() == 0:
            smp.send({"from": rank}, 1, smp.RankType.PP_RANK)
            got = None
        else:
            got = smp.recv_from(0, smp.RankType.PP_RANK)
        if smp.dp_rank() == 0:
            smp.broadcast(f"dp{rank}", smp.DP_GROUP)
            heard = None
        else:
            heard = smp.recv_from(0, smp.RankType.DP_RANK)
        gathered = smp.allgather(rank * 10, smp.WORLD)
        tensors = smp.allgather(torch.tensor([rank]), smp.PP_GROUP)
        smp.barrier()
        smp.dp_barrier()
        smp.pp_barrier()
        from modelparallel.errors import UnsupportedFeatureError

        with dm.join(throw_on_early_termination=True):  # the runtime's uneven check
            pass
        try:
            dm.join()
            join_refused = False
        except UnsupportedFeatureError:
            join_refused = True
        return {"diff": diff, "join_refused": join_refused, "losses": losses, "ranks": ranks, "got": got, "heard": heard,
                "gathered": gathered, "tensors": [int(t) for t in tensors],
                "local": sorted(n for n, _ in dm.local_named_parameters())}
    finally:
        shutdown()


@pytest.mark.slow
def test_pipeline_times_data_parallel_trains_like_one_device_on_the_whole_batch() -> None:
    """pp 2 × dp 2 through the SMP API on 4 gloo ranks: training equals one device on the
    concatenated batch; rank queries, groups and object communication on that layout."""
    r = [x.unwrap() for x in run_ranks(_hybrid_job, 4, timeout=300)]
    assert all(x["diff"] < 1e-5 for x in r), [x["diff"] for x in r]
    assert all(x["join_refused"] for x in r)  # DDP's shadowed uneven steps: named
    assert r[0]["losses"] == r[1]["losses"] and r[2]["losses"] == r[3]["losses"]
    assert r[0]["losses"] != r[2]["losses"]  # each replica trains on its own shard
    assert r[0]["local"] == r[2]["local"] and r[1]["local"] == r[3]["local"]
    assert [x["ranks"]["pp"] for x in r] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [x["ranks"]["dp"] for x in r] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [x["ranks"]["mp"] for x in r] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [x["ranks"]["rdp"] for x in r] == [x["ranks"]["dp"] for x in r]
    assert all(x["ranks"]["tp"] == (0, 1) for x in r)
    assert [x["ranks"]["groups"] for x in r] == [
        ([0, 1], [0, 2], [0, 1], [0, 2], [0]), ([0, 1], [1, 3], [0, 1], [1, 3], [1]),
        ([2, 3], [0, 2], [2, 3], [0, 2], [2]), ([2, 3], [1, 3], [2, 3], [1, 3], [3])]
    assert [x["got"] for x in r] == [None, {"from": 0}, None, {"from": 2}]
    assert [x["heard"] for x in r] == [None, None, "dp0", "dp1"]
    assert all(x["gathered"] == [0, 10, 20, 30] for x in r)
    assert [x["tensors"] for x in r] == [[0, 1], [0, 1], [2, 3], [2, 3]]
