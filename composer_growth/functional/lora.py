"""LoRA adapters on chosen submodules, and merging them back into plain weights."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from composer_growth.errors import check
from composer_growth.families import set_path, unwrap_hf


def add_lora(model: nn.Module, modules: Iterable[str], rank: int = 8, alpha: float | None = None,
             dropout: float = 0.0) -> list[str]:
    """Wrap the named linear submodules of the HF model in LoRA adapters (peft), in place.

    Only the adapters of the wrapped modules train from then on; every other parameter keeps the
    ``requires_grad`` it had. Returns the wrapped module names. The base weights of a wrapped
    module are renamed ``<module>.base_layer.weight``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    check(isinstance(rank, int) and rank >= 1, "rank", rank, "an integer >= 1")
    hf = unwrap_hf(model)
    targets = sorted(set(modules))
    if not targets:
        return []
    trainable = {id(p) for p in hf.parameters() if p.requires_grad}
    # a string target is matched against each module's full name with re.fullmatch
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules="|".join(re.escape(t) for t in targets))
    inject_adapter_in_model(config, hf)
    for name, p in hf.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
        elif ".base_layer." in name:
            p.requires_grad_(False)
        else:
            p.requires_grad_(id(p) in trainable)
    return targets


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and put the plain module back, in place.

    After this the model is a plain transformers model again (``save_pretrained`` output loads
    with ``from_pretrained``). Returns how many modules were merged.
    """
    from peft.tuners.lora import LoraLayer

    hf = unwrap_hf(model)
    wrapped = [(name, m) for name, m in hf.named_modules() if isinstance(m, LoraLayer)]
    for name, module in wrapped:
        module.merge()
        set_path(hf, name, module.get_base_layer())
    return len(wrapped)
