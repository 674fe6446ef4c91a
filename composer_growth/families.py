"""The one table of model-family facts: where layers, MLPs, attention and rotary embeddings live.

Every op looks a model up here instead of branching on its type. A family is keyed by
``config.model_type``. Paths are dotted attribute paths: ``layers`` from the causal-LM
module, the others from one transformer block (``rotary`` from the causal-LM module). Config keys
may be dotted too: ``attn_config.rope`` reads ``config.attn_config["rope"]`` (:func:`config_get`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from composer_growth.errors import ConfigError
from composer_growth.unwrap import unwrap_hf


@dataclass(frozen=True)
class Family:
    name: str
    layers: str                 # ModuleList of blocks, from the causal LM
    num_layers_key: str         # config key holding the block count
    hidden_key: str             # config key holding the model width
    mlp: str                    # MLP module, from a block
    mlp_in: tuple[str, ...]     # MLP input projections, from the MLP (hidden units are their outputs); absent ones skipped
    mlp_out: str                # MLP output projection, from the MLP
    conv1d: bool                # projections are transformers' Conv1D (weight is [in, out])
    intermediate_key: str       # config key holding the MLP width (written on growth)
    attn: str                   # attention module, from a block
    residual_out: tuple[str, ...]  # projections writing into the residual stream, from a block
    rotary: str | None          # rotary embedding module from the causal LM; None: learned positions
    max_positions_key: str      # config key holding the position table / context size
    embed: str                  # input token embedding, from the causal LM
    rope_theta_keys: tuple[str, ...] = ()  # config keys holding the rotary base (all are set together)
    # the MLP width when intermediate_key is unset: this key's value (else 4) times the model width
    intermediate_ratio_key: str | None = None
    # (config key, kind): the first key that is true names the positions ("rope", "alibi", "learned");
    # none true: "rope" when the family has a rotary module and no such keys, else "learned"
    position_keys: tuple[tuple[str, str], ...] = ()
    # config key holding the rope scaling dict, and the rope types its config accepts (transformers'
    # name -> the config's name); None: every transformers rope type under its own name
    rope_scaling_key: str = "rope_scaling"
    rope_types: tuple[tuple[str, str], ...] | None = None
    positions_bound: bool = False  # the model refuses sequences longer than max_positions_key
    layer_index_attrs: tuple[str, ...] = ("layer_idx",)  # module attributes holding the block's index
    last_layer_index_attrs: tuple[str, ...] = ()  # module attributes holding the last block's index
    per_layer_keys: tuple[str, ...] = ()  # config keys that, when set, tie blocks to their positions (no stacking)
    # the modules outside the blocks' linear layers (ReLoRA trains them at full rank; absent ones skipped)
    position_embed: str | None = None  # learned position table, from the causal LM
    block_norms: tuple[str, ...] = ()  # norm modules, from a block
    final_norm: str | None = None      # the norm after the last block, from the causal LM
    head: str | None = None            # the output projection (LM head), from the causal LM
    # the family's classes may live outside transformers (llm-foundry's MPT), and transformers' own class of
    # the same model_type reads their weights wrongly: an HF export then carries the classes' code and an
    # ``auto_map`` (``from_pretrained(folder, trust_remote_code=True)``); ``code_editor`` ("module:function",
    # called with the folder) makes the copied files load without their package
    remote_code: bool = False
    code_editor: str | None = None

    def intermediate_size(self, config: Any) -> int:
        size = config_get(config, self.intermediate_key)
        if size is None:  # gpt2 leaves n_inner unset: 4 x width; mpt: expansion_ratio x width
            ratio = config_get(config, self.intermediate_ratio_key) if self.intermediate_ratio_key else None
            size = (4 if ratio is None else ratio) * config_get(config, self.hidden_key)
        return int(size)

    def positions(self, config: Any) -> str:
        """How the model built from ``config`` encodes positions: ``rope``, ``alibi`` or ``learned``."""
        for key, kind in self.position_keys:
            if config_get(config, key):
                return kind
        return "rope" if self.rotary is not None and not self.position_keys else "learned"

    def rope_scaling(self, config: Any) -> dict[str, Any] | None:
        """The config's rope scaling as transformers writes it (``rope_type`` names; None: plain rope)."""
        raw = config_get(config, self.rope_scaling_key)
        if not raw or self.rope_types is None:
            return raw or None
        out = dict(raw)
        name = rope_type(out)
        name = {ours: theirs for theirs, ours in self.rope_types or ()}.get(name, name)
        if name == "default" and not set(out) - {"rope_type", "type", "factor"}:
            return None
        out.update(rope_type=name, type=name)
        return out

    def rope_scaling_value(self, scaling: dict[str, Any] | None) -> Any:
        """What the config's ``rope_scaling_key`` holds for a normalised transformers dict (None: plain)."""
        if self.rope_types is None:
            return scaling
        name = rope_type(scaling)
        params = {k: v for k, v in (scaling or {}).items() if k not in ("rope_type", "type")}
        return {"type": dict(self.rope_types)[name], "factor": 1.0, **params}


