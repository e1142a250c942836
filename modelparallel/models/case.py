"""The :class:`ModelCase` every reference-model factory returns, and the factories' helpers.

See Note [reference model conventions] in :mod:`modelparallel.models`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelparallel.errors import ConfigError

__all__ = ["Batch", "ModelCase", "class_loss", "mse_loss", "token_loss"]

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
