"""Give a stage real parameters: from a state dict or checkpoint, an init function, or the
modules' own ``reset_parameters``, for this stage's tensors only.

Note [materialize]
~~~~~~~~~~~~~~~~~~
A model too large for one host is built on the meta device, traced and partitioned there; each
rank then builds its stage (which refers only to its own meta tensors, Note [stage parameters] in
``modelparallel/codegen/build.py``) and calls :func:`materialize`. Only this stage's tensors are
allocated, so a rank needs memory for its stage, not for the model.

Values, by priority:

1. ``state_dict`` (a mapping, a ``torch.save`` file, a ``.safetensors`` file, or a directory of
   ``.safetensors`` shards): only the stage's keys are read (``torch.load`` with ``mmap=True``
   pages in only what is read; safetensors reads single tensors). A tensor is found under any of
   its names: the stage's qualified names, the canonical name, or an alias of a tied weight.
2. For meta tensors the source does not hold: ``init_fn(stage_module)`` when given (it must
   initialise every such tensor, in place, deterministically for tied weights held by several
   stages); otherwise ``reset_parameters()`` of each submodule that directly holds one (the
   usual ``nn.Linear``/``nn.Embedding``/``nn.LayerNorm``/convolution initialisation, drawn from
   the global RNG).
3. Parameters still without a value (their module has no ``reset_parameters``, e.g. Hugging
   Face ``Conv1D`` or tensors read through ``get_attr`` in an exported graph, whose owners are
   plain containers) get a fallback, the GPT/BERT convention: ``normal(0, 0.02)`` for tensors
   of two or more dimensions (from a generator seeded by the parameter's canonical name, so the
   result does not depend on the rank or the order of calls), ones for one-dimensional tensors
   named ``weight``/``scale``/``gamma`` (norm scales), zeros for the rest (biases); a warning
   lists them. Pass ``init_fn`` for any other initialisation. Tied weights held by several stages
   (``StageProgram.shared_params``) always use this name-seeded fallback when neither the state
   dict nor ``init_fn`` gives them a value, so every stage's copy starts equal.
4. A meta *buffer* with no value from 1 or 2 cannot be guessed (causal masks, rotary
   frequencies): :class:`~modelparallel.errors.ConfigError` names it before anything changes.

Tensors that are already real keep their values (moved to ``device``) unless the state dict
holds them. Materializing replaces tensors in the stage module's containers and in the user
submodules it holds (which are the user model's own, so the user's model sees the real tensors
of this stage too).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modelparallel.codegen.program import StageProgram
from modelparallel.errors import ConfigError

__all__ = ["held_tensors", "materialize", "replace_tensors"]

#: Names of one-dimensional parameters that scale (norm weights): the fallback sets them to 1.
_SCALE_NAMES = frozenset({"weight", "scale", "gamma"})

StateSource = Mapping[str, torch.Tensor] | str | Path


@dataclass(frozen=True)
class _Location:
    """One place a tensor is held: ``getattr(owner, attr)``, registered as a parameter or
    buffer, reachable as ``name`` from the stage module."""

    name: str
    owner: torch.nn.Module
    attr: str
    is_param: bool


def held_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Every distinct parameter and buffer tensor of ``module`` (tied ones once), in order.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> len(held_tensors(torch.nn.ModuleList([lin, lin])))
        2
    """
    out: dict[int, torch.Tensor] = {}
    for locs in _locations(module).values():
        loc = locs[0]
        t = loc.owner._parameters[loc.attr] if loc.is_param else loc.owner._buffers[loc.attr]
        assert t is not None
        out.setdefault(id(t), t)
    return list(out.values())


def replace_tensors(module: torch.nn.Module, mapping: Mapping[int, torch.Tensor]) -> None:
    """Replace tensors by identity everywhere ``module`` holds them (keeps ties intact).

    Args:
        module: The module to edit in place (its submodules included).
        mapping: ``id(old tensor)`` to the new tensor; a new parameter must be an
            ``nn.Parameter`` where the old one was.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> new = torch.nn.Parameter(torch.zeros(2, 2))
        >>> replace_tensors(lin, {id(lin.weight): new})
        >>> lin.weight is new
        True
    """
    if not mapping:
        return
    for locs in _locations(module).values():
        for loc in locs:
            table = loc.owner._parameters if loc.is_param else loc.owner._buffers
            old = table[loc.attr]
            if old is not None and id(old) in mapping:
                table[loc.attr] = mapping[id(old)]  # type: ignore[assignment]


