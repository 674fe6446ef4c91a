"""Training FLOPs per token of a transformers causal LM, counted from its config.

``6 N + 12 n_layers L d`` per trained token (the PaLM paper's count, appendix B): ``N`` are the
parameters a token's forward pass multiplies with (every parameter except the input embedding
and learned position tables, which are looked up; the LM head counted once, tied or not), two
FLOPs per multiply-add, three passes (forward, and backward twice as costly); the attention
term is ``Q K^T`` and ``A V`` at sequence length ``L`` over width ``d`` in every layer, full
square (no causal halving), also times three. Layer count and width come from the family table.
"""

from __future__ import annotations

import copy
from typing import Any

from composer_growth.families import family_of


_CACHE: dict[str, int] = {}


def meta_model(config: Any):
    """A causal LM built from ``config`` on the meta device (no memory, no weights): HF's auto class, or
    llm-foundry's MPT for its config."""
    import torch

    config = copy.deepcopy(config)
    with torch.device("meta"):
        if type(config).__module__.startswith("llmfoundry"):
            from llmfoundry.models.mpt import MPTForCausalLM

            return MPTForCausalLM(config)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config)


def matmul_params(config: Any) -> int:
    """``N``: the parameters a token's forward pass multiplies with (see the module docstring).

    Counted on a model built from ``config`` on the meta device (no memory, no weights), once per config.
    """
    key = config.to_json_string(use_diff=False)
    if key not in _CACHE:
        import torch

        model = meta_model(config)
        looked_up = {id(model.get_input_embeddings().weight)}
        for name, module in model.named_modules():  # learned position tables (gpt2's wpe) are lookups too
            if isinstance(module, torch.nn.Embedding) and module.weight.shape[0] == getattr(
                    config, family_of(config, key="model").max_positions_key, None):
                looked_up.add(id(module.weight))
        n = sum(p.numel() for p in model.parameters() if id(p) not in looked_up)
        head = model.get_output_embeddings()
        if head is not None and id(head.weight) in looked_up:  # tied: the head's matmul still costs
            n += head.weight.numel()
        _CACHE[key] = int(n)
    return _CACHE[key]


def training_flops_per_token(config: Any, seq_len: int) -> int:
    """Training FLOPs (forward and backward) per token at sequence length ``seq_len``."""
    family = family_of(config, key="model")
    layers = int(getattr(config, family.num_layers_key))
    width = int(getattr(config, family.hidden_key))
    return 6 * matmul_params(config) + 12 * layers * int(seq_len) * width


def batch_flops(config: Any, batch: Any) -> int:
    """Training FLOPs of one batch of ``input_ids`` (rows x length), at its own length: what Composer's
    speed monitor reads from a model's ``flops_per_batch`` (the same count as llm-foundry's MPT)."""
    rows, length = batch["input_ids"].shape[:2]
    return int(rows) * int(length) * training_flops_per_token(config, int(length))
