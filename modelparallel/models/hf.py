"""Hugging Face language models built from ``transformers`` configs (no download).

``transformers`` is imported inside the factories, so importing this module needs only torch.
"""

from __future__ import annotations

from typing import Any

import torch

from modelparallel.errors import ConfigError
from modelparallel.models.case import (
    Batch,
    ModelCase,
    _build,
    _case,
    _check_positive,
    _check_size,
    _gen,
    _lm_batch,
    token_loss,
)

__all__ = ["bert", "encoder_decoder", "gpt2", "llama", "t5"]

_GPT2 = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128),
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
    "large": dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024),
    "xl": dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024),
}


def _text_defaults(size: str, batch_size: int | None, seq_len: int | None) -> tuple[int, int]:
    if size == "tiny":
        return batch_size or 4, seq_len or 16
    return batch_size or 8, seq_len or 512


def gpt2(size: str = "tiny", *, seq_len: int | None = None, batch_size: int | None = None,
         tie_embeddings: bool = True, dropout: float = 0.0, seed: int = 0,
         device: str | torch.device = "cpu") -> ModelCase:
    """GPT-2 (``GPT2LMHeadModel``) with a next-token cross-entropy loss.

    Args:
        size: ``"tiny"`` (2 layers, width 64; tests), ``"small"`` (HF ``gpt2``, 124M),
            ``"medium"`` (``gpt2-medium``, 355M), ``"large"`` (``gpt2-large``, 774M) or
            ``"xl"`` (``gpt2-xl``, 1.56B; build it with ``device="meta"`` for planning).
        seq_len: Tokens per sample (default 16 for tiny, 512 otherwise).
        batch_size: Samples per batch (default 4 for tiny, 8 otherwise).
        tie_embeddings: Tie ``lm_head.weight`` to ``transformer.wte.weight`` (as HF does).
        dropout: Every dropout probability.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.

    Example:
        >>> case = gpt2("tiny")
        >>> case.model.lm_head.weight is case.model.transformer.wte.weight
        True
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    dims = _check_size("gpt2", size, _GPT2)
    bs, sl = _text_defaults(size, batch_size, seq_len)
    _check_positive(batch_size=bs, seq_len=sl)
    if sl > dims["n_positions"]:
        raise ConfigError(f"seq_len {sl} exceeds GPT-2 {size}'s {dims['n_positions']} positions")
    cfg = GPT2Config(**dims, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                     tie_word_embeddings=tie_embeddings, bos_token_id=0, eos_token_id=0,
                     use_cache=False)
    model = _build(lambda: GPT2LMHeadModel(cfg), seed, device)
    return _case(f"gpt2-{size}", model, _lm_batch(cfg.vocab_size, sl), bs, seed, token_loss,
                 device)


_BERT = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=128),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522, max_position_embeddings=512),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, vocab_size=30522, max_position_embeddings=512),
}


def bert(size: str = "tiny", *, seq_len: int | None = None, batch_size: int | None = None,
         dropout: float = 0.0, seed: int = 0, device: str | torch.device = "cpu") -> ModelCase:
    """BERT (``BertForMaskedLM``) with a masked-language-model loss.

    The input replaces about 15% of the tokens by a mask id; the target is the original token at
    every position (so every sample contributes the same number of loss terms). The attention
    mask is passed as a keyword input.

    Args:
        size: ``"tiny"``, ``"base"`` (110M) or ``"large"`` (335M).
        seq_len: Tokens per sample (default 16 for tiny, 512 otherwise).
        batch_size: Samples per batch (default 4 for tiny, 8 otherwise).
        dropout: Every dropout probability.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    from transformers import BertConfig, BertForMaskedLM

    dims = _check_size("bert", size, _BERT)
    bs, sl = _text_defaults(size, batch_size, seq_len)
    _check_positive(batch_size=bs, seq_len=sl)
    cfg = BertConfig(**dims, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                     pad_token_id=0)
    model = _build(lambda: BertForMaskedLM(cfg), seed, device)
    vocab = cfg.vocab_size
    mask_id = vocab - 1

    def make(b: int, seed_: int) -> Batch:
        g = _gen(seed_)
        ids = torch.randint(1, vocab - 1, (b, sl), generator=g)
        masked = torch.rand(b, sl, generator=g) < 0.15
        inputs = torch.where(masked, torch.full_like(ids, mask_id), ids)
        return (inputs,), {"attention_mask": torch.ones(b, sl, dtype=torch.long)}, ids
    return _case(f"bert-{size}", model, make, bs, seed, token_loss, device)


