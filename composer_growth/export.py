"""The one HF export every part of the suite writes (phase exports, ``lora_merge`` exports,
``composer-growth export``): ``save_pretrained`` that reloads with ``AutoModelForCausalLM``.

A model whose family has ``remote_code`` (llm-foundry's MPT) and whose class lives outside transformers
gets its classes' code copied next to the weights and an ``auto_map`` in ``config.json``, as llm-foundry's
``hf_checkpointer`` writes it: ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
then builds the trained model's class, not transformers' own class of the same ``model_type``.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch
from torch import nn

from composer_growth.families import FAMILIES


def base_class(module: nn.Module) -> type:
    """The class a module had before ``fully_shard`` swapped in its ``FSDP<Class>`` subclass."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def needs_remote_code(hf: nn.Module) -> bool:
    """Whether an export of ``hf`` must carry its classes' code (the family says so and transformers lacks them)."""
    family = FAMILIES.get(getattr(hf.config, "model_type", None))
    return bool(family and family.remote_code) and not base_class(hf).__module__.startswith("transformers.")


def save_pretrained(hf: nn.Module, folder: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """``hf.save_pretrained``, naming the model's own class even where ``fully_shard`` swapped it, with the
    model's code and ``auto_map`` where the family needs remote code."""
    hf.save_pretrained(folder, state_dict=state_dict)
    own = base_class(hf).__name__
    if hf.config.architectures != [own]:
        hf.config.architectures = [own]
        hf.config.save_pretrained(folder)
    if needs_remote_code(hf):
        write_remote_code(hf, folder)


def save_config(hf: nn.Module, folder: str) -> None:
    """The model's config alone (a base for adapters), with its code and ``auto_map`` where needed."""
    hf.config.save_pretrained(folder)
    if needs_remote_code(hf):
        write_remote_code(hf, folder)


def write_remote_code(hf: nn.Module, folder: str) -> None:
    """Copy the modules defining the model's and its config's classes into ``folder``, name them in
    ``config.json``'s ``auto_map``, and run the family's ``code_editor`` on the copies."""
    from transformers.dynamic_module_utils import custom_object_save

    auto_map: dict[str, Any] = {}
    for cls, auto in ((type(hf.config), "AutoConfig"), (base_class(hf), "AutoModelForCausalLM")):
        custom_object_save(cls, folder)  # the class's module file and its relative imports
        auto_map[auto] = f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["auto_map"] = {**config.get("auto_map", {}), **auto_map}
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    editor = FAMILIES[hf.config.model_type].code_editor
    if editor:
        module, name = editor.split(":")
        getattr(importlib.import_module(module), name)(folder)
