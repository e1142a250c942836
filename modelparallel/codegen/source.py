"""The generated Python source of a stage, with a header saying what the stage holds and
exchanges (what ``partition-plan codegen plan.json --stage K`` prints)."""

from __future__ import annotations

import textwrap

from modelparallel.codegen.build import build_stage
from modelparallel.codegen.program import BoundaryValue, StageProgram
from modelparallel.plan import Plan
from modelparallel.tracer.traced import TracedModel

__all__ = ["program_source", "stage_source"]

_WIDTH = 100


def stage_source(traced: TracedModel, plan: Plan, stage: int) -> str:
    """Python source of stage ``stage``'s ``forward``, with a header comment.

    The header names the stage (``k of p``), the parameters it holds, the model inputs it reads
    from the batch, the values it recomputes, receives and sends, and the tied parameters it
    shares. The body is the generated code of the stage's graph module; its arguments are named
    after the values they carry.

    Raises:
        PlanMismatchError: if the plan was made for another model.

    Example:
        >>> import torch
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.tracer import trace
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> traced = trace(model, (torch.randn(3, 4),))
        >>> plan = partition(traced.graph, PlanConfig(partitions=2), "cpu")
        >>> print(stage_source(traced, plan, 1).splitlines()[0])
        # Stage 1 of 2 (stages 0..1), model 'Sequential'
    """
    program = build_stage(traced, plan, stage)
    return program_source(program, model_name=traced.graph.name)


def program_source(program: StageProgram, *, model_name: str = "") -> str:
    """Python source of a built stage's ``forward``, with the header of :func:`stage_source`.

    Example:
        >>> import torch
        >>> from modelparallel.codegen import build_stage
        >>> from modelparallel.partitioner import partition
        >>> from modelparallel.plan import PlanConfig
        >>> from modelparallel.tracer import trace
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> traced = trace(model, (torch.randn(3, 4),))
        >>> plan = partition(traced.graph, PlanConfig(partitions=2), "cpu")
        >>> compile(program_source(build_stage(traced, plan, 0)), "stage0", "exec") is not None
        True
    """
    k, p = program.index, program.num_stages
    of_model = f", model {model_name!r}" if model_name else ""
    lines = [f"Stage {k} of {p} (stages 0..{p - 1}){of_model}"]
    held = sorted(set(program.param_names.values()))
    numel = sum(t.numel() for t in program.module.parameters())
    lines += _listing(f"Parameters and buffers held ({len(held)}; {numel:,} parameter elements)",
                      held)
    inputs = [program.input_names[i] if i < len(program.input_names) else f"input{i}"
              for i in program.model_inputs]
    lines += _listing("Inputs read from the batch", inputs)
    lines += _listing("Recomputed from the inputs (never sent)", list(program.recomputed))
    if not program.sources:
        lines += _listing("Received", [])
    for src, _ in program.sources:
        lines += _listing(f"Received from stage {src}", _values(program.recv_values(src)))
    if not program.dests:
        lines += _listing("Sent", [])
    for dst, _ in program.dests:
        lines += _listing(f"Sent to stage {dst}",
                          _values(tuple(program.send[j] for j in program.send_indices(dst))))
    if program.is_last:
        lines.append(f"Returns the sent values, then the {program.num_model_outputs} flat model "
                     "outputs (rebuilt with out_spec for the loss).")
    else:
        lines.append("Returns the sent values, in order.")
    if program.shared_params:
        shared = [f"{n} (stages {', '.join(map(str, s))})"
                  for n, s in sorted(program.shared_params.items())]
        lines += _listing("Tied parameters also held by other stages (gradients summed)", shared)
    header = "\n".join("# " + line if line else "#" for line in lines)
    body = program.code.strip("\n").rstrip()
    return f"{header}\nimport torch\n\n\n{body}\n"


def _values(values: tuple[BoundaryValue, ...]) -> list[str]:
    out = []
    for v in values:
        if v.kind == "tensor" and v.metas:
            m = v.metas[0]
            desc = f"{m.dtype}{list(m.shape)}{' grad' if v.requires_grad else ''}"
        elif v.metas:
            desc = f"{v.kind}: " + ", ".join(f"{m.dtype}{list(m.shape)}" for m in v.metas)
        else:
            desc = v.kind
        out.append(f"{v.name} ({desc})")
    return out


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return [f"{title}: none"]
    text = ", ".join(items)
    wrapped = textwrap.wrap(text, _WIDTH - 6, break_long_words=False, break_on_hyphens=False)
    return [f"{title}:"] + ["    " + w for w in wrapped]
