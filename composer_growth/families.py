"""The one table of model-family facts: where layers, MLPs, attention and rotary embeddings live.

Every op looks a model up here instead of branching on its type. A family is keyed by
``config.model_type``. Paths are dotted attribute paths: ``layers`` from the causal-LM
module, the others from one transformer block (``rotary`` from the causal-LM module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from composer_growth.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    layers: str                 # ModuleList of blocks, from the causal LM
    num_layers_key: str         # config key holding the block count
    hidden_key: str             # config key holding the model width
    mlp: str                    # MLP module, from a block
    mlp_in: tuple[str, ...]     # MLP input projections, from the MLP (hidden units are their outputs)
    mlp_out: str                # MLP output projection, from the MLP
    conv1d: bool                # projections are transformers' Conv1D (weight is [in, out])
    intermediate_key: str       # config key holding the MLP width
    attn: str                   # attention module, from a block
    residual_out: tuple[str, ...]  # projections writing into the residual stream, from a block
    rotary: str | None          # rotary embedding module from the causal LM; None: learned positions
    max_positions_key: str      # config key holding the position table / context size
    embed: str                  # input token embedding, from the causal LM
    rope_theta_keys: tuple[str, ...] = ()  # config keys holding the rotary base (all are set together)

    def intermediate_size(self, config: Any) -> int:
        size = getattr(config, self.intermediate_key, None)
        if size is None:  # gpt2 leaves n_inner unset: 4 x width
            size = 4 * getattr(config, self.hidden_key)
        return int(size)


_SWIGLU = dict(
    layers="model.layers", num_layers_key="num_hidden_layers", hidden_key="hidden_size", mlp="mlp",
    mlp_in=("gate_proj", "up_proj"), mlp_out="down_proj", conv1d=False,
    intermediate_key="intermediate_size", attn="self_attn",
    residual_out=("self_attn.o_proj", "mlp.down_proj"), rotary="model.rotary_emb",
    max_positions_key="max_position_embeddings", rope_theta_keys=("rope_theta",), embed="model.embed_tokens",
)

FAMILIES: dict[str, Family] = {
    "llama": Family(name="llama", **_SWIGLU),
    "qwen2": Family(name="qwen2", **_SWIGLU),
    "mistral": Family(name="mistral", **_SWIGLU),
    "gpt2": Family(
        name="gpt2", layers="transformer.h", num_layers_key="n_layer", hidden_key="n_embd", mlp="mlp",
        mlp_in=("c_fc",), mlp_out="c_proj", conv1d=True, intermediate_key="n_inner", attn="attn",
        residual_out=("attn.c_proj", "mlp.c_proj"), rotary=None, max_positions_key="n_positions",
        embed="transformer.wte",
    ),
    "gpt_neox": Family(
        name="gpt_neox", layers="gpt_neox.layers", num_layers_key="num_hidden_layers",
        hidden_key="hidden_size", mlp="mlp", mlp_in=("dense_h_to_4h",), mlp_out="dense_4h_to_h",
        conv1d=False, intermediate_key="intermediate_size", attn="attention",
        residual_out=("attention.dense", "mlp.dense_4h_to_h"), rotary="gpt_neox.rotary_emb",
        max_positions_key="max_position_embeddings", rope_theta_keys=("rope_theta", "rotary_emb_base"),
        embed="gpt_neox.embed_in",
    ),
}


def unwrap_composer(model: nn.Module) -> nn.Module:
    """The model under DDP and ``torch.compile`` wrappers (for a Trainer: its ``ComposerModel``)."""
    for _ in range(4):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            break
    return model


def unwrap_hf(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` inside Composer / DDP / peft / compile wrappers."""
    from transformers import PreTrainedModel

    for _ in range(8):
        if isinstance(model, PreTrainedModel):
            return model
        if hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP
            model = model.module
        elif isinstance(getattr(model, "model", None), nn.Module):  # Composer HuggingFaceModel
            model = model.model
        else:
            break
    return model


def family_of(model_or_type: Any, key: str = "model.family") -> Family:
    """Look up the family of an HF model, config or ``model_type`` string."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        obj = model_or_type
        if isinstance(obj, nn.Module):
            obj = unwrap_hf(obj)
        config = getattr(obj, "config", obj)
        model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(key, model_type, f"supported families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def get_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_path(root: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, last, value)
