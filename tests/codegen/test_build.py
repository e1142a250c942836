"""Building one graph module per stage (modelparallel/codegen/build.py), checked through the
single-process pipeline.

The strongest check of codegen is numerical: running the generated stages as a pipeline
(``LocalPipeline``) must give the loss and every parameter gradient of single-module training on
the same batch, for several models, stage counts, placements and microbatch counts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from _stage_cases import RTOL, Case, assignable, make_plan, rel_err
from torch import nn

from modelparallel import models
from modelparallel.codegen import StageProgram, build_stage, build_stages, stage_source
from modelparallel.errors import ConfigError, PlanFormatError, PlanMismatchError
from modelparallel.ir import OpKind, input_derived_nodes
from modelparallel.partitioner import evaluate_assignment
from modelparallel.plan import Plan, PlanConfig
from modelparallel.runtime.local import LocalPipeline
from modelparallel.tracer import TracedModel, trace

# -- helpers ----------------------------------------------------------------------------------------


def check_parity(c: Case, stages: tuple[StageProgram, ...], microbatches: int,
                 schedule: str = "gpipe") -> None:
    """LocalPipeline's loss and every gradient equal single-module training."""
    c.reset()
    pipe = LocalPipeline(stages, microbatches=microbatches, loss_fn=c.case.loss_fn,
                         schedule=schedule)
    loss, out = pipe.train_step(c.flat, c.case.target)
    ref_out = c.reference(*c.case.args, **c.case.kwargs)
    ref_loss = c.case.loss_fn(ref_out, c.case.target)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= RTOL * abs(ref_loss.item())
    ref = dict(c.reference.named_parameters())
    checked = 0
    for name, p in c.model.named_parameters():
        if ref[name].grad is None:
            assert p.grad is None or float(p.grad.abs().max()) == 0.0, name
            continue
        assert p.grad is not None, f"{name} got no gradient through the pipeline"
        assert rel_err(p.grad, ref[name].grad) <= RTOL, (name, rel_err(p.grad, ref[name].grad))
        checked += 1
    assert checked > 0
    first_out = torch.utils._pytree.tree_leaves(out)[0]
    first_ref = torch.utils._pytree.tree_leaves(ref_out)[0]
    assert rel_err(first_out, first_ref.detach()) <= RTOL


def split_blocks(traced: TracedModel, plan: Plan) -> set[str]:
    """Modules (paths cut to two levels below a container) whose nodes sit on several stages."""
    stages_of: dict[str, set[int]] = {}
    for n in traced.graph.nodes:
        stage = plan.assignment[n.name]
        parts = n.module_path.split(".")
        if stage >= 0 and len(parts) >= 3:
            stages_of.setdefault(".".join(parts[:3]), set()).add(stage)
    return {m for m, s in stages_of.items() if len(s) > 1}


def crossings(stages: tuple[StageProgram, ...]) -> dict[str, int]:
    """How many boundaries each value crosses."""
    out: dict[str, int] = {}
    for s in stages:
        for v in s.send:
            out[v.name] = out.get(v.name, 0) + 1
    return out


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: one intra-op thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2() -> Case:
    return Case(lambda: models.gpt2(size="tiny", batch_size=8))


@pytest.fixture(scope="module")
def resnet() -> Case:
    return Case(lambda: models.resnet_tiny(batch_size=8))


@pytest.fixture(scope="module")
def skip() -> Case:
    return Case(lambda: models.skip_mlp(batch_size=8))


@pytest.fixture(scope="module")
def t5() -> Case:
    return Case(lambda: models.t5(size="tiny", batch_size=8))


CASES = ["gpt2", "resnet", "skip", "t5"]
PLANS: list[tuple[int, str | list[float]]] = [
    (2, "ilp"),
    (3, [0.3, 0.55]),
    (4, [0.1, 0.45, 0.8]),
]


