"""SMP's Hugging Face state-dict translators (``smp.nn.huggingface.<model>``).

SMP needed them because its tensor-parallel modules renamed and reshaped the weights. Here the
model is never rewritten (no tensor parallelism), so a state dict already has the Hugging Face
names and shapes: every translator returns the dict unchanged (a copy). They exist so scripts
that call them run as written.

Example:
    >>> from modelparallel.torch.nn.huggingface.gpt2 import translate_state_dict_to_hf_gpt2
    >>> translate_state_dict_to_hf_gpt2({"a": 1}, max_seq_len=8)
    {'a': 1}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["identity_translation"]


def identity_translation(state_dict: Mapping[str, Any], max_seq_len: int | None = None
                         ) -> dict[str, Any]:
    """The state dict unchanged (our state dicts keep the original names and shapes)."""
    return dict(state_dict)