def materialize(program: StageProgram, device: torch.device | str = "cpu", *,
                state_dict: StateSource | None = None,
                init_fn: Callable[[torch.nn.Module], Any] | None = None,
                strict: bool = False) -> StageProgram:
    """Make the stage's parameters and buffers real on ``device`` (Note [materialize]).

    Only this stage's tensors are allocated and only its keys are read from ``state_dict``.

    Args:
        program: The stage, usually built from a model on the meta device.
        device: Where the tensors go.
        state_dict: A full or partial state dict, or a checkpoint path (``torch.save`` file,
            ``.safetensors`` file, or a directory of ``.safetensors`` shards).
        init_fn: Called as ``init_fn(program.module)`` to initialise the meta tensors the state
            dict does not hold, instead of ``reset_parameters``.
        strict: Require ``state_dict`` to hold every tensor of the stage.

    Returns:
        ``program``, changed in place.

    Raises:
        ConfigError: on a bad device or checkpoint, a shape mismatch, a missing key with
            ``strict=True``, or a meta buffer that nothing can give a value.

    Example:
        >>> import torch
        >>> from modelparallel.codegen import build_stage
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.tracer import trace
        >>> with torch.device("meta"):
        ...     model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> traced = trace(model, (torch.randn(3, 4, device="meta"),))
        >>> plan = partition(traced.graph, PlanConfig(partitions=2), "cpu")
        >>> stage = materialize(build_stage(traced, plan, 0), "cpu")
        >>> any(t.is_meta for t in stage.module.parameters())
        False
    """
    device = torch.device(device)
    if device.type == "meta":
        raise ConfigError("materialize needs a real device (e.g. 'cpu' or 'cuda:0'), not meta")
    module = program.module
    locations = _locations(module)
    tensors = {i: _tensor(locs[0]) for i, locs in locations.items()}
    with _OpenSource(state_dict) as source:
        keys = {i: _find_key(source, program, locs) for i, locs in locations.items()}
        missing = [locs[0].name for i, locs in locations.items() if keys[i] is None]
        if strict and state_dict is not None and missing:
            raise ConfigError(
                f"strict=True but the state dict has no value for {len(missing)} tensors of "
                f"stage {program.index}: {missing[:8]}; pass strict=False to initialise them")
        todo = [i for i, t in tensors.items() if t.is_meta and keys[i] is None]
        shared = {program.param_names.get(n, n) for n in program.shared_params}
        resets, fallback = _init_plan(program, locations, todo, init_fn is not None, shared)
        new = _allocate(tensors, device)
        replace_tensors(module, {i: t for i, t in new.items() if t is not tensors[i]})
        with torch.no_grad():
            if init_fn is not None and todo:
                init_fn(module)
            for owner in resets:
                owner.reset_parameters()  # type: ignore[operator]
            if fallback:
                _fallback_init(program, locations, new, fallback)
            for i, key in keys.items():
                if key is not None:
                    _load(new[i], source[key], key, locations[i][0].name)
    leftover = [locs[0].name for locs in _locations(module).values() if _tensor(locs[0]).is_meta]
    assert not leftover, leftover
    return program


# -- where tensors live ----------------------------------------------------------------------------


def _locations(module: torch.nn.Module) -> dict[int, list[_Location]]:
    """``id(tensor)`` to every place the module holds it, in ``named_modules`` order."""
    out: dict[int, list[_Location]] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
            for attr, t in table.items():
                if t is None or (id(owner), attr) in seen:
                    continue
                seen.add((id(owner), attr))
                name = f"{prefix}.{attr}" if prefix else attr
                out.setdefault(id(t), []).append(_Location(name, owner, attr, is_param))
    return out


def _tensor(loc: _Location) -> torch.Tensor:
    t = loc.owner._parameters[loc.attr] if loc.is_param else loc.owner._buffers[loc.attr]
    assert t is not None
    return t


# -- sources -----------------------------------------------------------------------------------------


class _Source:
    """Read-only access to checkpoint tensors by name, loading each only when asked."""

    def __init__(self, keys: set[str], get: Callable[[str], torch.Tensor]) -> None:
        self._keys = keys
        self._get = get

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._get(key)