# -- parity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(("p", "how"), PLANS, ids=["p2-ilp", "p3-cuts", "p4-cuts"])
def test_gradient_parity(name: str, p: int, how: str | list[float],
                         request: pytest.FixtureRequest) -> None:
    c: Case = request.getfixturevalue(name)
    plan = make_plan(c.traced, p, how)
    stages = build_stages(c.traced, plan)
    assert len(stages) == p
    if how != "ilp" and name != "skip":
        assert split_blocks(c.traced, plan), "the cuts should fall inside a block"
    check_parity(c, stages, microbatches=1, schedule="gpipe")
    check_parity(c, stages, microbatches=4, schedule="1f1b" if p % 2 else "gpipe")


def test_skip_value_crosses_two_boundaries_relayed(skip: Case) -> None:
    plan = make_plan(skip.traced, 4, [0.1, 0.45, 0.8], communication="relay")
    stages = build_stages(skip.traced, plan)
    relayed = {v for v, n in crossings(stages).items() if n >= 2}
    assert relayed, "the split should relay a value through a middle stage"
    for v in relayed:
        middle = [s for s in stages if v in {b.name for b in s.recv} and v in
                  {b.name for b in s.send}]
        assert middle, f"{v} must be an explicit input and output of the stage it crosses"
    assert all(dst == s.index + 1 for s in stages for dst, _ in s.dests)
    check_parity(skip, stages, microbatches=4, schedule="1f1b")


def test_skip_value_goes_straight_to_its_reader(skip: Case) -> None:
    """Note [direct communication]: the skip value leaves its stage once per reading stage,
    and the stages in between neither receive nor send it."""
    plan = make_plan(skip.traced, 4, [0.1, 0.45, 0.8])
    stages = build_stages(skip.traced, plan)
    skips = [(s.index, dst, v) for s in stages for dst, vs in s.dests if dst > s.index + 1
             for v in vs]
    assert skips, "the split should send a value past a stage"
    for src, dst, v in skips:
        assert v in dict(stages[dst].sources)[src]
        for mid in stages[src + 1:dst]:
            assert v not in {b.name for b in (*mid.recv, *mid.send)}
    for s in stages:
        assert [v.name for v in s.recv] == [v for _, vs in s.sources for v in vs]
        assert crossings((s,)) == {v.name: 1 for v in s.send}, "each value is sent once"
    for schedule, m in [("gpipe", 4), ("1f1b", 4), ("zb-h1", 4), ("1f1b", 1)]:
        check_parity(skip, stages, microbatches=m, schedule=schedule)


@pytest.mark.parametrize("communication", ["direct", "relay"])
def test_t5_skips_parity(t5: Case, communication: str) -> None:
    """T5's encoder output is read by every decoder layer: a value with several readers
    several stages later."""
    plan = make_plan(t5.traced, 4, [0.1, 0.45, 0.8], communication=communication)
    stages = build_stages(t5.traced, plan)
    far = [dst for s in stages for dst, _ in s.dests if dst > s.index + 1]
    assert bool(far) == (communication == "direct")
    check_parity(t5, stages, microbatches=4, schedule="1f1b")
    check_parity(t5, stages, microbatches=2, schedule="zb-h1")


