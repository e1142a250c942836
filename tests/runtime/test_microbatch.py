"""Microbatches (modelparallel/runtime/microbatch.py): splitting inputs by SMP's rules, targets
and outputs, the microbatch used for tracing."""

from __future__ import annotations

import pytest
import torch

from modelparallel.errors import (
    ConfigError,
)
from modelparallel.runtime.microbatch import (
    first_microbatch,
    merge_outputs,
    resolve_split,
    shape_key,
    split_inputs,
    split_target,
)


class Sliceable:
    """An object that splits itself (SMP's ``smp_slice``)."""

    def __init__(self, items: list[int]) -> None:
        self.items = items

    def smp_slice(self, num_mb: int, mb: int, axis: int) -> Sliceable:
        n = len(self.items) // num_mb
        return Sliceable(self.items[mb * n:(mb + 1) * n])


# -- microbatches ----------------------------------------------------------------------------------


def test_split_follows_smp_rules() -> None:
    x = torch.arange(24).reshape(4, 6)
    seq_first = torch.arange(12).reshape(3, 4)
    whole = torch.ones(5)
    spec = resolve_split(("x", "seq_first", "whole", "obj", "flag", "scalar"), 2,
                         {"seq_first": 1}, ["whole"])
    mbs = split_inputs([x, seq_first, whole, Sliceable([1, 2, 3, 4]), "abc", torch.tensor(3.0)],
                       spec)
    assert len(mbs) == 2
    assert torch.equal(mbs[1][0], x[2:]) and torch.equal(mbs[0][1], seq_first[:, :2])
    assert mbs[0][2] is whole and mbs[1][2] is whole
    assert mbs[1][3].items == [3, 4]
    assert mbs[0][4] == "abc" and float(mbs[1][5]) == 3.0
    assert mbs[0][0].data_ptr() == x.data_ptr(), "pieces are views, not copies"
    by_index = resolve_split(("a", "b"), 2, {1: 1}, [0])
    assert by_index.axes == {1: 1} and by_index.whole == frozenset({0})


def test_split_errors_name_the_input_and_the_fix() -> None:
    spec = resolve_split(("input_ids",), 4)
    with pytest.raises(ConfigError, match=r"'input_ids' has size 6 along axis 0.*4 microbatches"):
        split_inputs([torch.zeros(6, 3)], spec)
    with pytest.raises(ConfigError, match="cannot be split along axis 2"):
        split_inputs([torch.zeros(4, 3)], resolve_split(("x",), 2, {"x": 2}))
    with pytest.raises(ConfigError, match="model's inputs are"):
        resolve_split(("x",), 2, {"y": 1})
    with pytest.raises(ConfigError, match="out of range"):
        resolve_split(("x",), 2, non_split_inputs=[3])
    with pytest.raises(ConfigError):
        resolve_split(("x",), 2, {"x": -1})
    with pytest.raises(ConfigError):
        resolve_split(("x",), 0)
    with pytest.raises(ConfigError, match="target"):
        split_target({"labels": torch.zeros(5)}, 2)


def test_targets_and_outputs() -> None:
    target = {"labels": torch.arange(4), "weight": 0.5}
    parts = split_target(target, 2)
    assert parts[1]["labels"].tolist() == [2, 3] and parts[1]["weight"] == 0.5
    merged = merge_outputs([{"logits": torch.ones(2, 3), "aux": torch.tensor(1.0), "n": 7},
                            {"logits": torch.zeros(2, 3), "aux": torch.tensor(2.0), "n": 7}])
    assert merged["logits"].shape == (4, 3) and merged["aux"].tolist() == [1.0, 2.0]
    assert merged["n"] == 7
    assert shape_key([torch.zeros(2, 3)], "train") != shape_key([torch.zeros(2, 4)], "train")
    assert shape_key([torch.zeros(2, 3)], "train") != shape_key([torch.zeros(2, 3)], "eval")
    assert shape_key([torch.zeros(2)], "x") == shape_key([torch.ones(2)], "x")


def test_first_microbatch_cuts_along_the_given_axis() -> None:
    model = torch.nn.Linear(4, 2)
    (x,), _ = first_microbatch(model, (torch.zeros(8, 4),), {}, 4)
    assert tuple(x.shape) == (2, 4)
    (x,), _ = first_microbatch(model, (torch.zeros(4, 8),), {}, 4, axes={0: 1})
    assert tuple(x.shape) == (4, 2)
    with pytest.raises(ConfigError, match="divide"):
        first_microbatch(model, (torch.zeros(6, 4),), {}, 4)
