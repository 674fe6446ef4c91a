"""Corpus -> tokenizer -> MDS shards of packed token sequences, and their loaders."""

from composer_growth.data.loaders import build_lm_dataloader, lm_collate
from composer_growth.data.prepare import SOURCES, prepare_dataset

__all__ = ["SOURCES", "build_lm_dataloader", "lm_collate", "prepare_dataset"]
