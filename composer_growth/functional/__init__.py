"""Functional ops on plain objects (model, batch, optimizer): what to do, with no Trainer."""

from composer_growth.functional.batch import set_batch_sequence_length
from composer_growth.functional.flops import matmul_params, training_flops_per_token
from composer_growth.functional.growth import ParamSource, param_names, stack_layers, widen_mlp
from composer_growth.functional.lora import add_lora, merge_lora
from composer_growth.functional.optim import transfer_optimizer_state
from composer_growth.functional.rope import (SUPPORTED_ROPE_TYPES, apply_rope_scaling, max_addressable_positions,
                                             validate_rope_scaling)

__all__ = ["SUPPORTED_ROPE_TYPES", "ParamSource", "add_lora", "apply_rope_scaling", "matmul_params", "merge_lora", "max_addressable_positions", "param_names",
           "set_batch_sequence_length", "stack_layers", "training_flops_per_token", "transfer_optimizer_state", "validate_rope_scaling",
           "widen_mlp"]
