"""A GPT-2 training script in the style of AWS's SMP v1 GPT examples (``train_gpt_simple.py``),
running on modelparallel with only the import changed.

    torchrun --nproc_per_node 2 examples/smp_gpt2.py --max-steps 10

SMP features used as AWS's GPT scripts use them: the config dict passed to ``smp.init`` (values in
``SM_HP_MP_PARAMETERS`` override it), a Hugging Face ``GPT2LMHeadModel`` wrapped in
``smp.DistributedModel``, a ``@smp.step`` train step returning the model's ``ModelOutput``
(``output["logits"]``) and the loss, an eval step under ``torch.no_grad()``, real data only on
pipeline rank 0 and placeholder tensors elsewhere (the library takes the inputs from pipeline rank
0), ``smp.DistributedOptimizer`` over AdamW with a warm-up LR schedule, and partial checkpoints
with ``smp.save_checkpoint``/``smp.resume_from_checkpoint`` (``--resume``). The data is synthetic
and learnable (token sequences counting up with a random stride), so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import modelparallel.torch as smp  # was: import smdistributed.modelparallel.torch as smp


def lm_loss(logits, input_ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                           input_ids[:, 1:].reshape(-1))


@smp.step
def train_step(model, input_ids, args):
    output = model(input_ids=input_ids)
    loss = lm_loss(output["logits"], input_ids)
    model.backward(loss)
    if args.logits_output:
        return output, loss
    return loss


@smp.step
def eval_step(model, input_ids):
    return lm_loss(model(input_ids=input_ids)["logits"], input_ids)


def batches(args, seed):
    """Sequences ``start + stride * t (mod vocab)``; real ones on pipeline rank 0 only."""
    g = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, args.vocab_size, (args.train_batch_size, 1), generator=g)
        stride = torch.randint(1, 8, (args.train_batch_size, 1), generator=g)
        ids = (start + stride * torch.arange(args.seq_length)) % args.vocab_size
        if smp.pp_rank() == 0:
            yield ids
        else:  # smdistributed: other pipeline ranks feed placeholders of the same batch count
            yield torch.zeros(args.train_batch_size, 0, dtype=torch.long)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--hidden-width", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--pipeline-parallel-degree", type=int, default=2)
    parser.add_argument("--logits-output", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=str, default="/tmp/smp_gpt2_checkpoints")
    parser.add_argument("--checkpoint-freq", type=int, default=5)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    # any value here is overriden by the config set in SM_HP_MP_PARAMETERS
    smp_config = {
        "ddp": True,
        "pipeline_parallel_degree": args.pipeline_parallel_degree,
        "microbatches": args.microbatches,
        "pipeline": "interleaved",
        "optimize": "speed",
        "placement_strategy": "cluster",
        "fast_mode": False,  # undocumented keys of AWS's scripts are accepted and ignored
    }
    smp.init(smp_config)
    if smp.rank() == 0:
        print(f"modelparallel {smp.__version__}: {smp.size()} ranks, pp {smp.pp_size()}, "
              f"dp {smp.dp_size()}", flush=True)
    if torch.cuda.is_available():
        torch.cuda.set_device(smp.local_rank())
    device = torch.device("cuda", smp.local_rank()) if torch.cuda.is_available() \
        else torch.device("cpu")

    torch.manual_seed(1234)
    config = GPT2Config(vocab_size=args.vocab_size, n_positions=args.seq_length,
                        n_embd=args.hidden_width, n_layer=args.num_layers, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model = smp.DistributedModel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    optimizer = smp.DistributedOptimizer(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps))

    total_steps = 0
    if args.resume and os.path.exists(os.path.join(args.checkpoint_dir, "newest")):
        user_content = smp.resume_from_checkpoint(args.checkpoint_dir, partial=True)
        total_steps = user_content["total_steps"]
        scheduler.load_state_dict(user_content["lr_scheduler"])
        if smp.rank() == 0:
            print(f"resumed at step {total_steps}", flush=True)

    data = batches(args, seed=total_steps)
    model.train()
    start = time.time()
    while total_steps < args.max_steps:
        input_ids = next(data).to(device)
        optimizer.zero_grad(set_to_none=True)
        if args.logits_output:
            output, loss_mb = train_step(model, input_ids, args)
            logits = torch.cat(tuple(output["logits"].outputs), dim=0)  # as AWS's scripts do
            assert logits.shape[0] == args.train_batch_size
        else:
            loss_mb = train_step(model, input_ids, args)
        loss = loss_mb.reduce_mean()
        optimizer.step()
        scheduler.step()
        total_steps += 1
        if smp.rank() == 0:
            print(f"step {total_steps} loss {loss.item():.4f} "
                  f"lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
        if total_steps % args.checkpoint_freq == 0:
            smp.save_checkpoint(args.checkpoint_dir, tag=f"total_steps{total_steps}",
                                partial=True, model=model, optimizer=optimizer,
                                user_content={"total_steps": total_steps,
                                              "lr_scheduler": scheduler.state_dict()},
                                num_kept_partial_checkpoints=2)
    model.eval()
    with torch.no_grad():
        val = eval_step(model, next(data).to(device)).reduce_mean()
    if smp.rank() == 0:
        print(f"validation loss {val.item():.4f}; {total_steps} steps in "
              f"{time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
