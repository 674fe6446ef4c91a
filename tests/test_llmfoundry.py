"""llm-foundry's own training entry (``train_from_yaml``) with every algorithm of the suite named under
``algorithms:`` (found through the ``llmfoundry_algorithms`` entry points), on a tiny llama built from a
local config and MDS shards in llm-foundry's ``tokens`` format written here; a checkpoint and a resume.

llm-foundry pins transformers < 4.52 and mosaicml-streaming < 0.13, so it lives in its own environment:
``pip install -e ".[dev,foundry]"`` (``.ci/run foundry``). Without it this module is skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml

llmfoundry = pytest.importorskip("llmfoundry")
pytestmark = pytest.mark.foundry

SEQ = 32
ROWS = 4  # rows per batch


def _shards(out, tokenizer_dir, n_rows, seed):
    """Packed sequences of SEQ token ids in llm-foundry's ``tokens`` column (ndarray:int32)."""
    import numpy as np
    from streaming import MDSWriter
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(out), columns={"tokens": "ndarray:int32"}) as writer:
        for _ in range(n_rows):
            writer.write({"tokens": rng.integers(0, vocab, SEQ, dtype=np.int32)})


@pytest.fixture(scope="module")
def foundry_setup(tiny_data, tmp_path_factory):
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("foundry")
    tokenizer_dir = os.path.join(tiny_data, "tokenizer")
    _shards(root / "data" / "train", tokenizer_dir, 64, seed=0)
    _shards(root / "data" / "val", tokenizer_dir, 16, seed=1)
    LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(root / "llama")
    return root, tokenizer_dir


def _config(root, tokenizer_dir, save_folder, **extra):
    loader = {"name": "text", "drop_last": True, "num_workers": 0, "prefetch_factor": None, "pin_memory": False,
              "persistent_workers": False,
              "dataset": {"local": str(root / "data"), "split": "train", "shuffle": False, "max_seq_len": SEQ}}
    return {
        "run_name": "foundry-tiny", "seed": 17, "max_seq_len": SEQ,
        "model": {"name": "hf_causal_lm", "pretrained_model_name_or_path": str(root / "llama"), "pretrained": False,
                  "init_device": "cpu"},
        "tokenizer": {"name": tokenizer_dir, "kwargs": {"model_max_length": SEQ}},
        "train_loader": loader,
        "eval_loader": {**loader, "drop_last": False, "dataset": {**loader["dataset"], "split": "val"}},
        "optimizer": {"name": "decoupled_adamw", "lr": 3e-3},
        "scheduler": {"name": "cosine_with_warmup", "t_warmup": "2ba", "alpha_f": 0.1},
        # (written in sorted order: the schedule listed before the warmup; it still cuts to its phase first)
        "algorithms": {
            "seq_length_warmup": {"min_seq_length": 8, "max_seq_length": 16, "step_size": 8, "duration": "2ba"},
            "context_length_schedule": {"phases": [{"name": "short", "seq_length": 16, "duration": "0.5dur"},
                                                   {"name": "long", "seq_length": SEQ}],
                                        "save_checkpoints": False, "export_hf": False, "eval_batches": 1,
                                        "verbose": False},
            "stack_layers": {"at": "3ba", "mode": "repeat", "times": 2},
            "widen_mlp": {"at": "4ba", "factor": 2.0},
        },
        "max_duration": "6ba", "eval_interval": "3ba", "eval_first": False, "eval_subset_num_batches": 1,
        "global_train_batch_size": ROWS, "device_train_microbatch_size": ROWS, "device_eval_batch_size": ROWS,
        "precision": "fp32", "progress_bar": False, "log_to_console": False,
        "save_folder": str(save_folder), "save_interval": "3ba", "save_num_checkpoints_to_keep": -1,
        "autoresume": False,
        **extra,
    }


def _train(config, path):
    from llmfoundry.command_utils import train_from_yaml

    path.write_text(yaml.safe_dump(config))
    return train_from_yaml(str(path), [])


def test_train_from_yaml_with_every_algorithm_and_resume(foundry_setup, tmp_path, one_thread):
    from composer_growth import ContextLengthSchedule, SeqLengthWarmup, StackLayers, WidenMLP
    from composer_growth.unwrap import unwrap_hf

    root, tokenizer_dir = foundry_setup
    full = _train(_config(root, tokenizer_dir, tmp_path / "ckpt"), tmp_path / "full.yaml")
    kinds = [type(a) for a in full.state.algorithms]
    for cls in (SeqLengthWarmup, ContextLengthSchedule, StackLayers, WidenMLP):
        assert cls in kinds, cls  # found by name through the llmfoundry_algorithms entry points
    algs = {type(a): a for a in full.state.algorithms}
    assert algs[StackLayers].record["batch"] == 3 and algs[WidenMLP].record["batch"] == 4
    hf = unwrap_hf(full.state.model)
    assert hf.config.num_hidden_layers == 4 and hf.config.intermediate_size == 128
    assert algs[ContextLengthSchedule].phase.name == "long"
    # llm-foundry counts tokens from its per-row total_tokens: those of the cut batches. The schedule reshapes
    # 4 x 32 into 8 x 16 rows in its first phase, the warmup truncates those to 8, 8, then passes 16;
    # then 3 batches of 4 x 32.
    assert int(full.state.timestamp.token) == 2 * ROWS * (8 + 8 + 16) + 3 * ROWS * SEQ

    # resume from the checkpoint written right after the depth growth at batch 3
    resumed_cfg = _config(root, tokenizer_dir, tmp_path / "resumed",
                          load_path=str(tmp_path / "ckpt" / "ep0-ba3-rank0.pt"))
    resumed = _train(resumed_cfg, tmp_path / "resumed.yaml")
    assert int(resumed.state.timestamp.batch) == 6
    assert int(resumed.state.timestamp.token) == int(full.state.timestamp.token)
    grown = unwrap_hf(resumed.state.model)
    assert grown.config.num_hidden_layers == 4 and grown.config.intermediate_size == 128
    for (name, a), (_, b) in zip(hf.named_parameters(), grown.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
