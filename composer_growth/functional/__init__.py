"""Functional ops on plain objects (model, batch, optimizer): what to do, with no Trainer."""

from composer_growth.functional.batch import set_batch_sequence_length
from composer_growth.functional.flops import matmul_params, training_flops_per_token
from composer_growth.functional.growth import ParamSource, param_names, stack_layers, widen_mlp
from composer_growth.functional.lora import (LORA_GROUPS, PRUNE_MODES, add_lora, lora_target_modules, lora_targets,
                                             merge_and_reinit_lora, merge_lora, merged_model, merged_state_dict,
                                             prune_optimizer_state, resize_lora_rank, scale_lora_alpha)
from composer_growth.functional.optim import transfer_optimizer_state
from composer_growth.functional.rope import (SUPPORTED_ROPE_TYPES, apply_rope_scaling, max_addressable_positions,
                                             validate_rope_scaling)

__all__ = ["LORA_GROUPS", "PRUNE_MODES", "SUPPORTED_ROPE_TYPES", "ParamSource", "add_lora", "apply_rope_scaling",
           "lora_target_modules", "lora_targets", "matmul_params", "max_addressable_positions", "merge_and_reinit_lora",
           "merge_lora", "merged_model", "merged_state_dict", "param_names", "prune_optimizer_state", "resize_lora_rank",
           "scale_lora_alpha", "set_batch_sequence_length", "stack_layers", "training_flops_per_token",
           "transfer_optimizer_state", "validate_rope_scaling",
           "widen_mlp"]
