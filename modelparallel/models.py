"""Reference models: the one shared set of models for tests, benchmarks, examples and the CLI.

Every factory returns a :class:`ModelCase`: the model, one example batch, a target, a loss and a
way to make more batches. Factories share the keyword arguments ``batch_size``, ``seed``
(``torch.manual_seed(seed)`` before building, so weights are deterministic) and ``device``.

Note [reference model conventions]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
- **Dropout is 0** by default (``dropout=0.0``), so pipelined training can be compared
  bit-for-bit with single-device training.
- **Losses are means over the batch** (over every token of every sample for language models,
  every pixel for segmentation), with the same number of terms per sample, so the mean of
  equal-sized microbatch losses equals the full-batch loss.
- **Normalisation**: models meant for parity tests (``resnet_tiny``, the ``tiny`` sizes of
  ``unet`` and ``inception``) use GroupNorm, which is per sample: BatchNorm in training mode
  normalises over the microbatch, so a pipeline with microbatches would not match single-device
  training of the full batch. ``resnet50`` and the ``base`` sizes use BatchNorm (the real
  architectures); pass ``norm="group"`` to change that.
- **device="meta"** builds the model on the meta device (no weight memory: a 1B-parameter Llama
  costs nothing); the example inputs and targets stay real CPU tensors, so the same batch can be
  fed once the model is materialised. :func:`modelparallel.tracer.trace` traces meta models with
  meta copies of the inputs.
- Hugging Face models are built from ``transformers`` configs (no download), imported inside the
  factories; torchvision is not used.

Example:
    >>> case = get("skip_mlp", batch_size=4)
    >>> case.loss().item() > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelparallel.errors import ConfigError

__all__ = [
    "REGISTRY",
    "DecoderBlock",
    "GPTDecoder",
    "ModelCase",
    "bert",
    "bert_base",
    "bert_large",
    "bert_tiny",
    "decoder_parameters",
    "encoder_decoder",
    "get",
    "gpt2",
    "gpt2_medium",
    "gpt2_small",
    "gpt2_tiny",
    "gpt_decoder",
    "inception",
    "inception_base",
    "inception_tiny",
    "llama",
    "llama_1b",
    "llama_small",
    "llama_tiny",
    "resnet50",
    "resnet50_model",
    "resnet_tiny",
    "skip_mlp",
    "t5",
    "t5_small",
    "t5_tiny",
    "unet",
    "unet_base",
    "unet_tiny",
]

Batch = tuple[tuple[Any, ...], dict[str, Any], Any]


@dataclass(frozen=True)
class ModelCase:
    """A model with an example batch, a target and a loss.

    Attributes:
        name: Registry-style name, e.g. ``"gpt2-small"``.
        model: The model (training mode, dropout 0 unless asked otherwise).
        args: Example positional inputs: one full batch.
        kwargs: Example keyword inputs.
        target: Example target for ``loss_fn`` (same batch).
        loss_fn: ``loss_fn(model_output, target)`` -> scalar, mean-reduced over the batch.
        make_batch: ``(batch_size, seed) -> (args, kwargs, target)``, deterministic.
    """

    name: str
    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    target: Any
    loss_fn: Callable[[Any, Any], torch.Tensor]
    make_batch: Callable[[int, int], Batch] = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ConfigError(f"ModelCase.model must be an nn.Module, got {type(self.model)}")
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    @property
    def num_parameters(self) -> int:
        """Elements of the model's parameters (tied ones counted once)."""
        return sum(p.numel() for p in self.model.parameters())

    def loss(self) -> torch.Tensor:
        """The loss of the example batch through the model (single device, for references)."""
        return self.loss_fn(self.model(*self.args, **self.kwargs), self.target)


# -- helpers ---------------------------------------------------------------------------------


def _check_size(kind: str, size: str, sizes: Mapping[str, Any]) -> Any:
    if size not in sizes:
        raise ConfigError(f"unknown {kind} size {size!r}; choose one of {sorted(sizes)}")
    return sizes[size]


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive int, got {v!r}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _build(factory: Callable[[], nn.Module], seed: int, device: str | torch.device) -> nn.Module:
    torch.manual_seed(seed)
    dev = torch.device(device)
    if dev.type == "meta":
        with torch.device("meta"):
            model = factory()
    else:
        model = factory().to(dev)
    model.train()
    return model


