"""The registry of reference models: zero-argument factories (CLI ``pkg.module:factory`` form),
:data:`REGISTRY` and :func:`get`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelparallel.errors import ConfigError
from modelparallel.models.case import ModelCase
from modelparallel.models.cnn import inception, resnet50, resnet_tiny, unet
from modelparallel.models.gpt import gpt_decoder
from modelparallel.models.hf import bert, encoder_decoder, gpt2, llama, t5
from modelparallel.models.mlp import skip_mlp

__all__ = [
    "REGISTRY", "bert_base", "bert_large", "bert_tiny", "get", "gpt2_medium", "gpt2_small",
    "gpt2_tiny", "inception_base", "inception_tiny", "llama_1b", "llama_small", "llama_tiny",
    "resnet50_model", "t5_small", "t5_tiny", "unet_base", "unet_tiny",
]

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
