"""A GPT-style decoder sized by parameter count: the model of the multi-GPU benchmark."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modelparallel.errors import ConfigError
from modelparallel.models.case import (
    ModelCase,
    _build,
    _case,
    _check_positive,
    _lm_batch,
    token_loss,
)

__all__ = ["DecoderBlock", "GPTDecoder", "decoder_parameters", "gpt_decoder"]

class DecoderBlock(nn.Module):
    """A pre-norm GPT block: causal multi-head self-attention and a 4x GELU MLP, both residual.

    Attention is ``F.scaled_dot_product_attention(..., is_causal=True)``: no mask tensor, so
    CUDA runs the causal flash kernel.
    """

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class GPTDecoder(nn.Module):
    """Token and learned position embeddings, ``layers`` :class:`DecoderBlock`, a final
    LayerNorm and an untied LM head; ``forward(input_ids) -> logits``."""

    def __init__(self, vocab_size: int, max_positions: int, hidden: int, layers: int,
                 heads: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Embedding(max_positions, hidden)
        self.blocks = nn.ModuleList(DecoderBlock(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def decoder_parameters(vocab_size: int, max_positions: int, hidden: int, layers: int) -> int:
    """Parameter elements of :class:`GPTDecoder` with these dimensions.

    Example:
        >>> decoder_parameters(256, 32, 64, 2) == sum(
        ...     p.numel() for p in GPTDecoder(256, 32, 64, 2, 4).parameters())
        True
    """
    per_layer = 12 * hidden * hidden + 13 * hidden
    return layers * per_layer + (2 * vocab_size + max_positions) * hidden + 2 * hidden


def _decoder_hidden(total: float) -> int:
    """A width for a decoder of about ``total`` parameters (widths of GPT-3's table)."""
    for limit, width in ((5e7, 512), (2e8, 1024), (1e9, 2048), (4e9, 2560)):
        if total < limit:
            return width
    return 4096


def gpt_decoder(params_per_gpu: float = 1.5e9, gpus: int = 1, *, hidden: int | None = None,
                layers: int | None = None, heads: int | None = None, vocab_size: int = 50304,
                seq_len: int = 2048, batch_size: int = 1, seed: int = 0,
                device: str | torch.device = "meta") -> ModelCase:
    """A GPT-style decoder (:class:`GPTDecoder`) of about ``params_per_gpu * gpus`` parameters,
    with a next-token cross-entropy loss: the model of the multi-GPU benchmark.

    The width comes from the target size (512 below 50M parameters, 1024 below 200M, 2048
    below 1B, 2560 below 4B, 4096 beyond; heads of 128 channels) unless ``hidden`` is given; the depth is the number of
    layers that brings the total closest to the target unless ``layers`` is given. Embeddings
    are untied (no parameter is shared between the first and last stage).

    Args:
        params_per_gpu: Target parameter elements per GPU.
        gpus: GPUs (pipeline stages) the model is sized for.
        hidden: Model width (default: from the target size).
        layers: Decoder blocks (default: from the target size).
        heads: Attention heads (default: ``hidden // 128``, at least 1).
        vocab_size: Vocabulary (default GPT-2's, padded to a multiple of 64).
        seq_len: Tokens per sample (also the number of learned positions).
        batch_size: Samples per batch.
        seed: Seed for the weights and the example batch.
        device: ``"meta"`` by default (the default size is 1.5B parameters: build it on the
            meta device and let each rank materialise its stage), ``"cpu"`` or another device.

    Raises:
        ConfigError: for non-positive sizes, or a width the heads do not divide.

    Example:
        >>> case = gpt_decoder(hidden=64, layers=2, heads=4, vocab_size=256, seq_len=16,
        ...                    batch_size=2, device="cpu")
        >>> tuple(case.model(*case.args).shape)
        (2, 16, 256)
        >>> big = gpt_decoder(1.5e9, gpus=8)
        >>> round(big.num_parameters / 8 / 1e9, 2)
        1.51
    """
    _check_positive(gpus=gpus, vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size)
    if params_per_gpu <= 0:
        raise ConfigError(f"params_per_gpu must be > 0, got {params_per_gpu!r}")
    total = float(params_per_gpu) * gpus
    h = hidden if hidden is not None else _decoder_hidden(total)
    n_heads = heads if heads is not None else max(1, h // 128)
    _check_positive(hidden=h, heads=n_heads)
    if h % n_heads:
        raise ConfigError(f"hidden = {h} is not divisible by heads = {n_heads}")
    if layers is None:
        fixed = decoder_parameters(vocab_size, seq_len, h, 0)
        layers = max(1, round((total - fixed) / (12 * h * h + 13 * h)))
    _check_positive(layers=layers)
    n_layers = layers
    model = _build(lambda: GPTDecoder(vocab_size, seq_len, h, n_layers, n_heads), seed, device)
    size = decoder_parameters(vocab_size, seq_len, h, n_layers)
    label = f"{size / 1e9:.2f}B" if size >= 1e9 else f"{size / 1e6:.1f}M"
    return _case(f"gpt-decoder-{label}", model, _lm_batch(vocab_size, seq_len),
                 batch_size, seed, token_loss, device)