def _to(batch: Batch, device: str | torch.device) -> Batch:
    dev = torch.device(device)
    if dev.type in ("meta", "cpu"):
        return batch  # Note [reference model conventions]: meta models take CPU inputs
    args, kwargs, target = batch
    move = lambda x: x.to(dev) if isinstance(x, torch.Tensor) else x  # noqa: E731
    return (tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}, move(target))


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0]
    return logits


def token_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a language model's logits against target token ids."""
    logits = _logits(output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def class_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of classification (or per-pixel segmentation) logits."""
    return F.cross_entropy(_logits(output).float(), target)


def mse_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return F.mse_loss(_logits(output), target)


def _case(name: str, model: nn.Module, make: Callable[[int, int], Batch], batch_size: int,
          seed: int, loss_fn: Callable[[Any, Any], torch.Tensor],
          device: str | torch.device) -> ModelCase:
    def make_batch(bs: int, s: int) -> Batch:
        _check_positive(batch_size=bs)
        return _to(make(bs, s), device)
    args, kwargs, target = make_batch(batch_size, seed)
    return ModelCase(name, model, args, kwargs, target, loss_fn, make_batch)


def _lm_batch(vocab: int, seq_len: int) -> Callable[[int, int], Batch]:
    """Next-token prediction: inputs are tokens 0..L-1, targets tokens 1..L of one stream."""
    def make(bs: int, seed: int) -> Batch:
        ids = torch.randint(0, vocab, (bs, seq_len + 1), generator=_gen(seed))
        return (ids[:, :-1].contiguous(),), {}, ids[:, 1:].contiguous()
    return make


# -- Hugging Face language models -------------------------------------------------------------

_GPT2 = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128),
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
    "large": dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024),
    "xl": dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024),
}


def _text_defaults(size: str, batch_size: int | None, seq_len: int | None) -> tuple[int, int]:
    if size == "tiny":
        return batch_size or 4, seq_len or 16
    return batch_size or 8, seq_len or 512


def gpt2(size: str = "tiny", *, seq_len: int | None = None, batch_size: int | None = None,
         tie_embeddings: bool = True, dropout: float = 0.0, seed: int = 0,
         device: str | torch.device = "cpu") -> ModelCase:
    """GPT-2 (``GPT2LMHeadModel``) with a next-token cross-entropy loss.

    Args:
        size: ``"tiny"`` (2 layers, width 64; tests), ``"small"`` (HF ``gpt2``, 124M),
            ``"medium"`` (``gpt2-medium``, 355M), ``"large"`` (``gpt2-large``, 774M) or
            ``"xl"`` (``gpt2-xl``, 1.56B; build it with ``device="meta"`` for planning).
        seq_len: Tokens per sample (default 16 for tiny, 512 otherwise).
        batch_size: Samples per batch (default 4 for tiny, 8 otherwise).
        tie_embeddings: Tie ``lm_head.weight`` to ``transformer.wte.weight`` (as HF does).
        dropout: Every dropout probability.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.

    Example:
        >>> case = gpt2("tiny")
        >>> case.model.lm_head.weight is case.model.transformer.wte.weight
        True
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    dims = _check_size("gpt2", size, _GPT2)
    bs, sl = _text_defaults(size, batch_size, seq_len)
    _check_positive(batch_size=bs, seq_len=sl)
    if sl > dims["n_positions"]:
        raise ConfigError(f"seq_len {sl} exceeds GPT-2 {size}'s {dims['n_positions']} positions")
    cfg = GPT2Config(**dims, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     tie_word_embeddings=tie_embeddings, bos_token_id=0, eos_token_id=0,
                     use_cache=False)
    model = _build(lambda: GPT2LMHeadModel(cfg), seed, device)
    return _case(f"gpt2-{size}", model, _lm_batch(cfg.vocab_size, sl), bs, seed, token_loss,
                 device)


_BERT = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=128),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522, max_position_embeddings=512),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, vocab_size=30522, max_position_embeddings=512),
}


