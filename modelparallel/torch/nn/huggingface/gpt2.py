"""SMP's ``smp.nn.huggingface.gpt2`` translators: identities here (see the package docstring)."""

from __future__ import annotations

from modelparallel.torch.nn.huggingface import identity_translation

__all__ = ["translate_hf_state_dict_to_smdistributed_gpt2", "translate_state_dict_to_hf_gpt2"]

translate_state_dict_to_hf_gpt2 = identity_translation
translate_hf_state_dict_to_smdistributed_gpt2 = identity_translation
