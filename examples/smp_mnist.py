"""An SMP v1 PyTorch MNIST training script, written the way AWS's ``pt_mnist.py`` example is,
running on modelparallel with only the import changed.

    torchrun --nproc_per_node 2 examples/smp_mnist.py --epochs 1 --max-steps 5

What differs from a SageMaker script: the import line (``smdistributed.modelparallel.torch`` ->
``modelparallel.torch``), the launcher (``torchrun`` instead of SageMaker's ``mpirun``), and the
data: local, synthetic MNIST-shaped images (each of the 10 classes is a fixed random 28x28
pattern, plus noise), so nothing is downloaded and the accuracy rises within a few steps.
Everything else is SMP's API: ``smp.init``, ``smp.DistributedModel``, ``@smp.step`` train and test
steps, ``model.backward``, ``StepOutput.reduce_mean``, ``smp.DistributedOptimizer`` with an LR
scheduler, ``smp.save(..., partial=True)``, ``smp.save_checkpoint`` and
``smp.resume_from_checkpoint`` (``--resume``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

import modelparallel.torch as smp  # was: import smdistributed.modelparallel.torch as smp


class Net1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        return torch.flatten(x, 1)


class Net2(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.fc1(x)
        x = F.relu(x)
        x = self.fc2(x)
        return F.log_softmax(x, 1)


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net1 = Net1()
        self.net2 = Net2()

    def forward(self, x):
        x = self.net1(x)
        return self.net2(x)


# smdistributed: define the step functions. The body runs once per microbatch, pipelined.
@smp.step
def train_step(model, data, target):
    output = model(data)
    loss = F.nll_loss(output, target, reduction="mean")
    model.backward(loss)
    return output, loss


@smp.step
def test_step(model, data, target):
    output = model(data)
    loss = F.nll_loss(output, target, reduction="sum").item()  # sum up batch loss
    pred = output.argmax(dim=1, keepdim=True)  # get the index of the max log-probability
    correct = pred.eq(target.view_as(pred)).sum().item()
    return loss, correct


def train(args, model, device, train_loader, optimizer, epoch):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        # smdistributed: move the inputs to the device of this rank
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        _, loss_mb = train_step(model, data, target)
        # smdistributed: average the loss over the microbatches
        loss = loss_mb.reduce_mean()
        optimizer.step()
        if smp.rank() == 0 and batch_idx % args.log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(train_loader.dataset)}"
                  f"]\tLoss: {loss.item():.6f}", flush=True)
        if args.max_steps and batch_idx + 1 >= args.max_steps:
            break


def test(args, model, device, test_loader):
    model.eval()
    test_loss = 0
    correct = 0
    seen = 0
    with torch.no_grad():
        for batch_idx, (data, target) in enumerate(test_loader):
            data, target = data.to(device), target.to(device)
            # smdistributed: non-tensor results come back as one list entry per microbatch
            loss_batch, correct_batch = test_step(model, data, target)
            test_loss += sum(loss_batch)
            correct += sum(correct_batch)
            seen += len(data)
            if args.max_steps and batch_idx + 1 >= args.max_steps:
                break
    test_loss /= seen
    if smp.mp_rank() == 0:
        print(f"\nTest set: Average loss: {test_loss:.4f}, Accuracy: {correct}/{seen} "
              f"({100.0 * correct / seen:.0f}%)\n", flush=True)
    return test_loss


def synthetic_mnist(n, seed):
    """MNIST-shaped data: class k is a fixed random pattern k plus noise (learnable)."""
    patterns = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = patterns[labels] + 2.0 * torch.randn(n, 1, 28, 28, generator=g)
    return TensorDataset(images, labels)


def main():
    parser = argparse.ArgumentParser(description="PyTorch MNIST Example (SMP)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-batch-size", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-interval", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0,
                        help="stop each epoch's training and test after this many batches")
    parser.add_argument("--num-microbatches", type=int, default=4)
    parser.add_argument("--pipeline", type=str, default="interleaved")
    parser.add_argument("--save-model", action="store_true", default=True)
    parser.add_argument("--checkpoint-dir", type=str, default="/tmp/smp_mnist_checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="resume from the newest partial checkpoint in --checkpoint-dir")
    args = parser.parse_args()

    # smdistributed: initialize the library; SM_HP_MP_PARAMETERS overrides these values
    cfg = {"microbatches": args.num_microbatches, "partitions": 2,
           "pipeline": args.pipeline, "optimize": "speed"}
    smp.init(cfg)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(smp.local_rank())
    device = torch.device("cuda", smp.local_rank()) if use_cuda else torch.device("cpu")
    torch.manual_seed(args.seed)

    # smdistributed: seed the data by dp_rank so all ranks of one model replica see the same
    train_loader = DataLoader(synthetic_mnist(2048, 10 + smp.dp_rank()),
                              batch_size=args.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed))
    test_loader = DataLoader(synthetic_mnist(1000, 99), batch_size=args.test_batch_size,
                             drop_last=True)

    model = GroupedNet()
    # smdistributed: place the classifier on the second partition (the ILP places the rest)
    smp.set_partition(model.net2, 1)
    model = smp.DistributedModel(model)
    optimizer = optim.Adadelta(model.parameters(), lr=args.lr)
    optimizer = smp.DistributedOptimizer(optimizer)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)

    first_epoch = 1
    if args.resume and os.path.exists(os.path.join(args.checkpoint_dir, "newest")):
        user_content = smp.resume_from_checkpoint(args.checkpoint_dir, partial=True)
        first_epoch = user_content["epoch"] + 1
        scheduler.load_state_dict(user_content["scheduler"])
        if smp.rank() == 0:
            print(f"resumed after epoch {user_content['epoch']}", flush=True)

    start = time.time()
    for epoch in range(first_epoch, first_epoch + args.epochs):
        train(args, model, device, train_loader, optimizer, epoch)
        test(args, model, device, test_loader)
        scheduler.step()
        smp.save_checkpoint(args.checkpoint_dir, tag=f"epoch{epoch}", partial=True,
                            model=model, optimizer=optimizer,
                            user_content={"epoch": epoch, "scheduler": scheduler.state_dict()})

    if args.save_model and smp.dp_rank() == 0:
        # smdistributed: each pipeline rank saves its own partition
        model_dict = model.local_state_dict()
        opt_dict = optimizer.local_state_dict()
        smp.save({"model_state_dict": model_dict, "optimizer_state_dict": opt_dict},
                 os.path.join(args.checkpoint_dir, "pt_mnist_checkpoint.pt"), partial=True)
    smp.barrier()
    if smp.rank() == 0:
        print(f"done in {time.time() - start:.1f} s; partial checkpoints in "
              f"{args.checkpoint_dir}", flush=True)


if __name__ == "__main__":
    main()