# Adam divides by sqrt(v) + eps: a gradient that is mathematically zero but ~1e-11 in floating
# point (GPT-2's key bias: softmax ignores a constant added to every key) becomes an update of
# +-lr whose sign depends on the summation order, which microbatching changes. With one
# microbatch the pipeline computes bitwise the same gradients, so the default eps is used; with
# four, eps=1e-6 keeps such noise from being amplified (real gradients here are >= 1e-5).
@pytest.mark.parametrize(("optimizer", "microbatches"), [("sgd", 4), ("adam", 1), ("adam", 4)])
def test_training_three_steps(gpt2: Case, optimizer: str, microbatches: int) -> None:
    c = gpt2
    c.reset()
    stages = build_stages(c.traced, make_plan(c.traced, 3, [0.3, 0.7]))
    pipe = LocalPipeline(stages, microbatches=microbatches, loss_fn=c.case.loss_fn,
                         schedule="1f1b")

    def make(params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.Adam(params, lr=1e-3, eps=1e-8 if microbatches == 1 else 1e-6)

    opt, ref_opt = make(pipe.parameters()), make(c.reference.parameters())
    for step in range(3):
        args, kwargs, target = c.case.make_batch(8, step + 1)
        opt.zero_grad()
        pipe.train_step(c.traced.flatten_inputs(args, kwargs), target)
        opt.step()
        ref_opt.zero_grad()
        c.case.loss_fn(c.reference(*args, **kwargs), target).backward()
        ref_opt.step()
    ref = dict(c.reference.named_parameters())
    for name, p in c.model.named_parameters():
        assert rel_err(p.detach(), ref[name].detach()) <= RTOL, name
    c.reset()


def test_eval_step_matches_model(resnet: Case) -> None:
    stages = build_stages(resnet.traced, make_plan(resnet.traced, 3, [0.3, 0.6]))
    pipe = LocalPipeline(stages, microbatches=2, loss_fn=resnet.case.loss_fn)
    resnet.reset()
    out = pipe.eval_step(resnet.flat)
    with torch.no_grad():
        ref = resnet.reference(*resnet.case.args, **resnet.case.kwargs)
    assert rel_err(out, ref) <= RTOL


# -- structure --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_stages_hold_only_their_params(name: str, request: pytest.FixtureRequest) -> None:
    c: Case = request.getfixturevalue(name)
    graph = c.traced.graph
    plan = make_plan(c.traced, 4, [0.2, 0.5, 0.75])
    stages = build_stages(c.traced, plan)
    read_by: dict[str, set[int]] = {}
    for s in stages:
        expected = {q for n in s.stage_nodes for q in graph.node(n).params}
        assert s.canonical_params() == expected, s.index
        for q in expected:
            read_by.setdefault(q, set()).add(s.index)
        for holders in s.shared_params.values():
            assert s.index in holders and len(holders) > 1
    assert set(read_by) == {q for n in graph.nodes for q in n.params}
    shared = {q for q, h in read_by.items() if len(h) > 1 and graph.param(q).trainable}
    assert shared == {q for s in stages for q in s.shared_params}
    # every node placed on a stage is computed by exactly that stage
    placed = [n for s in stages for n in s.stage_nodes]
    assert sorted(placed) == sorted(n for n, k in plan.assignment.items()
                                    if k >= 0 and graph.node(n).op is not OpKind.OUTPUT)


@pytest.mark.parametrize("name", CASES)
def test_boundary_values_are_explicit(name: str, request: pytest.FixtureRequest) -> None:
    c: Case = request.getfixturevalue(name)
    stages = build_stages(c.traced, make_plan(c.traced, 3, [0.3, 0.6]))
    derived = input_derived_nodes(c.traced.graph)
    for a in stages:
        for dst, names in a.dests:
            assert dict(stages[dst].sources)[a.index] == names
            assert names == tuple(a.send[j].name for j in a.send_indices(dst))
    for s in stages:
        placeholders = [n.name for n in s.module.graph.nodes if n.op == "placeholder"]
        inputs = [s.input_names[i] for i in s.model_inputs]
        assert placeholders == inputs + [v.name for v in s.recv]
        assert not derived & {v.name for v in s.recv}, "input-derived values are never sent"
        out = next(n for n in s.module.graph.nodes if n.op == "output")
        returned = out.args[0]
        assert len(returned) == len(s.send) + s.num_model_outputs
        assert [getattr(x, "name", None) for x in returned[:len(s.send)]] == [
            v.name for v in s.send]
    assert stages[0].recv == () and stages[-1].send == ()
    out_node = next(n for n in c.traced.gm.graph.nodes if n.op == "output")
    assert stages[-1].num_model_outputs == len(out_node.args[0])
    assert all(s.num_model_outputs == 0 for s in stages[:-1])


def test_tied_weights_are_shared_between_first_and_last_stage(gpt2: Case) -> None:
    stages = build_stages(gpt2.traced, make_plan(gpt2.traced, 3, [0.3, 0.7]))
    tied = [p for p in gpt2.traced.graph.params if p.aliases]
    assert tied, "GPT-2 tiny ties wte and lm_head"
    name = tied[0].name
    assert stages[0].shared_params.get(name) == (0, 2)
    assert stages[2].shared_params.get(name) == (0, 2)
    # one process, one traced model: both stages hold the very same parameter object
    assert stages[0].tensor(name) is stages[2].tensor(name)
    assert stages[2].tensor(tied[0].aliases[0]) is stages[2].tensor(name)


def test_non_tensor_values_cross_boundaries() -> None:
    class ShapeNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            n = h.shape[0]
            h = torch.relu(h)
            return self.b(h).reshape(n, 2, 3).sum(-1)

    torch.manual_seed(0)
    model = ShapeNet()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    traced = trace(model, (x,))
    graph = traced.graph
    names = assignable(graph)
    relu = next(n for n in names if "relu" in n)
    assignment = {n: int(names.index(n) >= names.index(relu)) for n in names}
    plan = evaluate_assignment(graph, PlanConfig(partitions=2), "cpu", assignment)
    stages = build_stages(traced, plan)
    kinds = {v.name: v.kind for v in stages[1].recv}
    assert "scalar" in kinds.values(), kinds
    pipe = LocalPipeline(stages, microbatches=4, loss_fn=nn.functional.mse_loss)
    loss, _ = pipe.train_step([x], y)
    ref_loss = nn.functional.mse_loss(ref(x), y)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= RTOL * ref_loss.item()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= RTOL, n


class ViewWrite(nn.Module):
    """Writes its input in place through a view (codegen does not see through views)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[:, :2].mul_(2.0)
        return x


@pytest.mark.parametrize("inplace", [nn.ReLU(inplace=True), ViewWrite()],
                         ids=["relu-inplace", "view-write"])
def test_inplace_write_on_a_received_value(inplace: nn.Module) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), inplace, nn.Linear(7, 3))
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    traced = trace(model, (x,))
    names = assignable(traced.graph)
    cut = next(i for i, n in enumerate(names) if traced.graph.node(n).module_path.startswith("1"))
    assignment = {n: int(i >= cut) for i, n in enumerate(names)}
    stages = build_stages(traced, evaluate_assignment(traced.graph, PlanConfig(partitions=2),
                                                      "cpu", assignment))
    detected = isinstance(inplace, nn.ReLU)
    assert bool(stages[1].mutated_inputs) == detected
    pipe = LocalPipeline(stages, microbatches=2, loss_fn=nn.functional.mse_loss)
    pipe.train_step([x], y)
    nn.functional.mse_loss(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= RTOL


# -- refusals ---------------------------------------------------------------------------------------


def test_mismatched_plan_is_refused_first(skip: Case) -> None:
    plan = make_plan(skip.traced, 2, [0.5])
    other = models.skip_mlp(batch_size=8, hidden=24)
    traced_other = trace(other.model, other.args, other.kwargs)
    assert traced_other.graph.fingerprint() != skip.traced.graph.fingerprint()
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        build_stage(traced_other, plan, 0)
    with pytest.raises(PlanMismatchError):
        build_stages(traced_other, plan)
    with pytest.raises(PlanMismatchError):
        stage_source(traced_other, plan, 1)


def test_invalid_placements_are_refused(skip: Case) -> None:
    plan = make_plan(skip.traced, 2, [0.5])
    names = assignable(skip.traced.graph)
    # a consumer before its producer
    swapped = {n.name: (0 if n.name == names[-2] else n.stage) for n in plan.nodes}
    bad = plan.replace(nodes=tuple(n.__class__(**{**n.__dict__, "stage": swapped[n.name]})
                                   for n in plan.nodes))
    with pytest.raises(PlanFormatError, match="later stage"):
        build_stage(skip.traced, bad, 0)
    # a parameter-reading node marked as recomputed everywhere
    reader = next(n.name for n in skip.traced.graph.nodes if n.params)
    bad = plan.replace(nodes=tuple(
        n.__class__(**{**n.__dict__, "stage": -1 if n.name == reader else n.stage})
        for n in plan.nodes))
    with pytest.raises(PlanFormatError, match="input-derived"):
        build_stage(skip.traced, bad, 0)
    with pytest.raises(ConfigError):
        build_stage(skip.traced, plan, 2)
