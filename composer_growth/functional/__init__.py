"""Functional ops on plain objects (model, batch, optimizer): what to do, with no Trainer."""

from composer_growth.functional.batch import set_batch_sequence_length
from composer_growth.functional.rope import (SUPPORTED_ROPE_TYPES, apply_rope_scaling, max_addressable_positions,
                                             validate_rope_scaling)

__all__ = ["SUPPORTED_ROPE_TYPES", "apply_rope_scaling", "max_addressable_positions", "set_batch_sequence_length",
           "validate_rope_scaling"]