def bert(size: str = "tiny", *, seq_len: int | None = None, batch_size: int | None = None,
         dropout: float = 0.0, seed: int = 0, device: str | torch.device = "cpu") -> ModelCase:
    """BERT (``BertForMaskedLM``) with a masked-language-model loss.

    The input replaces about 15% of the tokens by a mask id; the target is the original token at
    every position (so every sample contributes the same number of loss terms). The attention
    mask is passed as a keyword input.

    Args:
        size: ``"tiny"``, ``"base"`` (110M) or ``"large"`` (335M).
        seq_len: Tokens per sample (default 16 for tiny, 512 otherwise).
        batch_size: Samples per batch (default 4 for tiny, 8 otherwise).
        dropout: Every dropout probability.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    from transformers import BertConfig, BertForMaskedLM

    dims = _check_size("bert", size, _BERT)
    bs, sl = _text_defaults(size, batch_size, seq_len)
    _check_positive(batch_size=bs, seq_len=sl)
    cfg = BertConfig(**dims, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                     pad_token_id=0)
    model = _build(lambda: BertForMaskedLM(cfg), seed, device)
    vocab = cfg.vocab_size
    mask_id = vocab - 1

    def make(b: int, seed_: int) -> Batch:
        g = _gen(seed_)
        ids = torch.randint(1, vocab - 1, (b, sl), generator=g)
        masked = torch.rand(b, sl, generator=g) < 0.15
        inputs = torch.where(masked, torch.full_like(ids, mask_id), ids)
        return (inputs,), {"attention_mask": torch.ones(b, sl, dtype=torch.long)}, ids
    return _case(f"bert-{size}", model, make, bs, seed, token_loss, device)


_LLAMA = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                 max_position_embeddings=128),
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, intermediate_size=2048, vocab_size=32000,
                  max_position_embeddings=2048),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
               max_position_embeddings=2048),
    "deep": dict(hidden_size=768, num_hidden_layers=48, num_attention_heads=12,
                 num_key_value_heads=12, intermediate_size=2048, vocab_size=32000,
                 max_position_embeddings=2048),
}


def llama(size: str = "tiny", *, seq_len: int | None = None, batch_size: int | None = None,
          dropout: float = 0.0, seed: int = 0, device: str | torch.device = "cpu") -> ModelCase:
    """A Llama decoder (``LlamaForCausalLM``, untied embeddings) with a next-token loss.

    Args:
        size: ``"tiny"``; ``"small"`` (12 layers, hidden 768, ~134M, for the planner
            benchmark); ``"1b"`` (TinyLlama-1.1B shape: 22 layers, hidden 2048, GQA 32/4);
            ``"deep"`` (``"small"`` with 48 layers, ~390M: a graph of about 2,600 ops for the
            planner benchmark; build it with ``device="meta"``).
        seq_len: Tokens per sample (default 16 for tiny, 512 otherwise).
        batch_size: Samples per batch (default 4 for tiny, 8 otherwise).
        dropout: Attention dropout probability.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = _check_size("llama", size, _LLAMA)
    bs, sl = _text_defaults(size, batch_size, seq_len)
    _check_positive(batch_size=bs, seq_len=sl)
    cfg = LlamaConfig(**dims, attention_dropout=dropout, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
    model = _build(lambda: LlamaForCausalLM(cfg), seed, device)
    return _case(f"llama-{size}", model, _lm_batch(cfg.vocab_size, sl), bs, seed, token_loss,
                 device)


_T5 = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=256),
    "small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                  vocab_size=32128),
}