_SWIGLU = dict(
    layers="model.layers", num_layers_key="num_hidden_layers", hidden_key="hidden_size", mlp="mlp",
    mlp_in=("gate_proj", "up_proj"), mlp_out="down_proj", conv1d=False,
    intermediate_key="intermediate_size", attn="self_attn",
    residual_out=("self_attn.o_proj", "mlp.down_proj"), rotary="model.rotary_emb",
    max_positions_key="max_position_embeddings", rope_theta_keys=("rope_theta",), embed="model.embed_tokens",
    block_norms=("input_layernorm", "post_attention_layernorm"), final_norm="model.norm", head="lm_head",
)

FAMILIES: dict[str, Family] = {
    "llama": Family(name="llama", **_SWIGLU),
    "qwen2": Family(name="qwen2", **_SWIGLU),
    "mistral": Family(name="mistral", **_SWIGLU),
    "gpt2": Family(
        name="gpt2", layers="transformer.h", num_layers_key="n_layer", hidden_key="n_embd", mlp="mlp",
        mlp_in=("c_fc",), mlp_out="c_proj", conv1d=True, intermediate_key="n_inner", attn="attn",
        residual_out=("attn.c_proj", "mlp.c_proj"), rotary=None, max_positions_key="n_positions",
        embed="transformer.wte", position_embed="transformer.wpe", block_norms=("ln_1", "ln_2"),
        final_norm="transformer.ln_f", head="lm_head",
    ),
    "gpt_neox": Family(
        name="gpt_neox", layers="gpt_neox.layers", num_layers_key="num_hidden_layers",
        hidden_key="hidden_size", mlp="mlp", mlp_in=("dense_h_to_4h",), mlp_out="dense_4h_to_h",
        conv1d=False, intermediate_key="intermediate_size", attn="attention",
        residual_out=("attention.dense", "mlp.dense_4h_to_h"), rotary="gpt_neox.rotary_emb",
        max_positions_key="max_position_embeddings", rope_theta_keys=("rope_theta", "rotary_emb_base"),
        embed="gpt_neox.embed_in", block_norms=("input_layernorm", "post_attention_layernorm"),
        final_norm="gpt_neox.final_layer_norm", head="embed_out",
    ),
    # llm-foundry's MPT (``mpt_causal_lm``): ALiBi, learned positions, or RoPE (``rope_impl: hf``)
    "mpt": Family(
        name="mpt", layers="transformer.blocks", num_layers_key="n_layers", hidden_key="d_model", mlp="ffn",
        mlp_in=("gate_proj", "up_proj"), mlp_out="down_proj", conv1d=False,
        intermediate_key="ffn_config.ffn_hidden_size", intermediate_ratio_key="expansion_ratio", attn="attn",
        residual_out=("attn.out_proj", "ffn.down_proj"), rotary="transformer.rotary_embedding",
        max_positions_key="max_seq_len", rope_theta_keys=("attn_config.rope_theta",),
        position_keys=(("attn_config.alibi", "alibi"), ("attn_config.rope", "rope")),
        rope_scaling_key="attn_config.rope_hf_config",
        rope_types=(("default", "no_scaling"), ("linear", "linear"), ("dynamic", "dynamic"), ("llama3", "llama3")),
        positions_bound=True, layer_index_attrs=("block_idx",), last_layer_index_attrs=("max_block_idx",),
        per_layer_keys=("block_overrides",), embed="transformer.wte", position_embed="transformer.wpe",
        block_norms=("norm_1", "norm_2"), final_norm="transformer.norm_f", head="lm_head", remote_code=True,
        code_editor="llmfoundry.utils.huggingface_hub_utils:edit_files_for_hf_compatibility",
    ),
}


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


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """A config value by dotted key; dict levels by item (``attn_config.rope``); ``default`` when absent."""
    for part in key.split("."):
        if isinstance(config, dict):
            config = config.get(part, default)
        else:
            config = getattr(config, part, default)
        if config is default:
            return default
    return config


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The rope type a ``rope_scaling`` dict names: ``rope_type``, else the legacy ``type``; none: ``default``."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def config_set(config: Any, key: str, value: Any) -> None:
    """Set a config value by dotted key (dict levels by item; missing dict levels are created)."""
    *parents, last = key.split(".")
    for part in parents:
        config = config.setdefault(part, {}) if isinstance(config, dict) else getattr(config, part)
    if isinstance(config, dict):
        config[last] = value
    else:
        setattr(config, last, value)


