"""Tracing (modelparallel/tracer/tracing.py): both tracer paths, the IR they build, the traced
model's contract, errors and meta models (the annotations: tests/tracer/test_annotate.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from modelparallel import models
from modelparallel.errors import ConfigError, TracingError
from modelparallel.ir import Graph, OpKind
from modelparallel.tracer import TracedModel, input_device, trace

FX_MODELS = ["resnet_tiny", "unet", "inception", "skip_mlp"]
HF_MODELS = ["gpt2", "bert", "llama", "t5"]


@pytest.fixture(scope="module")
def traced() -> dict[str, tuple[models.ModelCase, TracedModel]]:
    out = {}
    for name in FX_MODELS + HF_MODELS:
        case = models.get(name)
        out[name] = (case, trace(case.model, case.args, case.kwargs))
    return out


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_outputs_and_grads(case: models.ModelCase, tm: TracedModel) -> None:
    model = case.model
    model.zero_grad(set_to_none=True)
    ref_out = model(*case.args, **case.kwargs)
    ref_loss = case.loss_fn(ref_out, case.target)
    ref_loss.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    flat = tm.gm(*tm.flatten_inputs(case.args, case.kwargs))
    assert isinstance(flat, tuple)
    out = tm.unflatten_outputs(flat)
    assert type(out) is type(ref_out)
    ref_leaves = torch.utils._pytree.tree_leaves(ref_out)
    out_leaves = torch.utils._pytree.tree_leaves(out)
    assert len(ref_leaves) == len(out_leaves)
    for a, b in zip(out_leaves, ref_leaves):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    loss = case.loss_fn(out, case.target)
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()  # the graph module holds the model's own parameters: grads land there
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", FX_MODELS)
def test_fx_path_matches_model(traced: dict, name: str) -> None:
    case, tm = traced[name]
    assert tm.method == "fx"
    assert tm.graph.metadata["tracer"] == "fx"
    _check_outputs_and_grads(case, tm)


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_models_fall_back_to_export(traced: dict, name: str) -> None:
    case, tm = traced[name]
    assert tm.method == "export"
    assert any(n.startswith("torch.fx failed") for n in tm.notes)
    assert tm.dynamic
    _check_outputs_and_grads(case, tm)


@pytest.mark.parametrize("name", FX_MODELS + HF_MODELS)
def test_ir_json_round_trip(traced: dict, name: str) -> None:
    _, tm = traced[name]
    g = tm.graph
    back = Graph.from_json(g.to_json())
    assert back == g
    assert back.fingerprint() == g.fingerprint()
    assert json.loads(g.to_json())["fingerprint"] == g.fingerprint()


@pytest.mark.parametrize("name", FX_MODELS + HF_MODELS)
def test_traced_model_contract(traced: dict, name: str) -> None:
    case, tm = traced[name]
    gm_nodes = {n.name: n for n in tm.gm.graph.nodes}
    # Every IR node has a gm node of the same name; the only gm nodes left out are get_attr.
    assert all(n.name in gm_nodes for n in tm.graph.nodes)
    left_out = set(gm_nodes) - {n.name for n in tm.graph.nodes}
    assert all(gm_nodes[n].op == "get_attr" for n in left_out)
    assert [n.name for n in tm.graph.placeholders] == list(tm.input_names)
    assert len(tm.input_names) == len(tm.flatten_inputs(case.args, case.kwargs))
    # gm holds the model's own tensors under the same qualified names.
    own = {**dict(case.model.named_parameters(remove_duplicate=False)),
           **dict(case.model.named_buffers(remove_duplicate=False))}
    for name_, t in (*tm.gm.named_parameters(remove_duplicate=False),
                     *tm.gm.named_buffers(remove_duplicate=False)):
        if name_ in own:
            assert t is own[name_], name_
    # Parameters in the IR are canonical; every name maps to one.
    canon = {p.name for p in tm.graph.params}
    assert all(p in canon for n in tm.graph.nodes for p in n.params)
    assert all(tm.param_names[n] in own or tm.param_names[n] in canon for n in own)
    # No device assertion or guard is left, and no fixed device constant.
    for node in tm.gm.graph.nodes:
        assert node.target != torch.ops.aten._assert_tensor_metadata.default
        assert node.target != "_guards_fn"
        assert not any(isinstance(a, torch.device) for a in (*node.args, *node.kwargs.values()))


def test_inputs_structure_is_checked(traced: dict) -> None:
    case, tm = traced["bert"]
    with pytest.raises(ConfigError, match="structured differently"):
        tm.flatten_inputs(case.args, {})


def test_export_graph_accepts_other_batch_and_sequence_sizes(traced: dict) -> None:
    case, tm = traced["gpt2"]
    ids = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(5))
    out = tm.unflatten_outputs(tm.gm(*tm.flatten_inputs((ids,))))
    torch.testing.assert_close(out.logits, case.model(ids).logits, rtol=1e-5, atol=1e-6)
    assert "input_ids[0]" in " ".join(tm.notes) and "input_ids[1]" in " ".join(tm.notes)


def test_fingerprint_stable_across_traces_and_changes_with_layers() -> None:
    a = trace(models.skip_mlp().model, models.skip_mlp().args).graph.fingerprint()
    b = trace(models.skip_mlp().model, models.skip_mlp().args).graph.fingerprint()
    assert a == b
    wider = models.skip_mlp(hidden=48)
    assert trace(wider.model, wider.args).graph.fingerprint() != a
    deeper = models.skip_mlp(depth=7)
    assert trace(deeper.model, deeper.args).graph.fingerprint() != a


def test_fingerprint_stable_for_export_path(traced: dict) -> None:
    case, tm = traced["gpt2"]
    again = trace(case.model, case.args, case.kwargs)
    assert again.graph.fingerprint() == tm.graph.fingerprint()
    other = models.gpt2("tiny", tie_embeddings=False)
    assert trace(other.model, other.args).graph.fingerprint() != tm.graph.fingerprint()


def test_gpt2_tied_embeddings_are_one_canonical_param(traced: dict) -> None:
    case, tm = traced["gpt2"]
    wte = tm.graph.param("transformer.wte.weight")
    assert wte.name == "transformer.wte.weight"
    assert wte.aliases == ("lm_head.weight",)
    assert tm.graph.param("lm_head.weight") is wte
    assert tm.param_names["lm_head.weight"] == "transformer.wte.weight"
    assert not any("lm_head.weight" in n.params for n in tm.graph.nodes)
    readers = tm.graph.tied_params()["transformer.wte.weight"]
    assert {tm.graph.node(r).module_path for r in readers} == {"transformer.wte", "lm_head"}
    assert tm.gm.get_parameter("lm_head.weight") is case.model.transformer.wte.weight
    # T5 ties three names to its shared embedding.
    t5 = traced["t5"][1].graph.param("shared.weight")
    assert set(t5.aliases) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                               "lm_head.weight"}


def test_module_paths_and_value_kinds(traced: dict) -> None:
    _, tm = traced["gpt2"]
    g = tm.graph
    paths = {n.module_path for n in g.nodes}
    assert {"transformer.h.0.attn", "transformer.h.1.mlp.c_fc", "lm_head"} <= paths
    attn = [n for n in g.nodes if n.module_path == "transformer.h.0.attn"]
    assert {n.module_type for n in attn} == {"GPT2Attention"}
    ids = g.node("input_ids")
    assert ids.outputs[0].dtype == "int64" and not ids.outputs[0].requires_grad
    logits = g.node(g.output.inputs[0])
    assert logits.outputs[0].shape == (4, 16, 256) and logits.outputs[0].requires_grad
    kinds = {n.value_kind for n in g.nodes}
    assert {"tensor", "scalar", "none"} <= kinds
    assert g.node("input_device").value_kind == "scalar"
    split = next(n for n in g.nodes if n.target == "aten.split.Tensor")
    assert split.value_kind == "tensors" and len(split.outputs) == 3
    assert g.metadata["model"] == "GPT2LMHeadModel" and g.metadata["torch"] == torch.__version__
    # The fx path records leaf modules as call_module nodes with all of the module's params.
    _, fx = traced["resnet_tiny"]
    conv = fx.graph.node("stem_0")
    assert conv.op is OpKind.CALL_MODULE and conv.module_path == "stem.0"
    assert conv.module_type == "Conv2d" and conv.params == ("stem.0.weight",)
    gn = fx.graph.node("stem_1")
    assert gn.params == ("stem.1.weight", "stem.1.bias")


def test_tracing_error_names_module_line_and_fixes() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: both tracers reject it
                return self.lin(x)
            return -x

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Linear(4, 4)
            self.block = Branchy()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.pre(x))

    model, x = Outer(), torch.randn(3, 4)
    with pytest.raises(TracingError) as info:
        trace(model, (x,))
    msg = str(info.value)
    assert "torch.fx failed in module 'block' (Branchy)" in msg
    assert "torch.export failed in module 'block' (Branchy)" in msg
    assert "if x.sum() > 0:" in msg
    assert "control flow" in msg  # fx's message
    assert "data-dependent" in msg  # export's message
    assert "leaf_modules=['block']" in msg and 'method="fx"' in msg
    # Following the advice works: the leaf module runs on the real example to annotate it.
    tm = trace(model, (x,), leaf_modules=["block"])
    assert tm.method == "fx" and tm.graph.node("block").op is OpKind.CALL_MODULE
    assert tm.graph.node("block").params == ("block.lin.weight", "block.lin.bias")
    assert any("for real" in n for n in tm.notes)
    torch.testing.assert_close(tm.gm(x)[0], model(x))
    assert trace(model, (x,), leaf_modules=[Branchy]).method == "fx"
    with pytest.raises(TracingError, match='try method="auto"'):
        trace(model, (x,), method="export")


def test_bad_arguments_raise_config_errors() -> None:
    lin = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="unknown tracing method"):
        trace(lin, (torch.zeros(1, 2),), method="jit")
    with pytest.raises(ConfigError, match="not a submodule"):
        trace(lin, (torch.zeros(1, 2),), leaf_modules=["nope"])
    with pytest.raises(ConfigError, match=r"nn\.Module"):
        trace(lambda x: x, (torch.zeros(1, 2),))  # type: ignore[arg-type]


def test_export_on_request_and_fx_graph_equivalence() -> None:
    case = models.skip_mlp()
    fx = trace(case.model, case.args)
    ex = trace(case.model, case.args, method="export")
    assert (fx.method, ex.method) == ("fx", "export")
    torch.testing.assert_close(ex.gm(*case.args)[0], fx.gm(*case.args)[0])
    assert fx.graph.total_flops == ex.graph.total_flops
    assert ex.graph.num_parameters == fx.graph.num_parameters == case.num_parameters


def test_kwargs_non_tensor_inputs_and_nested_outputs() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, extra: dict, scale: float = 1.0,
                    flag: bool = False) -> dict:
            y = self.lin(x) * scale + extra["b"]
            return {"y": y, "parts": (y.relu(), x + 1)}

    m = M()
    x, b = torch.randn(3, 4), torch.randn(4)
    kwargs = {"flag": True, "extra": {"b": b}, "scale": 2.0}
    for method in ("fx", "export"):
        tm = trace(m, (x,), kwargs, method=method)
        flat = tm.flatten_inputs((x,), kwargs)
        assert len(flat) == len(tm.input_names) == 4  # x, flag, b, scale (user order)
        out = tm.unflatten_outputs(tm.gm(*flat))
        ref = m(x, **kwargs)
        torch.testing.assert_close(out["y"], ref["y"])
        torch.testing.assert_close(out["parts"][1], ref["parts"][1])
        kinds = [tm.graph.node(n).value_kind for n in tm.input_names]
        assert kinds == ["tensor", "scalar", "tensor", "scalar"], method


def test_hf_kv_cache_is_turned_off_and_config_restored() -> None:
    case = models.gpt2("tiny")
    case.model.config.use_cache = True
    tm = trace(case.model, case.args)
    assert case.model.config.use_cache is True
    out = tm.unflatten_outputs(tm.gm(*case.args))
    assert getattr(out, "past_key_values", None) is None
    assert any("use_cache=False" in n for n in tm.notes)


def test_meta_model_traces_with_run_time_device() -> None:
    case = models.gpt2("tiny", device="meta")
    tm = trace(case.model, case.args)
    assert next(tm.gm.parameters()).device.type == "meta"
    assert tm.graph.node(tm.graph.output.inputs[0]).outputs[0].shape == (4, 16, 256)
    uses = [n for n in tm.gm.graph.nodes if input_device in (n.target,)]
    assert len(uses) == 1 and any("input_device" in n for n in tm.notes)
    for node in tm.gm.graph.nodes:
        assert not any(isinstance(a, torch.device) for a in (*node.args, *node.kwargs.values()))
    # The same parameters as on CPU (HF code may branch on the device type, e.g. GPT-2 adds
    # a `contiguous` off CPU, so the op graphs need not be identical).
    cpu = trace(models.gpt2("tiny").model, case.args).graph
    assert [(p.name, p.shape, p.aliases) for p in cpu.params] == \
        [(p.name, p.shape, p.aliases) for p in tm.graph.params]


_BIG_META = textwrap.dedent("""
    import resource, torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from modelparallel.tracer import trace
    cfg = GPT2Config(n_layer=12, n_embd=8192, n_head=64, use_cache=False,
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tm = trace(model, (ids,))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(tm.graph.num_parameters, (after - before) * 1024, tm.method, len(tm.graph))
""")


def test_ten_billion_parameter_meta_model_traces_without_allocating() -> None:
    # A fresh process, so the peak RSS measured is this trace's alone.
    res = subprocess.run([sys.executable, "-c", _BIG_META], capture_output=True, text=True,
                         timeout=240, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    params, growth, method, nodes = res.stdout.split()[-4:]
    assert int(params) > 10e9  # 40 GB of fp32 weights if they were allocated
    assert int(growth) < 2 * 2**30
    assert method == "export" and int(nodes) > 500
