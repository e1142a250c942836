"""The state-dict half of :class:`modelparallel.Pipeline`: this rank's parameters, and the full
model's state dict gathered from or loaded into the stages (keys of the original model, every
alias of a tied weight).

:class:`StateDictMethods` is a mixin of :class:`~modelparallel.api.Pipeline`; it reads the
pipeline's traced model, stage programs and communicator.

Example:
    >>> import torch
    >>> import modelparallel
    >>> pipe = modelparallel.pipeline(torch.nn.Linear(4, 2), torch.randn(4, 4),
    ...                               loss_fn=torch.nn.functional.mse_loss)
    >>> sorted(pipe.state_dict())
    ['bias', 'weight']
    >>> pipe.load_state_dict(pipe.state_dict())
    LoadResult(missing_keys=[], unexpected_keys=[])
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from modelparallel.errors import ConfigError

__all__ = ["LoadResult", "StateDictMethods"]


class LoadResult(NamedTuple):
    """What :meth:`Pipeline.load_state_dict` did on this rank (like torch's
    ``_IncompatibleKeys``).

    Attributes:
        missing_keys: This stage's tensors the state dict had no value for.
        unexpected_keys: State dict keys that name no tensor of the model.
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


class StateDictMethods:
    """Parameters and state dicts of a pipeline's stage (mixed into
    :class:`~modelparallel.api.Pipeline`, whose attributes it reads)."""

    model: nn.Module
    stage: int
    programs: tuple[Any, ...]
    traced: Any
    _comm: Any

    def _require(self) -> Any:  # pragma: no cover - Pipeline's
        raise NotImplementedError

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's parameters (give them to the optimizer)."""
        self._require()
        return (p for _, p in self.named_parameters())

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters with their qualified names in the original model."""
        self._require()
        found: dict[int, tuple[str, nn.Parameter]] = {}
        for program in self.programs:  # a rank's virtual stages: each tensor once
            for name, p in program.module.named_parameters():
                found.setdefault(id(p), (name, p))
        return iter(list(found.values()))

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's parameters and buffers, keyed as in the original model's state dict
        (every alias of a tied weight included), detached."""
        self._require()
        held = self._held_canonical()
        out: dict[str, torch.Tensor] = {}
        for key in self.model.state_dict(keep_vars=True):
            canon = self._canonical(key)
            if canon in held:
                out[key] = held[canon].detach()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full model's state dict, gathered from every rank (CPU tensors).

        Collective: every rank must call it (then save on one: ``sd = pipe.state_dict()``,
        then ``if rank == 0: torch.save(sd, path)``); called on one rank only, it waits for
        the others until the timeout.

        Tensors no stage holds (parameters no operation reads) come from the local model.
        """
        self._require()
        local = {k: v.cpu() for k, v in self.local_state_dict().items()}
        parts = self._comm.all_gather_object(
            local, "the other ranks' parts of the state dict (state_dict() is collective: call "
            "it on every rank, not under 'if rank == 0')") if self._comm else [local]
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            for k, v in part.items():
                merged.setdefault(k, v)
        full: dict[str, torch.Tensor] = {}
        for key, value in self.model.state_dict().items():
            if key in merged:
                full[key] = merged[key]
            else:  # read by no operation: the local model's (still meta if it was built so)
                full[key] = value.detach() if value.is_meta else value.detach().cpu()
        return full

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True
                        ) -> LoadResult:
        """Load this stage's tensors from a full or partial state dict (keys of the original
        model, any alias of a tied weight). Local: each rank loads its own stage.

        Args:
            state_dict: The state dict (``torch.load`` of :meth:`state_dict`'s or of the
                original model's).
            strict: Like torch: refuse a state dict that lacks one of this stage's tensors or
                has keys the model does not know. ``False``: load what matches, warn about
                the rest and return it.

        Returns:
            The missing and unexpected keys (both empty when ``strict``).

        Raises:
            ConfigError: with ``strict=True`` if a tensor of this stage has no value or a key
                names no tensor of the model; on a shape mismatch.
        """
        self._require()
        aliases: dict[str, list[str]] = {}
        known = set(self.model.state_dict(keep_vars=True))
        for key in known:
            aliases.setdefault(self._canonical(key), []).append(key)
        missing: list[str] = []
        with torch.no_grad():
            for canon, tensor in self._held_canonical().items():
                keys = [k for k in [canon, *sorted(aliases.get(canon, []))] if k in state_dict]
                if not keys:
                    missing.append(canon)
                    continue
                value = state_dict[keys[0]]
                if tuple(value.shape) != tuple(tensor.shape):
                    raise ConfigError(f"state dict entry {keys[0]!r} has shape "
                                      f"{tuple(value.shape)}; stage {self.stage} holds "
                                      f"{tuple(tensor.shape)}")
                tensor.copy_(value)
        unexpected = [k for k in state_dict if k not in known and k not in aliases]
        if missing or unexpected:
            text = _load_problem(missing, unexpected, self.stage)
            if strict:
                raise ConfigError(f"load_state_dict(strict=True): {text} Fix the keys, or "
                                  "pass strict=False to load what matches.")
            warnings.warn(f"load_state_dict(strict=False): {text}", RuntimeWarning,
                          stacklevel=2)
        return LoadResult(missing, unexpected)

    def _held_canonical(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for program in self.programs:
            module = program.module
            for name, t in [*module.named_parameters(remove_duplicate=False),
                            *module.named_buffers(remove_duplicate=False)]:
                out.setdefault(self._canonical(name), t)
        return out

    def _canonical(self, name: str) -> str:
        names = getattr(self.traced, "param_names", {}) or {}
        return str(names.get(name, name))


def _load_problem(missing: list[str], unexpected: list[str], stage: int) -> str:
    parts = []
    if missing:
        parts.append(f"the state dict has no value for {len(missing)} tensor(s) of stage "
                     f"{stage}, e.g. {missing[:5]}")
    if unexpected:
        parts.append(f"{len(unexpected)} key(s) name no tensor of the model, e.g. "
                     f"{unexpected[:5]}")
    text = "; ".join(parts) + "."
    for prefix in ("module.", "_orig_mod.", "model."):
        if unexpected and all(k.startswith(prefix) for k in unexpected):
            text += (f" Every unexpected key starts with {prefix!r} (saved from a wrapped "
                     f"model?): strip it, e.g. {{k.removeprefix({prefix!r}): v for k, v in "
                     "sd.items()}.")
            break
    return text