class _OpenSource:
    """Open ``state_dict`` (mapping or path) as a :class:`_Source`."""

    def __init__(self, state_dict: StateSource | None) -> None:
        self._state_dict = state_dict
        self._handles: list[Any] = []

    def __enter__(self) -> _Source:
        sd = self._state_dict
        if sd is None:
            return _Source(set(), _no_key)
        if isinstance(sd, Mapping):
            return _Source(set(sd), sd.__getitem__)
        path = Path(sd)
        if path.is_dir():
            return self._safetensors(sorted(path.glob("*.safetensors")), path)
        if path.suffix == ".safetensors":
            return self._safetensors([path], path)
        try:
            data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"cannot read checkpoint {str(path)!r}: {e}") from None
        if isinstance(data, Mapping) and "state_dict" in data and isinstance(
                data["state_dict"], Mapping):
            data = data["state_dict"]
        if not isinstance(data, Mapping):
            raise ConfigError(f"checkpoint {str(path)!r} holds a {type(data).__name__}; "
                              "expected a state dict (name -> tensor)")
        return _Source(set(data), data.__getitem__)

    def _safetensors(self, files: list[Path], where: Path) -> _Source:
        if not files:
            raise ConfigError(f"no .safetensors files in {str(where)!r}")
        try:
            from safetensors import safe_open
        except ImportError:
            raise ConfigError("reading .safetensors checkpoints needs the 'safetensors' "
                              "package: pip install safetensors") from None
        owner: dict[str, Any] = {}
        for f in files:
            handle = safe_open(str(f), framework="pt", device="cpu")
            self._handles.append(handle)
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                owner[key] = handle
        return _Source(set(owner), lambda k: owner[k].get_tensor(k))

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()


def _no_key(key: str) -> torch.Tensor:
    raise KeyError(key)


def _find_key(source: _Source, program: StageProgram, locs: list[_Location]) -> str | None:
    for name in _candidate_names(program, locs):
        if name in source:
            return name
    return None


def _candidate_names(program: StageProgram, locs: list[_Location]) -> Iterator[str]:
    for loc in locs:
        yield loc.name
    for loc in locs:
        canonical = program.param_names.get(loc.name, loc.name)
        yield canonical
        yield from program.param_aliases.get(canonical, ())


def _load(dest: torch.Tensor, value: torch.Tensor, key: str, name: str) -> None:
    if tuple(value.shape) != tuple(dest.shape):
        raise ConfigError(
            f"state dict entry {key!r} has shape {tuple(value.shape)} but the stage's {name!r} "
            f"has shape {tuple(dest.shape)}; the checkpoint is for another model configuration")
    dest.copy_(value)


# -- initialisation ----------------------------------------------------------------------------------


def _init_plan(program: StageProgram, locations: dict[int, list[_Location]], todo: list[int],
               has_init_fn: bool, shared: set[str]
               ) -> tuple[list[torch.nn.Module], list[int]]:
    """Which modules to reset and which tensors take the fallback; refuse what cannot be done
    before any tensor changes."""
    if has_init_fn:
        return [], []
    resets: dict[int, torch.nn.Module] = {}
    fallback: list[int] = []
    impossible: list[str] = []
    for i in todo:
        locs = locations[i]
        canonical = program.param_names.get(locs[0].name, locs[0].name)
        owners = [loc.owner for loc in locs if callable(getattr(loc.owner, "reset_parameters",
                                                                None))]
        if owners and canonical not in shared:
            resets.setdefault(id(owners[0]), owners[0])
        elif locs[0].is_param:
            fallback.append(i)
        else:
            impossible.append(locs[0].name)
    if impossible:
        raise ConfigError(
            f"stage {program.index} holds meta buffers {impossible[:8]} that no state dict entry, "
            "init_fn or reset_parameters() gives a value (buffers such as masks and rotary "
            "frequencies cannot be guessed); pass state_dict= with them or an init_fn")
    return list(resets.values()), fallback


def _fallback_init(program: StageProgram, locations: dict[int, list[_Location]],
                   new: dict[int, torch.Tensor], fallback: list[int]) -> None:
    names = []
    for i in fallback:
        name = locations[i][0].name
        canonical = program.param_names.get(name, name)
        names.append(canonical)
        t = new[i]
        if t.dim() >= 2 and t.is_floating_point():
            seed = int(hashlib.sha256(canonical.encode()).hexdigest()[:15], 16)
            gen = torch.Generator().manual_seed(seed)
            t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen))
        elif canonical.rpartition(".")[2] in _SCALE_NAMES:
            t.fill_(1)
        else:
            t.zero_()
    warnings.warn(
        f"stage {program.index}: {len(names)} parameters had no state dict entry and no "
        f"reset_parameters(); initialised with normal(0, 0.02) (2+ dims), ones (1-dim "
        f"weight/scale/gamma: norm scales) or zeros: "
        f"{names[:8]}{' ...' if len(names) > 8 else ''}. Pass state_dict= or init_fn= to "
        "choose their values.", stacklevel=3)


def _allocate(tensors: dict[int, torch.Tensor], device: torch.device) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for i, t in tensors.items():
        if not t.is_meta and t.device == device:
            out[i] = t
            continue
        data = (torch.empty(t.shape, dtype=t.dtype, device=device) if t.is_meta
                else t.detach().to(device))
        out[i] = (torch.nn.Parameter(data, requires_grad=t.requires_grad)
                  if isinstance(t, torch.nn.Parameter) else data)
    return out