def t5(size: str = "tiny", *, seq_len: int | None = None, target_len: int | None = None,
       batch_size: int | None = None, dropout: float = 0.0, seed: int = 0,
       device: str | torch.device = "cpu") -> ModelCase:
    """T5 (``T5ForConditionalGeneration``, encoder-decoder, tied embeddings).

    Inputs: encoder ``input_ids`` (positional) and ``decoder_input_ids`` (keyword: the labels
    shifted right behind the start token 0). Target: the labels; loss: their mean cross-entropy.

    Args:
        size: ``"tiny"`` or ``"small"`` (HF ``t5-small``, 60M).
        seq_len: Encoder tokens per sample (default 16 for tiny, 512 otherwise).
        target_len: Decoder tokens per sample (default ``seq_len // 2``, at least 2).
        batch_size: Samples per batch (default 4 for tiny, 8 otherwise).
        dropout: Dropout probability.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    dims = _check_size("t5", size, _T5)
    bs, sl = _text_defaults(size, batch_size, seq_len)
    tl = target_len or max(2, sl // 2)
    _check_positive(batch_size=bs, seq_len=sl, target_len=tl)
    extra: dict[str, Any] = dict(dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=1, use_cache=False, tie_word_embeddings=True)
    cfg = T5Config(**dims, **extra)
    model = _build(lambda: T5ForConditionalGeneration(cfg), seed, device)
    vocab = cfg.vocab_size

    def make(b: int, seed_: int) -> Batch:
        g = _gen(seed_)
        ids = torch.randint(2, vocab, (b, sl), generator=g)
        labels = torch.randint(2, vocab, (b, tl), generator=g)
        dec = torch.cat([torch.zeros(b, 1, dtype=torch.long), labels[:, :-1]], dim=1)
        return (ids,), {"decoder_input_ids": dec}, labels
    return _case(f"t5-{size}", model, make, bs, seed, token_loss, device)


# -- CNNs and MLPs written here -----------------------------------------------------------------


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ConfigError(f"unknown norm {kind!r}; use 'batch' or 'group'")


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck block: 1x1 reduce, 3x3 (strided), 1x1 expand, residual add."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = _norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = _norm(norm, out_ch)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride,
                                                      bias=False), _norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18 style)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.n2 = _norm(norm, out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride,
                                                    bias=False), _norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks, global average pool, linear classifier."""

    def __init__(self, stages: list[nn.Module], stem: nn.Module, features: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _image_batch(channels: int, size: int, num_classes: int) -> Callable[[int, int], Batch]:
    def make(bs: int, seed: int) -> Batch:
        g = _gen(seed)
        x = torch.randn(bs, channels, size, size, generator=g)
        y = torch.randint(0, num_classes, (bs,), generator=g)
        return (x,), {}, y
    return make


def resnet50(*, image_size: int = 224, num_classes: int = 1000, batch_size: int = 8,
             norm: str = "batch", seed: int = 0, device: str | torch.device = "cpu"
             ) -> ModelCase:
    """ResNet-50 (v1.5 bottlenecks, [3, 4, 6, 3] blocks, ~25.6M parameters), cross-entropy.

    Args:
        image_size: Input height and width.
        num_classes: Classifier outputs.
        batch_size: Images per batch.
        norm: ``"batch"`` (the real architecture) or ``"group"`` (per-sample, for parity).
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.

    Example:
        >>> 25_000_000 < resnet50(batch_size=1, image_size=32, device="meta").num_parameters
        True
    """
    _check_positive(image_size=image_size, num_classes=num_classes, batch_size=batch_size)

    def build() -> nn.Module:
        stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                             _norm(norm, 64), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        stages: list[nn.Module] = []
        in_ch = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layer = []
            for i in range(blocks):
                layer.append(Bottleneck(in_ch, width, stride if i == 0 else 1, norm))
                in_ch = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        return ResNet(stages, stem, in_ch, num_classes)
    model = _build(build, seed, device)
    return _case("resnet50", model, _image_batch(3, image_size, num_classes), batch_size, seed,
                 class_loss, device)


def resnet_tiny(*, image_size: int = 16, num_classes: int = 10, width: int = 16,
                batch_size: int = 4, norm: str = "group", seed: int = 0,
                device: str | torch.device = "cpu") -> ModelCase:
    """A small ResNet-like CNN for parity tests: stem, 3 basic blocks, pool, classifier.

    Uses GroupNorm by default (per sample; Note [reference model conventions]).

    Args:
        image_size: Input height and width.
        num_classes: Classifier outputs.
        width: Channels of the first stage (doubled in the next ones).
        batch_size: Images per batch.
        norm: ``"group"`` or ``"batch"``.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    _check_positive(image_size=image_size, num_classes=num_classes, width=width,
                    batch_size=batch_size)

    def build() -> nn.Module:
        stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), _norm(norm, width),
                             nn.ReLU())
        stages: list[nn.Module] = [BasicBlock(width, width, 1, norm),
                                   BasicBlock(width, 2 * width, 2, norm),
                                   BasicBlock(2 * width, 4 * width, 2, norm)]
        return ResNet(stages, stem, 4 * width, num_classes)
    model = _build(build, seed, device)
    return _case("resnet-tiny", model, _image_batch(3, image_size, num_classes), batch_size,
                 seed, class_loss, device)


class _ConvBlock(nn.Sequential):
    """(3x3 conv, norm, ReLU) twice."""

    def __init__(self, in_ch: int, out_ch: int, norm: str) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), _norm(norm, out_ch),
                         nn.ReLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
                         _norm(norm, out_ch), nn.ReLU())


class UNet(nn.Module):
    """U-Net: an encoder of conv blocks with max-pooling and a decoder whose levels concatenate
    the matching encoder level's output (long skip connections) after a transposed-conv upsample.
    """

    def __init__(self, in_ch: int, num_classes: int, base: int, depth: int, norm: str) -> None:
        super().__init__()
        chans = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        prev = in_ch
        for c in chans[:-1]:
            self.down.append(_ConvBlock(prev, c, norm))
            prev = c
        self.pool = nn.MaxPool2d(2)
        self.bottom = _ConvBlock(chans[-2], chans[-1], norm)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c_hi, c_lo in zip(reversed(chans[1:]), reversed(chans[:-1])):
            self.up.append(nn.ConvTranspose2d(c_hi, c_lo, 2, stride=2))
            self.dec.append(_ConvBlock(2 * c_lo, c_lo, norm))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def unet(size: str = "tiny", *, image_size: int | None = None, num_classes: int = 2,
         batch_size: int | None = None, norm: str | None = None, seed: int = 0,
         device: str | torch.device = "cpu") -> ModelCase:
    """U-Net for per-pixel classification (mean cross-entropy over pixels).

    Args:
        size: ``"tiny"`` (base 8 channels, depth 3, 32x32 images, GroupNorm) or ``"base"``
            (the original: base 64, depth 4, ~31M parameters, 256x256 images, BatchNorm).
        image_size: Input height and width (a multiple of ``2**depth``).
        num_classes: Output channels.
        batch_size: Images per batch (default 4 for tiny, 8 for base).
        norm: ``"group"`` or ``"batch"`` (default per size).
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    base, depth, default_size, default_norm, default_bs = _check_size(
        "unet", size, {"tiny": (8, 3, 32, "group", 4), "base": (64, 4, 256, "batch", 8)})
    img = image_size or default_size
    bs = batch_size or default_bs
    _check_positive(image_size=img, batch_size=bs, num_classes=num_classes)
    if img % 2**depth:
        raise ConfigError(f"unet {size} needs image_size divisible by {2**depth}, got {img}")
    model = _build(lambda: UNet(3, num_classes, base, depth, norm or default_norm), seed, device)

    def make(b: int, seed_: int) -> Batch:
        g = _gen(seed_)
        return ((torch.randn(b, 3, img, img, generator=g),), {},
                torch.randint(0, num_classes, (b, img, img), generator=g))
    return _case(f"unet-{size}", model, make, bs, seed, class_loss, device)


class _ConvNormAct(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, k: int, norm: str, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=False),
                         _norm(norm, out_ch), nn.ReLU())


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-5x5; 3x3 max-pool-1x1) concatenated."""

    def __init__(self, in_ch: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int,
                 norm: str) -> None:
        super().__init__()
        self.b1 = _ConvNormAct(in_ch, c1, 1, norm)
        self.b3 = nn.Sequential(_ConvNormAct(in_ch, c3r, 1, norm), _ConvNormAct(c3r, c3, 3, norm))
        self.b5 = nn.Sequential(_ConvNormAct(in_ch, c5r, 1, norm), _ConvNormAct(c5r, c5, 5, norm))
        self.bp = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                _ConvNormAct(in_ch, cp, 1, norm))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


class Inception(nn.Module):
    """An Inception (GoogLeNet-like) classifier: stem, inception blocks with pooling, head."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], features: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


