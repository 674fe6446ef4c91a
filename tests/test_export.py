"""``composer-growth export CHECKPOINT OUT``: a grown (and LoRA) run's Composer checkpoint as a plain HF
folder that ``AutoModelForCausalLM`` loads as the trained model, and the grown model block that builds
the same shape in a fresh run."""

from __future__ import annotations

import pytest
import torch
import yaml

from composer_growth import LoraMergeRestart, StackLayers, WidenMLP
from composer_growth.cli import main
from composer_growth.unwrap import unwrap_hf

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 64
CONFIG = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=32, vocab_size=VOCAB)


def _fit(tmp_path, algorithms, peft=False):
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG))
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                 task_type="CAUSAL_LM")
    model = HuggingFaceModel(hf, use_logits=True, peft_config=peft_config, should_save_peft_only=False)  # as recipes
    ids = torch.randint(0, VOCAB, (24, 16), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": r, "labels": r.clone()} for r in ids], batch_size=4)
    trainer = Trainer(model=model, train_dataloader=data, max_duration="5ba", algorithms=algorithms,
                      optimizers=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                      save_folder=str(tmp_path / "ckpt"), save_interval="5ba", progress_bar=False,
                      log_to_console=False, seed=1)
    trainer.fit()
    return trainer, str(tmp_path / "ckpt" / "ep0-ba5-rank0.pt")


@torch.no_grad()
def _logits(model):
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    return model.eval()(ids).logits


@pytest.mark.parametrize("peft", [False, True], ids=["grown", "grown_peft_lora_merge"])
def test_export_reloads_the_trained_model_and_prints_its_grown_block(tmp_path, capsys, peft):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    algorithms = [StackLayers(at="2ba", times=2), WidenMLP(at="3ba", factor=2.0)]
    if peft:
        algorithms.append(LoraMergeRestart(interval="2ba", prune="reset"))
    trainer, checkpoint = _fit(tmp_path, algorithms, peft=peft)
    trained = trainer.state.model.model  # the peft model where there is one: its forward has the adapters
    out = tmp_path / "hf"
    assert main(["export", checkpoint, str(out)]) == 0
    printed = capsys.readouterr().out
    export = AutoModelForCausalLM.from_pretrained(out)
    assert type(export) is LlamaForCausalLM and export.config.num_hidden_layers == 4
    torch.testing.assert_close(_logits(export), _logits(trained), rtol=0, atol=1e-5)
    # the printed recipe block, over the run's model config, builds a model the export's weights fit exactly
    blocks = [yaml.safe_load(part) for part in printed.split("# ")[1:] if part.startswith("recipe:")]
    block = yaml.safe_load(printed.split("# recipe:")[1])["model"]["config"]
    assert block["num_hidden_layers"] == 4 and block["intermediate_size"] == 64, blocks
    fresh = LlamaForCausalLM(LlamaConfig(**{**CONFIG, **block}))
    fresh.load_state_dict(unwrap_hf(export).state_dict(), strict=True)
    foundry = yaml.safe_load(printed.split("# llm-foundry:")[1].split("# recipe:")[0])["model"]
    assert foundry["name"] == "hf_causal_lm" and foundry["config_overrides"] == block


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 2
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path / "junk.pt"), str(tmp_path / "out")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("composer-growth: error: checkpoint=") for line in errors)
    assert "missing.pt" in errors[0] and "junk.pt" in errors[1]
    # a pickle of objects weights_only refuses: one line that names the flag
    torch.save({"state": {"model": {}}, "obj": object.__new__(StackLayers)}, tmp_path / "pickled.pt")
    assert main(["export", str(tmp_path / "pickled.pt"), str(tmp_path / "out")]) == 2
    assert "--trust-checkpoint" in capsys.readouterr().err
    # folders: one without .metadata is no sharded checkpoint; a damaged one fails in one line too
    (tmp_path / "folder").mkdir()
    assert main(["export", str(tmp_path / "folder"), str(tmp_path / "out"), "--trust-checkpoint"]) == 2
    (tmp_path / "folder" / ".metadata").write_bytes(b"damaged")
    assert main(["export", str(tmp_path / "folder"), str(tmp_path / "out"), "--trust-checkpoint"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "sharded checkpoint folder (with .metadata)" in errors[0], errors
    assert "a readable sharded checkpoint" in errors[1], errors
