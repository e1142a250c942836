"""Tests of modelparallel.models: the shared reference models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelparallel import models
from modelparallel.errors import ConfigError

TINY = {
    "gpt2": {}, "bert": {}, "llama": {}, "t5": {}, "resnet_tiny": {}, "unet": {},
    "inception": {}, "skip_mlp": {}, "encoder_decoder": {},
}


@pytest.fixture(scope="module")
def cases() -> dict[str, models.ModelCase]:
    return {name: models.get(name, **kw) for name, kw in TINY.items()}


def _leaves(case: models.ModelCase) -> list[torch.Tensor]:
    return [*case.args, *case.kwargs.values(), case.target]


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_case_runs_forward_and_backward(cases: dict[str, models.ModelCase], name: str
                                             ) -> None:
    case = cases[name]
    loss = case.loss()
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in case.model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    case.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", sorted(TINY))
def test_loss_is_a_mean_over_equal_microbatches(cases: dict[str, models.ModelCase], name: str
                                                ) -> None:
    # Note [reference model conventions]: the mean of equal microbatch losses is the full loss.
    case = cases[name]
    bs = case.args[0].shape[0]
    assert bs % 2 == 0
    full = case.loss()
    halves = []
    for sl in (slice(0, bs // 2), slice(bs // 2, bs)):
        args = tuple(a[sl] for a in case.args)
        kwargs = {k: v[sl] for k, v in case.kwargs.items()}
        halves.append(case.loss_fn(case.model(*args, **kwargs), case.target[sl]))
    torch.testing.assert_close(full, (halves[0] + halves[1]) / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_deterministic_weights_and_batches(cases: dict[str, models.ModelCase], name: str
                                           ) -> None:
    a, b = cases[name], models.get(name)
    for (na, pa), (nb, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert na == nb
        assert torch.equal(pa, pb), na
    for x, y in zip(_leaves(a), _leaves(b)):
        assert torch.equal(x, y)
    args, _, target = a.make_batch(6, 1)
    args2, _, target2 = a.make_batch(6, 1)
    assert args[0].shape[0] == 6 and target.shape[0] == 6
    assert torch.equal(args[0], args2[0]) and torch.equal(target, target2)
    other = a.make_batch(6, 2)
    assert not torch.equal(args[0], other[0][0])


def test_different_seed_gives_different_weights() -> None:
    a = models.skip_mlp(seed=0).model.embed.weight
    b = models.skip_mlp(seed=1).model.embed.weight
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(TINY))
def test_dropout_is_zero_by_default(cases: dict[str, models.ModelCase], name: str) -> None:
    model = cases[name].model
    for mod in model.modules():
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            assert mod.p == 0
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout_prob",
                    "attention_probs_dropout_prob", "attention_dropout", "dropout_rate"):
            assert getattr(cfg, key, 0.0) == 0.0, key


def test_dropout_argument_is_applied() -> None:
    case = models.gpt2("tiny", dropout=0.1)
    ps = {m.p for m in case.model.modules() if isinstance(m, nn.Dropout)}
    assert ps == {0.1}


def test_parity_models_use_per_sample_norms(cases: dict[str, models.ModelCase]) -> None:
    for name in ("resnet_tiny", "unet", "inception"):
        model = cases[name].model
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize(("factory", "low", "high"), [
    (lambda: models.gpt2("small", device="meta"), 124e6, 125e6),
    (lambda: models.gpt2("medium", device="meta"), 354e6, 356e6),
    (lambda: models.bert("base", device="meta"), 109e6, 111e6),
    (lambda: models.llama("small", device="meta"), 120e6, 150e6),
    (lambda: models.llama("1b", device="meta"), 1.0e9, 1.2e9),
    (lambda: models.t5("small", device="meta"), 60e6, 61e6),
    (lambda: models.resnet50(device="meta", batch_size=2, image_size=32), 25.5e6, 25.6e6),
    (lambda: models.unet("base", device="meta", batch_size=2, image_size=32), 30e6, 32e6),
    (lambda: models.inception("base", device="meta", batch_size=2, image_size=32), 5.5e6, 7.5e6),
])
def test_benchmark_sizes_on_meta(factory: object, low: float, high: float) -> None:
    case = factory()  # type: ignore[operator]
    assert low <= case.num_parameters <= high
    assert all(p.device.type == "meta" for p in case.model.parameters())
    # Note [reference model conventions]: meta models take real CPU inputs.
    assert all(t.device.type == "cpu" for t in _leaves(case))


def test_benchmark_defaults_are_batch_8() -> None:
    case = models.gpt2("small", device="meta")
    assert case.args[0].shape == (8, 512) and case.target.shape == (8, 512)
    img = models.resnet50(device="meta")
    assert img.args[0].shape == (8, 3, 224, 224)
    seg = models.unet("base", device="meta")
    assert seg.args[0].shape == (8, 3, 256, 256)


def test_gpt2_tied_and_untied_embeddings() -> None:
    tied = models.gpt2("tiny").model
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = models.gpt2("tiny", tie_embeddings=False).model
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_resnet50_architecture() -> None:
    model = models.resnet50(device="meta", batch_size=1, image_size=32).model
    assert isinstance(model, models.ResNet)
    blocks = [sum(1 for _ in stage) for stage in model.layers]
    assert blocks == [3, 4, 6, 3]
    assert model.fc.in_features == 2048


def test_unet_concatenates_encoder_levels() -> None:
    case = models.unet("tiny")
    model = case.model
    assert isinstance(model, models.UNet)
    seen: list[tuple[int, ...]] = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
             for b in model.down]
    cat_inputs: list[list[tuple[int, ...]]] = []
    hooks += [d.register_forward_pre_hook(lambda m, i: cat_inputs.append([tuple(i[0].shape)]))
              for d in model.dec]
    model(*case.args)
    for h in hooks:
        h.remove()
    # Each decoder level sees twice the channels of the matching encoder level (skip + upsample).
    for enc, dec in zip(reversed(seen), cat_inputs):
        assert dec[0][1] == 2 * enc[1] and dec[0][2:] == enc[2:]


def test_inception_block_concatenates_four_branches() -> None:
    block = models.InceptionBlock(8, 2, 2, 3, 2, 4, 5, "group")
    out = block(torch.randn(2, 8, 6, 6))
    assert out.shape == (2, 2 + 3 + 4 + 5, 6, 6)


def test_skip_mlp_adds_early_activation_at_the_end() -> None:
    case = models.skip_mlp()
    model = case.model
    with torch.no_grad():
        x = case.args[0]
        h0 = torch.tanh(model.embed(x))
        for layer in model.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        # With the middle zeroed, the output is head(tanh(proj(0)) + h0).
        expected = model.head(torch.tanh(model.proj.bias).expand_as(h0) + h0)
        torch.testing.assert_close(model(x), expected)


def test_registry_and_errors() -> None:
    assert models.get("gpt2-tiny").name == "gpt2-tiny"
    assert models.get("encoder_decoder").name == "encoder-decoder"
    for name in ("gpt2_small", "gpt2_medium", "bert_base", "llama_small", "t5_small",
                 "resnet50_model", "unet_base", "inception_base", "gpt2_tiny", "llama_1b"):
        assert callable(models.REGISTRY[name])
    with pytest.raises(ConfigError, match="unknown model"):
        models.get("alexnet")
    with pytest.raises(ConfigError, match="unknown gpt2 size"):
        models.gpt2("huge")
    with pytest.raises(ConfigError, match="batch_size"):
        models.skip_mlp(batch_size=0)
    with pytest.raises(ConfigError, match="positions"):
        models.gpt2("tiny", seq_len=4096)
    with pytest.raises(ConfigError, match="divisible"):
        models.unet("tiny", image_size=30)


def test_zero_argument_factories_return_cases() -> None:
    case = models.llama_1b()
    assert isinstance(case, models.ModelCase)
    assert all(p.device.type == "meta" for p in case.model.parameters())
    assert models.gpt2_tiny().name == "gpt2-tiny"
    small = models.gpt2_small(device="meta", batch_size=2, seq_len=64)
    assert small.args[0].shape == (2, 64)