# GoogLeNet's inception configurations (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj);
# "M" is a stride-2 max-pool.
_GOOGLENET: list[Any] = [
    (192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64), "M",
    (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64),
    (512, 128, 128, 256, 24, 64, 64), (512, 112, 144, 288, 32, 64, 64),
    (528, 256, 160, 320, 32, 128, 128), "M",
    (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128),
]


def inception(size: str = "tiny", *, image_size: int | None = None, num_classes: int | None = None,
              batch_size: int | None = None, norm: str | None = None, seed: int = 0,
              device: str | torch.device = "cpu") -> ModelCase:
    """An Inception-style multi-branch CNN (parallel 1x1/3x3/5x5/pool branches, concatenated).

    Args:
        size: ``"tiny"`` (2 small blocks, 32x32, GroupNorm) or ``"base"`` (GoogLeNet: 9 blocks,
            224x224, ~6.6M parameters, BatchNorm).
        image_size: Input height and width.
        num_classes: Classifier outputs (default 10 for tiny, 1000 for base).
        batch_size: Images per batch (default 4 for tiny, 8 for base).
        norm: ``"group"`` or ``"batch"`` (default per size).
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    _check_size("inception", size, {"tiny": None, "base": None})
    tiny = size == "tiny"
    img = image_size or (32 if tiny else 224)
    classes = num_classes or (10 if tiny else 1000)
    bs = batch_size or (4 if tiny else 8)
    nk = norm or ("group" if tiny else "batch")
    _check_positive(image_size=img, num_classes=classes, batch_size=bs)

    def build() -> nn.Module:
        if tiny:
            tiny_stem = _ConvNormAct(3, 16, 3, nk)
            b1 = InceptionBlock(16, 8, 8, 16, 4, 8, 8, nk)
            b2 = InceptionBlock(b1.out_channels, 16, 8, 16, 4, 8, 8, nk)
            return Inception(tiny_stem, [b1, nn.MaxPool2d(2), b2], b2.out_channels, classes)
        stem: nn.Module = nn.Sequential(_ConvNormAct(3, 64, 7, nk, stride=2),
                             nn.MaxPool2d(3, stride=2, padding=1), _ConvNormAct(64, 64, 1, nk),
                             _ConvNormAct(64, 192, 3, nk), nn.MaxPool2d(3, stride=2, padding=1))
        blocks: list[nn.Module] = []
        features = 192
        for spec in _GOOGLENET:
            if spec == "M":
                blocks.append(nn.MaxPool2d(3, stride=2, padding=1))
            else:
                in_ch, c1, c3r, c3, c5r, c5, cp = spec
                block = InceptionBlock(in_ch, c1, c3r, c3, c5r, c5, cp, nk)
                blocks.append(block)
                features = block.out_channels
        return Inception(stem, blocks, features, classes)
    model = _build(build, seed, device)
    return _case(f"inception-{size}", model, _image_batch(3, img, classes), bs, seed,
                 class_loss, device)


class SkipMLP(nn.Module):
    """An MLP whose early activation is added back near the end.

    ``h0 = act(embed(x))``, then ``depth`` residual-free hidden layers, then
    ``head(act(proj(h)) + h0)``: split in 3-4 stages, ``h0`` jumps over the middle stages.
    """

    def __init__(self, in_features: int, hidden: int, depth: int, out_features: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.proj = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(self.embed(x))
        h = h0
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(torch.tanh(self.proj(h)) + h0)


def skip_mlp(*, in_features: int = 16, hidden: int = 32, depth: int = 6, out_features: int = 8,
             batch_size: int = 8, seed: int = 0, device: str | torch.device = "cpu"
             ) -> ModelCase:
    """:class:`SkipMLP` regressing random targets with a mean squared error.

    Args:
        in_features: Input width.
        hidden: Hidden width.
        depth: Hidden layers between the skip's ends.
        out_features: Output width.
        batch_size: Samples per batch.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    _check_positive(in_features=in_features, hidden=hidden, depth=depth,
                    out_features=out_features, batch_size=batch_size)
    model = _build(lambda: SkipMLP(in_features, hidden, depth, out_features), seed, device)

    def make(b: int, seed_: int) -> Batch:
        g = _gen(seed_)
        return ((torch.randn(b, in_features, generator=g),), {},
                torch.randn(b, out_features, generator=g))
    return _case("skip-mlp", model, make, batch_size, seed, mse_loss, device)


