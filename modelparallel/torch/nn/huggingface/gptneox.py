"""SMP's ``smp.nn.huggingface.gptneox`` translators: identities here (see the package docstring)."""

from __future__ import annotations

from modelparallel.torch.nn.huggingface import identity_translation

__all__ = ["translate_hf_state_dict_to_smdistributed_gptneox", "translate_state_dict_to_hf_gptneox"]

translate_state_dict_to_hf_gptneox = identity_translation
translate_hf_state_dict_to_smdistributed_gptneox = identity_translation
