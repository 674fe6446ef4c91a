"""The sequence-length warmup and the context schedule under FSDP2 with ``composer -n 2`` on the CPU."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import launch, launch_failure, read_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.launcher
def test_warmup_and_context_schedule_under_fsdp2_match_ddp(tiny_recipe, tmp_path):
    """A warmup (8 -> 16 tokens) inside a 16-token phase, then a 32-token phase with linear RoPE x2
    on a model declaring 16 positions: FSDP2 trains what DDP trains, token counts included, its phase
    export holds the full weights (gathered on rank 0) and a sharded checkpoint in phase 2 resumes
    with the phase's RoPE."""
    tiny_recipe["model"]["config"]["max_position_embeddings"] = 16
    tiny_recipe.update(eval_first=False, eval_interval="8ba", save_interval="3ba", max_duration="8ba")
    tiny_recipe["algorithms"] = {
        "seq_length_warmup": {"min_seq_length": 8, "max_seq_length": 16, "step_size": 8, "duration": "2ba"},
        "context_length_schedule": {"eval_batches": 1, "phases": [
            {"name": "short", "seq_length": 16, "duration": "0.5dur"},
            {"name": "long", "seq_length": 32, "duration": "0.5dur", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        ]},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    runs = ["ddp", "sharded", "sharded@ep0-ba6"]
    proc = launch(os.path.join(ROOT, "tests", "scripts", "fsdp_runs.py"),
                  [str(path), str(tmp_path / "p{rank}.json"), *runs], tmp_path, own_shm=True)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    for rank in (0, 1):
        results = read_summary(tmp_path / f"p{rank}.json")
        ddp, fsdp, resumed = (results[r] for r in runs)
        assert fsdp["fsdp"] and fsdp["units"] == 2 + 1 and not ddp["fsdp"]
        assert ddp["lengths"] == fsdp["lengths"] == [8, 8, 16, 16, 32, 32, 32, 32]
        # 256 tokens a step (16 rows of 16, then 8 rows of 32); the warmup halves the first two
        assert ddp["tokens"] == fsdp["tokens"] == 2 * 128 + 6 * 256
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
        assert resumed["losses"] == pytest.approx(fsdp["losses"][6:], abs=1e-6)
        assert resumed["tokens"] == fsdp["tokens"]
    exports = {r: AutoModelForCausalLM.from_pretrained(tmp_path / r / "long").eval() for r in runs[:2]}
    for name, model in exports.items():
        assert model.config.architectures == ["LlamaForCausalLM"], name
        assert model.config.rope_scaling["factor"] == 2.0, name
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.allclose(exports["sharded"](ids).logits, exports["ddp"](ids).logits, atol=1e-4)
