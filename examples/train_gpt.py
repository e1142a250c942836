"""Train a GPT-2-style model as a 4-stage pipeline on CPU.

    torchrun --nproc_per_node 4 examples/train_gpt.py --steps 200

    # or: train GPT-2 small with a plan made offline by ``partition-plan build``
    partition-plan build modelparallel.models:gpt2_small -p 4 -m 4 --device cpu -o gpt2.plan.json
    torchrun --nproc_per_node 4 examples/train_gpt.py --size small --plan gpt2.plan.json --steps 10

Every rank runs this script. ``modelparallel.api.pipeline`` traces the model, rank 0 plans the
split (an ILP over the traced graph; it prints the plan summary), and each rank trains its own
stage with its own optimizer. The loss of every step is known on every rank; rank 0 prints it.

The data is synthetic but learnable: each sequence counts up from a random start with a random
stride, modulo ``--tokens`` (256: the tiny model's whole vocabulary, the first 256 ids of GPT-2's),
so the next token is predictable from the previous two and the loss falls quickly (GPT-2 small:
from about ln(50257) = 10.8 to about 6 in 20 steps).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from modelparallel import models
from modelparallel.api import pipeline


def batch(batch_size: int, seq_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``start + stride * t (mod vocab)``; inputs and next-token targets."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch_size, 1), generator=g)
    stride = torch.randint(1, 8, (batch_size, 1), generator=g)
    ids = (start + stride * torch.arange(seq_len + 1)) % vocab
    return ids[:, :-1], ids[:, 1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--size", default="tiny", choices=("tiny", "small", "medium"),
                        help="GPT-2 size: tiny (2 layers, tests), small (124M), medium (355M)")
    parser.add_argument("--plan", default=None,
                        help="a plan file from 'partition-plan build' (default: plan on rank 0)")
    parser.add_argument("--microbatches", type=int, default=None,
                        help="microbatches per step (default: the plan's, else 4)")
    parser.add_argument("--schedule", default=None,
                        help="1f1b (interleaved) or gpipe (simple) (default: the plan's, else 1f1b)")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate (default 3e-3 for tiny, 1e-3 otherwise)")
    parser.add_argument("--tokens", type=int, default=256,
                        help="token ids the synthetic data uses (at most the vocabulary)")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", 1))))
    case = models.gpt2(args.size, batch_size=args.batch_size, seq_len=args.seq_len)
    vocab = min(case.model.config.vocab_size, args.tokens)
    lr = args.lr if args.lr is not None else (3e-3 if args.size == "tiny" else 1e-3)
    example, _ = batch(args.batch_size, args.seq_len, vocab, seed=0)

    microbatches = args.microbatches or (None if args.plan else 4)
    pipe = pipeline(case.model, example, loss_fn=case.loss_fn, plan=args.plan,
                    microbatches=microbatches, schedule=args.schedule, return_outputs=False)
    rank = pipe.rank
    if rank == 0:
        from rich.console import Console

        from modelparallel.report import print_headline, print_summary

        # The summary once: a plan file was shown by 'partition-plan build/inspect' already.
        (print_headline if args.plan else print_summary)(pipe.plan, Console(width=120))
    print(f"rank {rank}: stage {pipe.stage} holds "
          f"{sum(p.numel() for p in pipe.parameters()):,} parameters", flush=True)

    # A stage may hold no parameters (the planner may give it only parameter-free ops).
    params = list(pipe.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr) if params else None
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, targets = batch(args.batch_size, args.seq_len, vocab, seed=step)
        if optimizer is not None:
            optimizer.zero_grad()
        result = pipe.step(inputs, targets)
        if optimizer is not None:
            optimizer.step()
        if rank == 0:
            print(f"step {step:4d}  loss {float(result.loss):.4f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    pipe.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
