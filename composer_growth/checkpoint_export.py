"""``composer-growth export CHECKPOINT OUT``: a run's Composer checkpoint (grown, with LoRA adapters) as a
plain HF folder, and the grown model block that builds the same shape in a fresh run.

The model is rebuilt from what Composer's ``HuggingFaceModel`` stores in every checkpoint
(``state['integrations']['huggingface']['model']``: the config as it was when the checkpoint was
written, so grown, the model's class, and a peft model's adapter config); ``--config`` names a
``config.json`` where that is missing. Adapters (a peft model's, or those ``lora_merge`` ``start_at``
and ``stack_lora`` add) are folded into the weights. The folder is written by the suite's one export
(:func:`composer_growth.export.save_pretrained`).
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any

import torch
from torch import nn

from composer_growth.errors import ConfigError
from composer_growth.families import config_get, family_of


def _data_globals() -> list[Any]:
    """The plain data types a Composer checkpoint pickles besides tensors (its timestamps' ``timedelta``, the
    torch version, the rng state's numpy arrays), allowed in the ``weights_only`` load; nothing that runs code."""
    import datetime

    import numpy as np
    from torch.torch_version import TorchVersion

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    return [datetime.timedelta, TorchVersion, np.ndarray, np.dtype, _reconstruct, *dtypes]


def read_checkpoint(path: str, trust: bool = False) -> dict[str, Any]:
    """The checkpoint's dict, read with ``weights_only=True`` and Composer's plain data types allowed (with
    pickle only when ``trust``)."""
    if not os.path.exists(path):
        raise ConfigError("checkpoint", path, "an existing Composer checkpoint file (.pt)")
    if os.path.isdir(path):
        return _read_sharded(path, trust)
    try:
        with torch.serialization.safe_globals(_data_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        if "weights_only" not in str(e) or trust:
            raise ConfigError("checkpoint", path, "a Composer checkpoint (torch could not read it)") from None
        raise ConfigError("checkpoint", path, "a checkpoint torch.load(weights_only=True) reads; this one holds "
                          "other objects: pass --trust-checkpoint to unpickle it (only for files you trust)") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise ConfigError("checkpoint", path, f"a Composer checkpoint ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state"), dict) or "model" not in ckpt["state"]:
        raise ConfigError("checkpoint", path, "a Composer checkpoint (a dict with state.model)")
    return ckpt


def _read_sharded(path: str, trust: bool) -> dict[str, Any]:
    """A sharded checkpoint folder (torch.distributed.checkpoint, as Composer writes it under FSDP2), gathered
    into one dict on this process. Its ``.metadata`` is a pickle, so it is read only when ``trust``."""
    import tempfile

    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise ConfigError("checkpoint", path, "a Composer checkpoint file (.pt) or a sharded checkpoint folder "
                          "(with .metadata)")
    if not trust:
        raise ConfigError("checkpoint", path, "a sharded folder is read by torch.distributed.checkpoint, which "
                          "unpickles its .metadata: pass --trust-checkpoint (only for folders you trust)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            dcp_to_torch_save(path, os.path.join(tmp, "full.pt"))
        except (CheckpointException, Exception) as e:  # CheckpointException is a BaseException
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            raise ConfigError("checkpoint", path, f"a readable sharded checkpoint ({last[0].strip()[:120]})") from None
        ckpt = torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state"), dict) or "model" not in ckpt["state"]:
        raise ConfigError("checkpoint", path, "a Composer checkpoint (a dict with state.model)")
    return ckpt


def _hf_metadata(ckpt: dict[str, Any]) -> dict[str, Any]:
    return ((ckpt["state"].get("integrations") or {}).get("huggingface") or {}).get("model") or {}


def _import(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _build(meta: dict[str, Any], config_path: str | None) -> nn.Module:
    """The empty HF model (no adapters) of the checkpoint's config and class."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    if config_path is not None:
        path = os.path.join(config_path, "config.json") if os.path.isdir(config_path) else config_path
        with open(path) as f:
            content = json.load(f)
    elif "config" in meta:
        content = dict(meta["config"]["content"])
    else:
        raise ConfigError("--config", None, "a config.json of the model: the checkpoint records no HF config "
                          "(state.integrations.huggingface)")
    saved = (meta.get("config") or {}).get("class")
    if saved and saved.startswith("torch.distributed.fsdp."):  # FSDP2's per-instance subclass: built from config
        saved = None
    cls = None
    if saved:
        try:
            cls = _import(saved)
        except (ImportError, AttributeError):
            raise ConfigError("checkpoint", saved, "a model class importable here (install its package)") from None
    if cls is not None and isinstance(cls, type) and issubclass(cls, PreTrainedModel):
        return cls(cls.config_class.from_dict(content))
    # a peft wrapper (or no class recorded): the base model from its config
    config = AutoConfig.for_model(**content)
    return AutoModelForCausalLM.from_config(config)


def _adapter_config(meta: dict[str, Any], sd: dict[str, torch.Tensor], alpha: float | None) -> Any:
    """A peft ``LoraConfig`` for the adapters in ``sd``: the peft model's own, else (adapters ``lora_merge``
    ``start_at`` or ``stack_lora`` added) their rank from their shapes and ``alpha`` as given."""
    from peft import LoraConfig

    ranks = sorted({int(v.shape[0]) for k, v in sd.items() if ".lora_A." in k})
    targets = sorted({k.split(".lora_A.")[0].rsplit(".", 1)[-1] for k in sd if ".lora_A." in k})
    recorded = set((meta.get("peft_config") or {}).get("content", {}).get("target_modules") or targets)
    if len(ranks) > 1 or not set(targets) <= recorded:
        raise ConfigError("checkpoint", f"adapters of ranks {ranks} on {targets}", "adapters of one rank and one "
                          "alpha (a run that mixes them, e.g. model.peft with stack_lora: use lora_merge's "
                          "export_folder or the phase export)")
    if "peft_config" in meta:
        content = {k: v for k, v in meta["peft_config"]["content"].items() if k in LoraConfig.__dataclass_fields__}
        return LoraConfig(**content)
    if alpha is None:
        raise ConfigError("--lora-alpha", None, "the alpha of the adapters the run added (lora_merge alpha, "
                          "default: its rank): the checkpoint does not record it")
    return LoraConfig(r=ranks[0], lora_alpha=alpha, target_modules=targets)


def model_from_checkpoint(ckpt: dict[str, Any], config_path: str | None = None,
                          lora_alpha: float | None = None) -> nn.Module:
    """The checkpoint's HF model, grown as it was saved, with every adapter merged in (plain weights)."""
    meta = _hf_metadata(ckpt)
    hf = _build(meta, config_path)
    sd = {k.removeprefix("model."): v for k, v in ckpt["state"]["model"].items()}
    sd = {k.removeprefix("base_model.model.") if "peft_config" in meta else k: v for k, v in sd.items()}
    if sd and all("lora_" in k for k in sd):
        raise ConfigError("checkpoint", None, "a checkpoint with the base weights: this one holds the adapters only "
                          "(HuggingFaceModel should_save_peft_only=True; recipes save both)")
    if any(".lora_A." in k for k in sd):
        from peft import get_peft_model

        peft = get_peft_model(hf, _adapter_config(meta, sd, lora_alpha))
        peft.base_model.model.load_state_dict(sd, strict=True)
        return peft.merge_and_unload()
    hf.load_state_dict(sd, strict=True)
    return hf


def grown_blocks(hf: nn.Module) -> dict[str, dict[str, Any]]:
    """The model's shape keys as each consumer writes them: llm-foundry's ``mpt_causal_lm`` model block, its
    ``hf_causal_lm`` ``config_overrides``, and our recipes' ``model.config``."""
    family, config = family_of(hf), hf.config
    keys = {family.num_layers_key: config_get(config, family.num_layers_key),
            family.hidden_key: config_get(config, family.hidden_key),
            family.max_positions_key: config_get(config, family.max_positions_key)}
    width = config_get(config, family.intermediate_key)
    if width is not None:
        head, _, tail = family.intermediate_key.partition(".")
        keys[head] = {**(config_get(config, head) or {}), tail: width} if tail else width
    elif family.intermediate_ratio_key:
        keys[family.intermediate_ratio_key] = config_get(config, family.intermediate_ratio_key)
    scaling_head = family.rope_scaling_key.partition(".")[0]
    if config_get(config, family.rope_scaling_key):
        keys[scaling_head] = config_get(config, scaling_head)
    if family.name == "mpt":
        return {"llm-foundry": {"model": {"name": "mpt_causal_lm", **keys}}}
    return {"llm-foundry": {"model": {"name": "hf_causal_lm", "config_overrides": keys}},
            "recipe": {"model": {"config": keys}}}


def export_checkpoint(path: str, out: str, trust: bool = False, config_path: str | None = None,
                      lora_alpha: float | None = None) -> str:
    """Write the HF folder; the text to print (the grown model blocks, YAML)."""
    import yaml

    from composer_growth.export import save_pretrained

    hf = model_from_checkpoint(read_checkpoint(path, trust), config_path, lora_alpha)
    os.makedirs(out, exist_ok=True)
    save_pretrained(hf, out)
    lines = [f"wrote {out} (AutoModelForCausalLM.from_pretrained"
             + (", trust_remote_code=True)" if family_of(hf).remote_code else ")")]
    for name, block in grown_blocks(hf).items():
        lines += [f"# {name}:", yaml.safe_dump(block, sort_keys=False).rstrip()]
    return "\n".join(lines)
