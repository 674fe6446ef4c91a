"""The models inside a Trainer's wrappers: one walk through DDP, ``torch.compile``, Composer and peft.

A Trainer holds ``DDP(compile(ComposerModel(peft(PreTrainedModel))))`` or any part of that chain.
:func:`unwrap_composer` stops at the ``ComposerModel`` (what Composer saves and evaluates),
:func:`peft_model` at the peft ``PeftModel`` and :func:`unwrap_hf` at the transformers model.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _inner(model: nn.Module, composer: bool, peft: bool) -> nn.Module | None:
    """The module one wrapper down (None: no wrapper this walk goes through)."""
    if hasattr(model, "_orig_mod"):  # torch.compile
        return model._orig_mod
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    if not composer:
        return None
    if peft and hasattr(model, "get_base_model"):  # peft
        return model.get_base_model()
    for name in ("module", "model"):  # DDP-like wrappers, Composer's HuggingFaceModel
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def unwrap_composer(model: nn.Module) -> nn.Module:
    """The model under DDP and ``torch.compile`` wrappers (for a Trainer: its ``ComposerModel``)."""
    for _ in range(4):
        inner = _inner(model, composer=False, peft=False)
        if inner is None:
            break
        model = inner
    return model


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` inside Composer / DDP / peft / compile wrappers."""
    from transformers import PreTrainedModel

    for _ in range(8):
        if isinstance(model, PreTrainedModel):
            return model
        inner = _inner(model, composer=True, peft=True)
        if inner is None:
            break
        model = inner
    return model


def peft_model(model: nn.Module) -> Any:
    """The peft ``PeftModel`` inside Composer / DDP wrappers (None without LoRA, or without peft)."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    for _ in range(6):
        if isinstance(model, PeftModel):
            return model
        inner = _inner(model, composer=True, peft=False)
        if inner is None:
            return None
        model = inner
    return None


def composer_model(state: Any) -> nn.Module:
    """The ``ComposerModel`` of a Trainer's ``State``, under its DDP / compile wrappers."""
    return unwrap_composer(state.model)
