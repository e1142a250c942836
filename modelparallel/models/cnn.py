"""Convolutional reference models written here: ResNet, U-Net and Inception."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modelparallel.errors import ConfigError
from modelparallel.models.case import (
    Batch,
    ModelCase,
    _build,
    _case,
    _check_positive,
    _check_size,
    _gen,
    class_loss,
)

__all__ = ["BasicBlock", "Bottleneck", "Inception", "InceptionBlock", "ResNet", "UNet",
           "inception", "resnet50", "resnet_tiny", "unet"]

def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ConfigError(f"unknown norm {kind!r}; use 'batch' or 'group'")


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck block: 1x1 reduce, 3x3 (strided), 1x1 expand, residual add."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = _norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = _norm(norm, out_ch)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride,
                                                      bias=False), _norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18 style)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.n1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.n2 = _norm(norm, out_ch)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride,
                                                    bias=False), _norm(norm, out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks, global average pool, linear classifier."""

    def __init__(self, stages: list[nn.Module], stem: nn.Module, features: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _image_batch(channels: int, size: int, num_classes: int) -> Callable[[int, int], Batch]:
    def make(bs: int, seed: int) -> Batch:
        g = _gen(seed)
        x = torch.randn(bs, channels, size, size, generator=g)
        y = torch.randint(0, num_classes, (bs,), generator=g)
        return (x,), {}, y
    return make


def resnet50(*, image_size: int = 224, num_classes: int = 1000, batch_size: int = 8,
             norm: str = "batch", seed: int = 0, device: str | torch.device = "cpu"
             ) -> ModelCase:
    """ResNet-50 (v1.5 bottlenecks, [3, 4, 6, 3] blocks, ~25.6M parameters), cross-entropy.

    Args:
        image_size: Input height and width.
        num_classes: Classifier outputs.
        batch_size: Images per batch.
        norm: ``"batch"`` (the real architecture) or ``"group"`` (per-sample, for parity).
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.

    Example:
        >>> 25_000_000 < resnet50(batch_size=1, image_size=32, device="meta").num_parameters
        True
    """
    _check_positive(image_size=image_size, num_classes=num_classes, batch_size=batch_size)

    def build() -> nn.Module:
        stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                             _norm(norm, 64), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
        stages: list[nn.Module] = []
        in_ch = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layer = []
            for i in range(blocks):
                layer.append(Bottleneck(in_ch, width, stride if i == 0 else 1, norm))
                in_ch = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        return ResNet(stages, stem, in_ch, num_classes)
    model = _build(build, seed, device)
    return _case("resnet50", model, _image_batch(3, image_size, num_classes), batch_size, seed,
                 class_loss, device)


def resnet_tiny(*, image_size: int = 16, num_classes: int = 10, width: int = 16,
                batch_size: int = 4, norm: str = "group", seed: int = 0,
                device: str | torch.device = "cpu") -> ModelCase:
    """A small ResNet-like CNN for parity tests: stem, 3 basic blocks, pool, classifier.

    Uses GroupNorm by default (per sample; Note [reference model conventions]).

    Args:
        image_size: Input height and width.
        num_classes: Classifier outputs.
        width: Channels of the first stage (doubled in the next ones).
        batch_size: Images per batch.
        norm: ``"group"`` or ``"batch"``.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    _check_positive(image_size=image_size, num_classes=num_classes, width=width,
                    batch_size=batch_size)

    def build() -> nn.Module:
        stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), _norm(norm, width),
                             nn.ReLU())
        stages: list[nn.Module] = [BasicBlock(width, width, 1, norm),
                                   BasicBlock(width, 2 * width, 2, norm),
                                   BasicBlock(2 * width, 4 * width, 2, norm)]
        return ResNet(stages, stem, 4 * width, num_classes)
    model = _build(build, seed, device)
    return _case("resnet-tiny", model, _image_batch(3, image_size, num_classes), batch_size,
                 seed, class_loss, device)


class _ConvBlock(nn.Sequential):
    """(3x3 conv, norm, ReLU) twice."""

    def __init__(self, in_ch: int, out_ch: int, norm: str) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), _norm(norm, out_ch),
                         nn.ReLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
                         _norm(norm, out_ch), nn.ReLU())


class UNet(nn.Module):
    """U-Net: an encoder of conv blocks with max-pooling and a decoder whose levels concatenate
    the matching encoder level's output (long skip connections) after a transposed-conv upsample.
    """

    def __init__(self, in_ch: int, num_classes: int, base: int, depth: int, norm: str) -> None:
        super().__init__()
        chans = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        prev = in_ch
        for c in chans[:-1]:
            self.down.append(_ConvBlock(prev, c, norm))
            prev = c
        self.pool = nn.MaxPool2d(2)
        self.bottom = _ConvBlock(chans[-2], chans[-1], norm)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c_hi, c_lo in zip(reversed(chans[1:]), reversed(chans[:-1])):
            self.up.append(nn.ConvTranspose2d(c_hi, c_lo, 2, stride=2))
            self.dec.append(_ConvBlock(2 * c_lo, c_lo, norm))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


def unet(size: str = "tiny", *, image_size: int | None = None, num_classes: int = 2,
         batch_size: int | None = None, norm: str | None = None, seed: int = 0,
         device: str | torch.device = "cpu") -> ModelCase:
    """U-Net for per-pixel classification (mean cross-entropy over pixels).

    Args:
        size: ``"tiny"`` (base 8 channels, depth 3, 32x32 images, GroupNorm) or ``"base"``
            (the original: base 64, depth 4, ~31M parameters, 256x256 images, BatchNorm).
        image_size: Input height and width (a multiple of ``2**depth``).
        num_classes: Output channels.
        batch_size: Images per batch (default 4 for tiny, 8 for base).
        norm: ``"group"`` or ``"batch"`` (default per size).
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    base, depth, default_size, default_norm, default_bs = _check_size(
        "unet", size, {"tiny": (8, 3, 32, "group", 4), "base": (64, 4, 256, "batch", 8)})
    img = image_size or default_size
    bs = batch_size or default_bs
    _check_positive(image_size=img, batch_size=bs, num_classes=num_classes)
    if img % 2**depth:
        raise ConfigError(f"unet {size} needs image_size divisible by {2**depth}, got {img}")
    model = _build(lambda: UNet(3, num_classes, base, depth, norm or default_norm), seed, device)

    def make(b: int, seed_: int) -> Batch:
        g = _gen(seed_)
        return ((torch.randn(b, 3, img, img, generator=g),), {},
                torch.randint(0, num_classes, (b, img, img), generator=g))
    return _case(f"unet-{size}", model, make, bs, seed, class_loss, device)


class _ConvNormAct(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, k: int, norm: str, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=False),
                         _norm(norm, out_ch), nn.ReLU())


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-5x5; 3x3 max-pool-1x1) concatenated."""

    def __init__(self, in_ch: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int,
                 norm: str) -> None:
        super().__init__()
        self.b1 = _ConvNormAct(in_ch, c1, 1, norm)
        self.b3 = nn.Sequential(_ConvNormAct(in_ch, c3r, 1, norm), _ConvNormAct(c3r, c3, 3, norm))
        self.b5 = nn.Sequential(_ConvNormAct(in_ch, c5r, 1, norm), _ConvNormAct(c5r, c5, 5, norm))
        self.bp = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                _ConvNormAct(in_ch, cp, 1, norm))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


class Inception(nn.Module):
    """An Inception (GoogLeNet-like) classifier: stem, inception blocks with pooling, head."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], features: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