_LLAMA = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                 max_position_embeddings=128),
    "small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, intermediate_size=2048, vocab_size=32000,
                  max_position_embeddings=2048),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
               max_position_embeddings=2048),
    "deep": dict(hidden_size=768, num_hidden_layers=48, num_attention_heads=12,
                 num_key_value_heads=12, intermediate_size=2048, vocab_size=32000,
                 max_position_embeddings=2048),
}


def llama(size: str = "tiny", *, seq_len: int | None = None, batch_size: int | None = None,
          dropout: float = 0.0, seed: int = 0, device: str | torch.device = "cpu") -> ModelCase:
    """A Llama decoder (``LlamaForCausalLM``, untied embeddings) with a next-token loss.

    Args:
        size: ``"tiny"``; ``"small"`` (12 layers, hidden 768, ~134M, for the planner
            benchmark); ``"1b"`` (TinyLlama-1.1B shape: 22 layers, hidden 2048, GQA 32/4);
            ``"deep"`` (``"small"`` with 48 layers, ~390M: a graph of about 2,600 ops for the
            planner benchmark; build it with ``device="meta"``).
        seq_len: Tokens per sample (default 16 for tiny, 512 otherwise).
        batch_size: Samples per batch (default 4 for tiny, 8 otherwise).
        dropout: Attention dropout probability.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = _check_size("llama", size, _LLAMA)
    bs, sl = _text_defaults(size, batch_size, seq_len)
    _check_positive(batch_size=bs, seq_len=sl)
    cfg = LlamaConfig(**dims, attention_dropout=dropout, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
    model = _build(lambda: LlamaForCausalLM(cfg), seed, device)
    return _case(f"llama-{size}", model, _lm_batch(cfg.vocab_size, sl), bs, seed, token_loss,
                 device)


_T5 = {
    "tiny": dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=256),
    "small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                  vocab_size=32128),
}


def t5(size: str = "tiny", *, seq_len: int | None = None, target_len: int | None = None,
       batch_size: int | None = None, dropout: float = 0.0, seed: int = 0,
       device: str | torch.device = "cpu") -> ModelCase:
    """T5 (``T5ForConditionalGeneration``, encoder-decoder, tied embeddings).

    Inputs: encoder ``input_ids`` (positional) and ``decoder_input_ids`` (keyword: the labels
    shifted right behind the start token 0). Target: the labels; loss: their mean cross-entropy.

    Args:
        size: ``"tiny"`` or ``"small"`` (HF ``t5-small``, 60M).
        seq_len: Encoder tokens per sample (default 16 for tiny, 512 otherwise).
        target_len: Decoder tokens per sample (default ``seq_len // 2``, at least 2).
        batch_size: Samples per batch (default 4 for tiny, 8 otherwise).
        dropout: Dropout probability.
        seed: Seed for the weights and the example batch.
        device: ``"cpu"``, ``"meta"`` or another torch device.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    dims = _check_size("t5", size, _T5)
    bs, sl = _text_defaults(size, batch_size, seq_len)
    tl = target_len or max(2, sl // 2)
    _check_positive(batch_size=bs, seq_len=sl, target_len=tl)
    extra: dict[str, Any] = dict(dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=1, use_cache=False, tie_word_embeddings=True)
    cfg = T5Config(**dims, **extra)
    model = _build(lambda: T5ForConditionalGeneration(cfg), seed, device)
    vocab = cfg.vocab_size

    def make(b: int, seed_: int) -> Batch:
        g = _gen(seed_)
        ids = torch.randint(2, vocab, (b, sl), generator=g)
        labels = torch.randint(2, vocab, (b, tl), generator=g)
        dec = torch.cat([torch.zeros(b, 1, dtype=torch.long), labels[:, :-1]], dim=1)
        return (ids,), {"decoder_input_ids": dec}, labels
    return _case(f"t5-{size}", model, make, bs, seed, token_loss, device)


def encoder_decoder(**kwargs: Any) -> ModelCase:
    """A tiny encoder-decoder: T5 tiny (see :func:`t5`; keyword arguments pass through)."""
    case = t5("tiny", **kwargs)
    return ModelCase("encoder-decoder", case.model, case.args, case.kwargs, case.target,
                     case.loss_fn, case.make_batch)
