"""The Composer model a recipe trains: Composer's ``HuggingFaceModel`` plus ``flops_per_batch``.

Composer's speed monitor logs FLOPs and MFU only for a model with ``flops_per_batch``, which
``HuggingFaceModel`` lacks. Here it is counted from the model's config at every call, so it follows
each growth (the surgery updates the config) and each warmup length (the batch's own length).
"""

from __future__ import annotations

from collections.abc import Mapping

from composer.models import HuggingFaceModel

from composer_growth.functional.flops import batch_flops

__all__ = ["CausalLM"]


class CausalLM(HuggingFaceModel):
    def flops_per_batch(self, batch: Mapping) -> int:
        """Training FLOPs of ``batch`` on the model as it is now (LoRA adapters' own FLOPs not counted)."""
        return batch_flops(self.model.config, batch)
