"""SMP's ``smp.nn.huggingface.bert`` translators: identities here (see the package docstring)."""

from __future__ import annotations

from modelparallel.torch.nn.huggingface import identity_translation

__all__ = ["translate_hf_state_dict_to_smdistributed_bert", "translate_state_dict_to_hf_bert"]

translate_state_dict_to_hf_bert = identity_translation
translate_hf_state_dict_to_smdistributed_bert = identity_translation
