"""SMP's ``smp.nn.huggingface.roberta`` translators: identities here (see the package docstring)."""

from __future__ import annotations

from modelparallel.torch.nn.huggingface import identity_translation

__all__ = ["translate_hf_state_dict_to_smdistributed_roberta", "translate_state_dict_to_hf_roberta"]

translate_state_dict_to_hf_roberta = identity_translation
translate_hf_state_dict_to_smdistributed_roberta = identity_translation
