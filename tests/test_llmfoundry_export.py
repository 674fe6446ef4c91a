"""HF exports of llm-foundry's MPT (phase exports, ``lora_merge`` exports, ``composer-growth export``)
reload with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` as the trained
model: its own class, its grown shape, its logits.

Runs in the llm-foundry environment; skipped without llm-foundry.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("llmfoundry")

from composer_growth import ContextLengthSchedule, LoraMergeRestart, StackLayers, WidenMLP  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.foundry]
VOCAB = 128


def _mpt(positions: str):
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

    attn = {"attn_impl": "torch", "alibi": positions == "alibi"}
    config = MPTConfig(d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=32, vocab_size=VOCAB,
                       attn_config=attn, learned_pos_emb=positions == "learned", no_bias=False)
    torch.manual_seed(0)
    return MPTForCausalLM(config)


@torch.no_grad()
def _logits(model, length=32):
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    return model.eval()(ids).logits


def _reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def _fit(model, algorithms, batches=6, save_folder=None):
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from torch.utils.data import DataLoader

    ids = torch.randint(0, VOCAB, (4 * batches, 32), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids],
                        batch_size=4)
    trainer = Trainer(model=HuggingFaceModel(model, use_logits=True), train_dataloader=loader,
                      max_duration=f"{batches}ba", algorithms=algorithms, progress_bar=False, log_to_console=False,
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2), seed=3,
                      save_folder=save_folder, save_interval=f"{batches}ba")
    trainer.fit()
    return trainer


@pytest.mark.parametrize("positions", ["alibi", "learned"])
def test_mpt_phase_and_lora_merge_exports_reload_as_the_trained_model(positions, tmp_path):
    model = _mpt(positions)
    schedule = ContextLengthSchedule(phases=[{"name": "short", "seq_length": 16, "duration": "3ba"},
                                             {"name": "long", "seq_length": 32}],
                                     save_folder=str(tmp_path), save_checkpoints=False, eval_batches=0, verbose=False)
    algorithms = [schedule, StackLayers(at="2ba", times=2), WidenMLP(at="2ba", factor=1.5),
                  LoraMergeRestart(interval="2ba", start_at="3ba", rank=4, export_folder=str(tmp_path / "merged"))]
    trainer = _fit(model, algorithms)
    from composer_growth.unwrap import unwrap_hf

    trained = unwrap_hf(trainer.state.model)
    assert trained.config.n_layers == 4
    for folder in (tmp_path / "long", tmp_path / "merged"):
        with open(folder / "config.json") as f:
            assert json.load(f)["auto_map"] == {"AutoConfig": "configuration_mpt.MPTConfig",
                                                "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"}
        export = _reload(folder)
        assert type(export).__name__ == "MPTForCausalLM" and "transformers_modules" in type(export).__module__
        assert export.config.n_layers == 4 and export.config.ffn_config["ffn_hidden_size"] == 96
        torch.testing.assert_close(_logits(export), _logits(trained), rtol=0, atol=1e-5)
    # the short phase's export is the model of that phase: 4 blocks (grown at batch 2), no adapters yet
    assert _reload(tmp_path / "short").config.n_layers == 4


def test_mpt_checkpoint_export_and_its_grown_block(tmp_path, capsys):
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

    from composer_growth.cli import main
    from composer_growth.unwrap import unwrap_hf

    model = _mpt("alibi")
    base = model.config.to_dict()
    algorithms = [StackLayers(at="2ba", times=2), WidenMLP(at="2ba", factor=1.5),
                  LoraMergeRestart(interval="2ba", start_at="3ba", rank=4, alpha=4.0)]
    trainer = _fit(model, algorithms, save_folder=str(tmp_path / "ckpt"))
    trained = unwrap_hf(trainer.state.model)
    checkpoint = str(tmp_path / "ckpt" / "ep0-ba6-rank0.pt")
    assert main(["export", checkpoint, str(tmp_path / "hf")]) == 2  # mid-run adapters: their alpha is asked for
    assert "--lora-alpha" in capsys.readouterr().err
    assert main(["export", checkpoint, str(tmp_path / "hf"), "--lora-alpha", "4"]) == 0
    printed = capsys.readouterr().out
    export = _reload(tmp_path / "hf")
    torch.testing.assert_close(_logits(export), _logits(trained), rtol=0, atol=1e-5)
    import yaml

    block = yaml.safe_load(printed.split("# llm-foundry:")[1])["model"]
    assert block["name"] == "mpt_causal_lm" and block["n_layers"] == 4
    assert block["ffn_config"]["ffn_hidden_size"] == 96
    fields = {k: v for k, v in block.items() if k != "name"}
    fresh = MPTForCausalLM(MPTConfig.from_dict({**base, **fields}))
    fresh.load_state_dict(export.state_dict(), strict=True)


# -- composer-growth validate on llm-foundry YAMLs ------------------------------------------------------

YAMLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "yamls", "foundry")


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(YAMLS) if n.endswith(".yaml")))
def test_validate_passes_the_shipped_foundry_yamls(name, capsys, monkeypatch):
    from composer_growth.cli import main

    monkeypatch.chdir(os.path.dirname(os.path.dirname(YAMLS)))
    assert main(["validate", os.path.join("yamls", "foundry", name)]) == 0
    assert "ok (llm-foundry YAML, 4 algorithms" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("algorithms.context_length_schedule.phases.1.seq_length=64",
     r"algorithms.context_length_schedule.phases\[1\].seq_length=64: at most mpt's max_seq_len \(32\): ALiBi"),
    ("variables.max_seq_len=16", r"phases\[1\].seq_length=32: at most mpt's max_seq_len \(16\)"),
    ("model.attn_config.alibi=false model.learned_pos_emb=true algorithms.context_length_schedule.phases.1.seq_length=64",
     r"phases\[1\].seq_length=64: at most mpt's learned position table \(max_seq_len=32\)"),
    ("model.peft_config.r=4", r"model.peft_config=\{'r': 4\}: llm-foundry's mpt_causal_lm ignores it: "
                              r"lora_merge.start_at or stack_layers.stack_lora"),
])
@pytest.mark.parametrize("command", ["validate", "plan"])
def test_validate_and_plan_name_the_key_of_a_bad_mpt_yaml(command, override, message, capsys, monkeypatch, tmp_path):
    import re

    from composer_growth.cli import main

    monkeypatch.chdir(os.path.dirname(os.path.dirname(YAMLS)))
    args = ["--out", str(tmp_path), "--no-png"] if command == "plan" else []
    assert main([command, *args, os.path.join("yamls", "foundry", "mpt_cpu.yaml"), *override.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