# GoogLeNet's inception configurations (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj);
# "M" is a stride-2 max-pool.
_GOOGLENET: list[Any] = [
    (192, 64, 96, 128, 16, 32, 32), (256, 128, 128, 192, 32, 96, 64), "M",
    (480, 192, 96, 208, 16, 48, 64), (512, 160, 112, 224, 24, 64, 64),
    (512, 128, 128, 256, 24, 64, 64), (512, 112, 144, 288, 32, 64, 64),
    (528, 256, 160, 320, 32, 128, 128), "M",
    (832, 256, 160, 320, 32, 128, 128), (832, 384, 192, 384, 48, 128, 128),
]


def inception(size: str = "tiny", *, image_size: int | None = None, num_classes: int | None = None,
              batch_size: int | None = None, norm: str | None = None, seed: int = 0,
              device: str | torch.device = "cpu") -> ModelCase:
    """An Inception-style multi-branch CNN (parallel 1x1/3x3/5x5/pool branches, concatenated).

    Args:
        size: ``"tiny"`` (2 small blocks, 32x32, GroupNorm) or ``"base"`` (GoogLeNet: 9 blocks,
            224x224, ~6.6M parameters, BatchNorm).
        image_size: Input height and width.
        num_classes: Classifier outputs (default 10 for tiny, 1000 for base).
        batch_size: Images per batch (default 4 for tiny, 8 for base).
        norm: ``"group"`` or ``"batch"`` (default per size).
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    _check_size("inception", size, {"tiny": None, "base": None})
    tiny = size == "tiny"
    img = image_size or (32 if tiny else 224)
    classes = num_classes or (10 if tiny else 1000)
    bs = batch_size or (4 if tiny else 8)
    nk = norm or ("group" if tiny else "batch")
    _check_positive(image_size=img, num_classes=classes, batch_size=bs)

    def build() -> nn.Module:
        if tiny:
            tiny_stem = _ConvNormAct(3, 16, 3, nk)
            b1 = InceptionBlock(16, 8, 8, 16, 4, 8, 8, nk)
            b2 = InceptionBlock(b1.out_channels, 16, 8, 16, 4, 8, 8, nk)
            return Inception(tiny_stem, [b1, nn.MaxPool2d(2), b2], b2.out_channels, classes)
        stem: nn.Module = nn.Sequential(_ConvNormAct(3, 64, 7, nk, stride=2),
                             nn.MaxPool2d(3, stride=2, padding=1), _ConvNormAct(64, 64, 1, nk),
                             _ConvNormAct(64, 192, 3, nk), nn.MaxPool2d(3, stride=2, padding=1))
        blocks: list[nn.Module] = []
        features = 192
        for spec in _GOOGLENET:
            if spec == "M":
                blocks.append(nn.MaxPool2d(3, stride=2, padding=1))
            else:
                in_ch, c1, c3r, c3, c5r, c5, cp = spec
                block = InceptionBlock(in_ch, c1, c3r, c3, c5r, c5, cp, nk)
                blocks.append(block)
                features = block.out_channels
        return Inception(stem, blocks, features, classes)
    model = _build(build, seed, device)
    return _case(f"inception-{size}", model, _image_batch(3, img, classes), bs, seed,
                 class_loss, device)