# -- a GPT-style decoder sized by parameter count -------------------------------------------


class DecoderBlock(nn.Module):
    """A pre-norm GPT block: causal multi-head self-attention and a 4x GELU MLP, both residual.

    Attention is ``F.scaled_dot_product_attention(..., is_causal=True)``: no mask tensor, so
    CUDA runs the causal flash kernel.
    """

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class GPTDecoder(nn.Module):
    """Token and learned position embeddings, ``layers`` :class:`DecoderBlock`, a final
    LayerNorm and an untied LM head; ``forward(input_ids) -> logits``."""

    def __init__(self, vocab_size: int, max_positions: int, hidden: int, layers: int,
                 heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Embedding(max_positions, hidden)
        self.blocks = nn.ModuleList(DecoderBlock(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def decoder_parameters(vocab_size: int, max_positions: int, hidden: int, layers: int) -> int:
    """Parameter elements of :class:`GPTDecoder` with these dimensions.

    Example:
        >>> decoder_parameters(256, 32, 64, 2) == sum(
        ...     p.numel() for p in GPTDecoder(256, 32, 64, 2, 4).parameters())
        True
    """
    per_layer = 12 * hidden * hidden + 13 * hidden
    return layers * per_layer + (2 * vocab_size + max_positions) * hidden + 2 * hidden


def _decoder_hidden(total: float) -> int:
    """A width for a decoder of about ``total`` parameters (widths of GPT-3's table)."""
    for limit, width in ((5e7, 512), (2e8, 1024), (1e9, 2048), (4e9, 2560)):
        if total < limit:
            return width
    return 4096


def gpt_decoder(params_per_gpu: float = 1.5e9, gpus: int = 1, *, hidden: int | None = None,
                layers: int | None = None, heads: int | None = None, vocab_size: int = 50304,
                seq_len: int = 2048, batch_size: int = 1, seed: int = 0,
                device: str | torch.device = "meta") -> ModelCase:
    """A GPT-style decoder (:class:`GPTDecoder`) of about ``params_per_gpu * gpus`` parameters,
    with a next-token cross-entropy loss: the model of the multi-GPU benchmark.

    The width comes from the target size (512 below 50M parameters, 1024 below 200M, 2048
    below 1B, 2560 below 4B, 4096 beyond; heads of 128 channels) unless ``hidden`` is given; the depth is the number of
    layers that brings the total closest to the target unless ``layers`` is given. Embeddings
    are untied (no parameter is shared between the first and last stage).

    Args:
        params_per_gpu: Target parameter elements per GPU.
        gpus: GPUs (pipeline stages) the model is sized for.
        hidden: Model width (default: from the target size).
        layers: Decoder blocks (default: from the target size).
        heads: Attention heads (default: ``hidden // 128``, at least 1).
        vocab_size: Vocabulary (default GPT-2's, padded to a multiple of 64).
        seq_len: Tokens per sample (also the number of learned positions).
        batch_size: Samples per batch.
        seed: Seed for the weights and the example batch.
        device: ``"meta"`` by default (the default size is 1.5B parameters: build it on the
            meta device and let each rank materialise its stage), ``"cpu"`` or another device.

    Raises:
        ConfigError: for non-positive sizes, or a width the heads do not divide.

    Example:
        >>> case = gpt_decoder(hidden=64, layers=2, heads=4, vocab_size=256, seq_len=16,
        ...                    batch_size=2, device="cpu")
        >>> tuple(case.model(*case.args).shape)
        (2, 16, 256)
        >>> big = gpt_decoder(1.5e9, gpus=8)
        >>> round(big.num_parameters / 8 / 1e9, 2)
        1.51
    """
    _check_positive(gpus=gpus, vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size)
    if params_per_gpu <= 0:
        raise ConfigError(f"params_per_gpu must be > 0, got {params_per_gpu!r}")
    total = float(params_per_gpu) * gpus
    h = hidden if hidden is not None else _decoder_hidden(total)
    n_heads = heads if heads is not None else max(1, h // 128)
    _check_positive(hidden=h, heads=n_heads)
    if h % n_heads:
        raise ConfigError(f"hidden = {h} is not divisible by heads = {n_heads}")
    if layers is None:
        fixed = decoder_parameters(vocab_size, seq_len, h, 0)
        layers = max(1, round((total - fixed) / (12 * h * h + 13 * h)))
    _check_positive(layers=layers)
    n_layers = layers
    model = _build(lambda: GPTDecoder(vocab_size, seq_len, h, n_layers, n_heads), seed, device)
    size = decoder_parameters(vocab_size, seq_len, h, n_layers)
    label = f"{size / 1e9:.2f}B" if size >= 1e9 else f"{size / 1e6:.1f}M"
    return _case(f"gpt-decoder-{label}", model, _lm_batch(vocab_size, seq_len),
                 batch_size, seed, token_loss, device)


def encoder_decoder(**kwargs: Any) -> ModelCase:
    """A tiny encoder-decoder: T5 tiny (see :func:`t5`; keyword arguments pass through)."""
    case = t5("tiny", **kwargs)
    return ModelCase("encoder-decoder", case.model, case.args, case.kwargs, case.target,
                     case.loss_fn, case.make_batch)


# -- zero-argument factories (CLI ``pkg.module:factory`` form) --------------------------------
# Callable without arguments; keyword arguments (device="meta", batch_size=...) pass through.


def gpt2_tiny(**kwargs: Any) -> ModelCase:
    """GPT-2 tiny at its test size."""
    return gpt2("tiny", **kwargs)


def gpt2_small(**kwargs: Any) -> ModelCase:
    """GPT-2 small (124M) at batch 8 x 512 tokens."""
    return gpt2("small", **kwargs)


def gpt2_medium(**kwargs: Any) -> ModelCase:
    """GPT-2 medium (355M) at batch 8 x 512 tokens."""
    return gpt2("medium", **kwargs)


def bert_tiny(**kwargs: Any) -> ModelCase:
    """BERT tiny at its test size."""
    return bert("tiny", **kwargs)


def bert_base(**kwargs: Any) -> ModelCase:
    """BERT base (110M) at batch 8 x 512 tokens."""
    return bert("base", **kwargs)


def bert_large(**kwargs: Any) -> ModelCase:
    """BERT large (335M) at batch 8 x 512 tokens."""
    return bert("large", **kwargs)


def llama_tiny(**kwargs: Any) -> ModelCase:
    """Llama tiny at its test size."""
    return llama("tiny", **kwargs)


def llama_small(**kwargs: Any) -> ModelCase:
    """The ~134M Llama-style decoder at batch 8 x 512 tokens."""
    return llama("small", **kwargs)


def llama_1b(**kwargs: Any) -> ModelCase:
    """The 1.1B Llama at batch 8 x 512 tokens, on the meta device unless ``device`` is given."""
    kwargs.setdefault("device", "meta")
    return llama("1b", **kwargs)


def t5_tiny(**kwargs: Any) -> ModelCase:
    """T5 tiny at its test size."""
    return t5("tiny", **kwargs)


def t5_small(**kwargs: Any) -> ModelCase:
    """T5 small (60M) at batch 8 x 512 encoder / 256 decoder tokens."""
    return t5("small", **kwargs)


def resnet50_model(**kwargs: Any) -> ModelCase:
    """ResNet-50 at batch 8 x 224x224."""
    return resnet50(**kwargs)


def unet_tiny(**kwargs: Any) -> ModelCase:
    """U-Net tiny at its test size."""
    return unet("tiny", **kwargs)


def unet_base(**kwargs: Any) -> ModelCase:
    """U-Net base at batch 8 x 256x256."""
    return unet("base", **kwargs)


def inception_tiny(**kwargs: Any) -> ModelCase:
    """Inception tiny at its test size."""
    return inception("tiny", **kwargs)


def inception_base(**kwargs: Any) -> ModelCase:
    """GoogLeNet-like Inception at batch 8 x 224x224."""
    return inception("base", **kwargs)


#: Every factory by name: the parametrised ones and the zero-argument ones (``-`` or ``_``).
REGISTRY: dict[str, Callable[..., ModelCase]] = {
    "gpt2": gpt2, "bert": bert, "llama": llama, "t5": t5, "resnet50": resnet50,
    "resnet_tiny": resnet_tiny, "unet": unet, "inception": inception, "skip_mlp": skip_mlp,
    "encoder_decoder": encoder_decoder, "gpt_decoder": gpt_decoder,
    "gpt2_tiny": gpt2_tiny, "gpt2_small": gpt2_small, "gpt2_medium": gpt2_medium,
    "bert_tiny": bert_tiny, "bert_base": bert_base, "bert_large": bert_large,
    "llama_tiny": llama_tiny, "llama_small": llama_small, "llama_1b": llama_1b,
    "t5_tiny": t5_tiny, "t5_small": t5_small, "resnet50_model": resnet50_model,
    "unet_tiny": unet_tiny, "unet_base": unet_base,
    "inception_tiny": inception_tiny, "inception_base": inception_base,
}


def get(name: str, **kwargs: Any) -> ModelCase:
    """Build the registered model ``name`` (``-`` and ``_`` are interchangeable).

    Raises:
        ConfigError: for an unknown name.

    Example:
        >>> get("gpt2-tiny").name
        'gpt2-tiny'
    """
    key = name.replace("-", "_")
    if key not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[key](**kwargs)
