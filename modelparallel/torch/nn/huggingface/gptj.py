"""SMP's ``smp.nn.huggingface.gptj`` translators: identities here (see the package docstring)."""

from __future__ import annotations

from modelparallel.torch.nn.huggingface import identity_translation

__all__ = ["translate_hf_state_dict_to_smdistributed_gptj", "translate_state_dict_to_hf_gptj"]

translate_state_dict_to_hf_gptj = identity_translation
translate_hf_state_dict_to_smdistributed_gptj = identity_translation