FULL_RANK_GROUPS = ("embeddings", "norms", "head")


def module_group(model: nn.Module, group: str) -> list[str]:
    """Names (from the HF model) of the modules of one of :data:`FULL_RANK_GROUPS` that the model has:
    ``embeddings`` (token and learned position tables), ``norms`` (every block's norms and the final
    norm) or ``head`` (the LM head)."""
    hf = unwrap_hf(model)
    family = family_of(hf)
    if group == "embeddings":
        paths = [family.embed, family.position_embed]
    elif group == "norms":
        n = len(get_path(hf, family.layers))
        paths = [f"{family.layers}.{i}.{norm}" for i in range(n) for norm in family.block_norms] + [family.final_norm]
    elif group == "head":
        paths = [family.head]
    else:
        raise ConfigError("full_rank", group, f"a list of {', '.join(FULL_RANK_GROUPS)}")
    return [p for p in paths if p is not None and _has_path(hf, p)]


def _has_path(root: Any, path: str) -> bool:
    try:
        return isinstance(get_path(root, path), nn.Module)
    except AttributeError:
        return False


def block_types(model: nn.Module) -> tuple[type, ...]:
    """The classes of the transformer blocks of an HF model (or any wrapper of one), from the table."""
    hf = unwrap_hf(model)
    return tuple({type(block) for block in get_path(hf, family_of(hf).layers)})


def mark_fsdp_blocks(model: nn.Module) -> None:
    """One FSDP unit (and one activation-checkpointing unit) per transformer block.

    Composer's FSDP2 wraps each direct child of the ``ComposerModel`` (here the HF model) and, inside
    it, every module for which the child's ``fsdp_wrap_fn`` answers True; activation checkpointing
    asks its ``activation_checkpointing_fn`` the same way. Blocks added later by growth are of the
    same classes.
    """
    hf = unwrap_hf(model)
    kinds = block_types(hf)

    def is_block(module: nn.Module) -> bool:
        return isinstance(module, kinds)

    hf.fsdp_wrap_fn = is_block
    hf.activation_checkpointing_fn = is_block
