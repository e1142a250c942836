"""Boundary templates (modelparallel/runtime/boundary.py): allocate, pack and unpack round trip."""

from __future__ import annotations

import torch

from modelparallel.runtime.boundary import allocate, pack, slots, unpack


def test_boundary_template_round_trip() -> None:
    a = torch.randn(2, 3, requires_grad=True) * 2
    values = (a, [torch.ones(1, dtype=torch.int64), 4], None, torch.Size([2, 3]),
              {"k": torch.zeros(5)})
    template, tensors = pack(values)
    assert [s.shape for s in slots(template)] == [(2, 3), (1,), (5,)]
    assert [s.requires_grad for s in slots(template)] == [True, False, False]
    rebuilt = unpack(template, tensors)
    assert rebuilt[0] is a and rebuilt[1][1] == 4 and rebuilt[2] is None
    assert rebuilt[3] == torch.Size([2, 3]) and rebuilt[4]["k"] is tensors[2]
    buffers = allocate(template, torch.device("cpu"))
    assert [b.dtype for b in buffers] == [torch.float32, torch.int64, torch.float32]
    assert pack(values)[0] == template, "templates compare equal for equal shapes"
