"""ContextLengthSchedule: phases of growing length with RoPE scaling, on real Trainer runs over MDS shards.

One three-phase run (8 tokens for half the steps, cut from 16-token data; 16 tokens; 32 tokens from
a second dataset with linear rope x2 on a model declaring 16 positions) is shared by the tests that
read its batches, logs and exports; resumes in phase 2 and 3 are compared with it exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import warnings

import pytest
import torch
import yaml
from composer.core import Callback
from composer.loggers import InMemoryLogger
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import composer_growth.algorithms
import composer_growth.algorithms.context_schedule  # noqa: F401  (registers context_length_schedule)
from composer_growth.algorithms.context_schedule import ContextLengthSchedule
from composer_growth.errors import ConfigError
from composer_growth.recipe import load_recipe, run, validate

from conftest import read_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALG = "context_length_schedule"
STEPS = 12  # 6 at 8 tokens, 3 at 16, 3 at 32
TOKENS_PER_STEP = 8 * 16  # the recipe's global batch of 8 rows of the 16-token data


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def data16(tiny_data, tmp_path_factory) -> str:
    """16-token sequences with tiny_data's tokenizer (tiny_data holds 32-token ones)."""
    from composer_growth.data import prepare_dataset

    out = str(tmp_path_factory.mktemp("data") / "tiny16")
    prepare_dataset(out, source="python-source", seq_len=16, tokenizer=os.path.join(tiny_data, "tokenizer"),
                    max_bytes=300_000, val_percent=10)
    return out


def phases(data32: str | None) -> list[dict]:
    return [
        {"name": "short", "seq_length": 8, "duration": "0.5dur", "description": "cut from the 16-token data"},
        {"name": "mid", "seq_length": 16, "duration": "0.25dur", "lr_multiplier": 0.5},
        {"name": "long", "seq_length": 32, "duration": "0.25dur", "dataset": data32,
         "rope_scaling": {"rope_type": "linear", "factor": 2.0}, "lr_multiplier": 0.25},
    ]


def ctx_recipe(folder, data16: str, data32: str, **alg) -> dict:
    folder = str(folder)
    return {
        "run_name": "ctx", "seed": 7,
        "data": {"path": data16},
        "model": {"family": "llama", "config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "max_position_embeddings": 16}},
        "optimizer": {"name": "decoupled_adamw", "lr": 3e-3},
        "scheduler": {"name": "cosine_with_warmup", "t_warmup": "2ba", "alpha_f": 0.1},
        "global_train_batch_size": 8, "device_train_microbatch_size": 4, "device_eval_batch_size": 16,
        "max_duration": f"{STEPS}ba", "eval_interval": "3ba", "eval_subset_num_batches": 2, "progress_bar": False,
        "save_folder": f"{folder}/ckpt", "save_interval": "2ba", "save_num_checkpoints_to_keep": -1,
        "summary_file": f"{folder}/summary.json",
        "algorithms": {ALG: {"phases": phases(data32), "eval_batches": 2, "verbose": False, **alg}},
    }


class Record(Callback):
    """Microbatch shapes, and the learning rate each step uses next to the scheduler's."""

    def __init__(self):
        self.shapes: list[tuple[int, tuple[int, int]]] = []
        self.lrs: list[tuple[int, float, float]] = []

    def before_forward(self, state, logger):
        self.shapes.append((int(state.timestamp.batch), tuple(state.batch["input_ids"].shape)))

    def batch_start(self, state, logger):
        scheduled = state.schedulers[0].get_last_lr()[0]
        self.lrs.append((int(state.timestamp.batch), state.optimizers[0].param_groups[0]["lr"], scheduled))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data16, tiny_data):
    folder = tmp_path_factory.mktemp("full")
    recipe = ctx_recipe(folder, data16, tiny_data)
    plan = validate(copy.deepcopy(recipe))
    memory, record = InMemoryLogger(), Record()
    plan.loggers.append(memory)
    plan.callbacks.append(record)
    trainer = run(plan)
    return {"recipe": recipe, "trainer": trainer, "summary": read_summary(recipe["summary_file"]), "memory": memory,
            "record": record, "folder": str(folder)}


def _values(memory: InMemoryLogger, key: str) -> list:
    return [v for _, v in memory.data.get(key, [])]


@torch.no_grad()
def _logits(model, length: int, vocab: int = 500) -> torch.Tensor:
    ids = torch.arange(length).remainder(vocab - 1).add(1)[None]
    return model(input_ids=ids).logits


# -- a transition gives the model of a fresh from_config -------------------------------------------------

@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config])
def test_transition_matches_fresh_model(config_cls):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=16, attn_implementation="eager")).eval()
    alg = ContextLengthSchedule(phases=[
        {"name": "a", "seq_length": 16, "duration": "0.5dur"},
        {"name": "b", "seq_length": 32, "duration": "0.25dur", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"name": "c", "seq_length": 64, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 16, "rope_theta": 2e4}},
    ])
    plain = _logits(model, 48, 128)
    for phase in ("c", "b", "a", "c"):
        alg.configure_model(model, phase)
        fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
        fresh.load_state_dict(model.state_dict(), strict=True)
        assert torch.equal(_logits(model, 48, 128), _logits(fresh, 48, 128)), phase
        if phase == "a":  # back to the model's own rope: the logits it had before any phase
            assert torch.equal(_logits(model, 48, 128), plain)
    cfg = model.config
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_theta == 2e4
    assert cfg.max_position_embeddings == 64  # yarn with original_max_position_embeddings: factor x original
    alg.configure_model(model, "a")
    assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0 and cfg.max_position_embeddings == 16


# -- a run across all three phases -------------------------------------------------------------------------

def test_three_phases_lengths_batches_and_tokens(full_run):
    info, memory, record = full_run["summary"], full_run["memory"], full_run["record"]
    assert info["batches"] == STEPS
    assert info["tokens_trained"] == STEPS * TOKENS_PER_STEP  # reshape keeps every token; phase 3 loads 4 x 32
    per_batch = [v for (ts, v) in memory.data["context/seq_len"]]
    assert per_batch.count(8) >= 6 and per_batch.count(32) >= 3
    assert _values(memory, "context/tokens_per_step") == [TOKENS_PER_STEP] * STEPS
    # microbatches keep the recipe's 4 x 16 = 64 tokens: 2 per step in every phase
    shapes = [s for _, s in record.shapes]
    assert shapes == [(8, 8)] * 12 + [(4, 16)] * 6 + [(2, 32)] * 6
    assert int(full_run["trainer"].state.timestamp.sample) == 6 * 8 + 3 * 8 + 3 * 4  # loader rows


def test_lr_multiplier_composes_with_the_scheduler(full_run):
    for batch, lr, scheduled in full_run["record"].lrs:
        mult = 1.0 if batch < 6 else 0.5 if batch < 9 else 0.25
        assert lr == pytest.approx(scheduled * mult, rel=1e-12), batch
    # the scheduler itself is untouched: the optimizer holds the scheduled lr between steps
    state = full_run["trainer"].state
    assert state.optimizers[0].param_groups[0]["lr"] == pytest.approx(state.schedulers[0].get_last_lr()[0])


def test_logging_schedule_transitions_and_perplexity(full_run):
    memory = full_run["memory"]
    schedule = memory.hyperparameters["context/schedule"]
    assert [p["seq_length"] for p in schedule] == [8, 16, 32]
    assert memory.hyperparameters["context/schedule/long/rope_factor"] == 2.0
    assert _values(memory, "context/prev_seq_len") == [8, 16]
    assert _values(memory, "rope/factor") == [1.0, 2.0]
    assert _values(memory, "context/addressable_positions") == [16, 32]
    assert _values(memory, "context/max_positions") == [16, 16]
    # evals at 0, 3, 6 (still phase 1), 9, 12 run at the current phase's length
    assert _values(memory, "context/eval_seq_len") == [8, 8, 8, 16, 32]
    assert len(_values(memory, "context/ppl/32")) == 1 and math.isfinite(_values(memory, "context/ppl/32")[0])
    # at each phase end: perplexity at every phase length trained so far
    assert len(_values(memory, "context/phase_end_ppl/8")) == 3
    assert len(_values(memory, "context/phase_end_ppl/16")) == 2
    assert len(_values(memory, "context/phase_end_ppl/32")) == 1
    assert _values(memory, "context/exported_phase") == [0, 1, 2]


def test_phase_exports_reload_with_their_rope(full_run):
    save = full_run["recipe"]["save_folder"]
    for name, rope in (("short", None), ("mid", None), ("long", "linear")):
        folder = os.path.join(save, name)
        assert os.path.isfile(os.path.join(folder, "checkpoint.pt")), name
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert (model.config.rope_scaling or {}).get("rope_type") == rope, name
        with open(os.path.join(folder, "phase.json")) as f:
            assert json.load(f)["name"] == name
        assert os.path.isfile(os.path.join(folder, "tokenizer.json"))
    # the last export is the trained model, and computes what it computes (phase 3: linear x2)
    live = full_run["trainer"].state.model.model.eval()
    reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(save, "long")).eval()
    assert reloaded.config.rope_scaling["factor"] == 2.0 and reloaded.config.max_position_embeddings == 16
    assert torch.allclose(_logits(reloaded, 32), _logits(live, 32), atol=1e-6, rtol=0)
    # a fresh model from the live config with the live weights: the same logits (rotary buffers rebuilt)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(live.config)).eval()
    fresh.load_state_dict(live.state_dict())
    assert torch.equal(_logits(fresh, 32), _logits(live, 32))
    plain = copy.deepcopy(live.config)
    plain.rope_scaling = None
    default = AutoModelForCausalLM.from_config(plain).eval()
    default.load_state_dict(live.state_dict())
    assert not torch.allclose(_logits(default, 32), _logits(live, 32))  # the rope update matters


def test_export_runs_before_the_checkpoint_saver(full_run):
    """The schedule's callbacks join the Trainer's before its checkpoint saver: the checkpoint of a phase's
    last batch records the phase as exported."""
    names = [type(c).__name__ for c in full_run["trainer"].state.callbacks]
    assert names.index("PhaseLengthEval") < names.index("PhaseExport") < names.index("CheckpointSaver")
    saved = torch.load(os.path.join(full_run["recipe"]["save_folder"], "ep0-ba6-rank0.pt"), weights_only=False)
    assert dict(saved["state"]["algorithms"])["ContextLengthSchedule"]["exported"] == ["short"]


@pytest.mark.parametrize("checkpoint, phase", [
    ("ep0-ba8-rank0.pt", "mid"),      # inside phase 2
    ("ep0-ba10-rank0.pt", "long"),    # inside phase 3, one batch into its own dataset
    ("mid/checkpoint.pt", "long"),    # the phase-end checkpoint of phase 2 (batch 9)
])
def test_resume_inside_phase_matches_uninterrupted(full_run, tmp_path, checkpoint, phase):
    recipe = copy.deepcopy(full_run["recipe"])
    folder = tmp_path / "resumed"
    recipe.update(save_folder=str(folder), summary_file=str(tmp_path / "r.json"), autoresume=True)
    os.makedirs(folder)
    shutil.copy(os.path.join(full_run["recipe"]["save_folder"], checkpoint), folder / "ep0-ba-resume-rank0.pt")
    os.symlink("ep0-ba-resume-rank0.pt", os.path.join(folder, "latest-rank0.pt"))
    plan = validate(recipe)
    memory = InMemoryLogger()
    plan.loggers.append(memory)
    trainer = run(plan)
    names = [p["name"] for p in full_run["recipe"]["algorithms"][ALG]["phases"]]
    assert names[memory.data["context/phase"][0][1]] == phase  # the phase of the first resumed batch
    assert trainer.state.algorithms[0].phase.name == "long"
    after, before = read_summary(recipe["summary_file"]), full_run["summary"]
    assert after["tokens_trained"] == before["tokens_trained"]
    assert after["train_loss"] == before["train_loss"]
    assert [e["loss"] for e in after["evals"]] == [e["loss"] for e in before["evals"]]
    live, ref = trainer.state.model.model, full_run["trainer"].state.model.model
    for (name, a), b in zip(live.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
    assert live.config.rope_scaling == ref.config.rope_scaling
    exported = {"mid", "long"} if checkpoint.startswith("ep0-ba8") else {"long"}  # ended after the checkpoint
    assert exported <= set(os.listdir(folder)) and "short" not in os.listdir(folder)


# -- one dataset at the longest length, token shares, truncate ---------------------------------------------

def test_token_shares_from_one_long_dataset_truncate(tmp_path, tiny_data):
    recipe = ctx_recipe(tmp_path, tiny_data, tiny_data, mode="truncate")
    recipe["model"]["config"]["max_position_embeddings"] = 32
    recipe["algorithms"][ALG]["phases"] = [
        {"name": "t8", "seq_length": 8, "duration": "0.5dur"},
        {"name": "t16", "seq_length": 16, "duration": "0.25dur"},
        {"name": "t32", "seq_length": 32, "duration": "0.25dur"},
    ]
    recipe.update(max_duration="3072tok", eval_first=False, eval_interval="100ba", save_interval="100ba",
                  scheduler={"name": "constant"})
    plan = validate(recipe)
    record = Record()
    plan.callbacks.append(record)
    trainer = run(plan)
    # 8 rows per step, truncated: 64, 128, 256 tokens per step until 1536, 2304, 3072 trained tokens
    lengths = [s[1] for b, s in record.shapes]
    batches = {n: len({b for b, s in record.shapes if s[1] == n}) for n in (8, 16, 32)}
    assert batches == {8: 24, 16: 6, 32: 3}, lengths
    assert int(trainer.state.timestamp.token) == 3072
    assert {"t8", "t16", "t32"} <= set(os.listdir(recipe["save_folder"]))


def test_phase_dataset_built_on_first_use_and_phase_batch_size(tmp_path, data16):
    recipe = ctx_recipe(tmp_path, data16, str(tmp_path / "built32"), eval_batches=0)
    long = recipe["algorithms"][ALG]["phases"][2]
    long.update(prepare={"max_bytes": 200_000, "val_percent": 10}, global_batch_size=2)
    recipe.update(max_duration="4ba", eval_first=False, eval_interval="4ba", save_interval="4ba")
    recipe["data"]["prepare"] = {"seq_len": 16, "vocab_size": 512, "max_bytes": 300_000}  # data.path's options
    plan = validate(recipe)
    memory = InMemoryLogger()
    plan.loggers.append(memory)
    run(plan)
    with open(tmp_path / "built32" / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["seq_len"] == 32 and manifest["vocab_size"] == 512  # the longest phase; data.path's tokenizer
    assert manifest["args"]["tokenizer"] == os.path.join(data16, "tokenizer")
    assert _values(memory, "context/tokens_per_step") == [TOKENS_PER_STEP] * 3 + [2 * 32]  # phase 3: 2 rows


def test_disabled_leaves_training_untouched(tmp_path, data16, tiny_data):
    runs = []
    for name, alg in (("off", {"enabled": False}), ("none", None)):
        recipe = ctx_recipe(tmp_path / name, data16, tiny_data, **(alg or {}))
        recipe.update(max_duration="4ba", eval_interval="2ba", save_folder=None)
        if alg is None:
            recipe["algorithms"] = {}
        run(validate(recipe))
        runs.append(read_summary(recipe["summary_file"]))
    assert runs[0]["train_loss"] == runs[1]["train_loss"]
    assert runs[0]["evals"] == runs[1]["evals"]
    assert runs[0]["tokens_trained"] == 4 * TOKENS_PER_STEP


# -- LoRA ---------------------------------------------------------------------------------------------------

def test_lora_phase_exports_adapters_that_reload(tmp_path, data16, tiny_data):
    from peft import PeftModel

    recipe = ctx_recipe(tmp_path, data16, tiny_data, eval_batches=0)
    recipe["model"]["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    recipe["model"]["config"]["tie_word_embeddings"] = True
    recipe.update(max_duration="8ba", eval_first=False, eval_interval="8ba", save_interval="8ba")
    trainer = run(validate(recipe))
    folder = os.path.join(recipe["save_folder"], "long")
    assert os.path.isfile(os.path.join(folder, "adapter", "adapter_config.json"))
    assert not os.path.exists(os.path.join(folder, "adapter_config.json"))  # the base loads on its own
    base = AutoModelForCausalLM.from_pretrained(folder)
    assert base.config.rope_scaling["rope_type"] == "linear"
    reloaded = PeftModel.from_pretrained(base, os.path.join(folder, "adapter")).eval()
    live = trainer.state.model.model.eval()
    assert torch.allclose(_logits(reloaded, 32), _logits(live, 32), atol=1e-6, rtol=0)
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "merged")).eval()  # a plain model
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert torch.allclose(_logits(merged, 32), _logits(live, 32), atol=1e-5, rtol=0)


# -- validation: one line naming the key, before training --------------------------------------------------

@pytest.mark.parametrize("mutate, key, text", [
    (lambda p: p[1].update(seq_length=8), "phases[1].seq_length", "lengths must increase"),
    (lambda p: p[2].pop("rope_scaling"), "phases[2].seq_length", "beyond what the phase's rope config can address"),
    (lambda p: p[2].update(rope_scaling={"rope_type": "ntk", "factor": 2.0}), "phases[2].rope_scaling.rope_type",
     "one of: default, dynamic, linear, llama3, longrope, yarn"),
    (lambda p: p[2].update(rope_scaling={"rope_type": "linear"}), "phases[2].rope_scaling", "'factor'"),
    (lambda p: p[2].update(rope_scaling={"rope_type": "yarn", "factor": 2.0, "beta_fast": "x"}),
     "phases[2].rope_scaling.beta_fast", "a finite number"),
    (lambda p: p[2].update(dataset="/nonexistent/ctx32"), "phases[2].dataset", "no dataset there"),
    (lambda p: p[2].update(dataset=None), "phases[2].seq_length", "longer than the sequences of data.path"),
    (lambda p: p[0].update(duration="3weeks"), "phases[0].duration", "Composer time"),
    (lambda p: p[1].pop("duration"), "phases[1].duration", "only the last phase may leave it out"),
    (lambda p: p[0].update(window=4), "phases[0].window", "unknown key"),
    (lambda p: p[1].update(name="short"), "phases[1].name", "no other phase"),
    (lambda p: p[0].update(name="a/b"), "phases[0].name", "a folder name"),
    (lambda p: p[1].update(lr_multiplier=0), "phases[1].lr_multiplier", "> 0"),
    (lambda p: p[0].update(global_batch_size=4), "phases[0].global_batch_size", "needs phases[i].dataset"),
    (lambda p: (p[0].update(duration="10ba"), p[1].update(duration="4ba")), "phases[2]", "when the run has ended"),
    (lambda p: p[1].update(duration="4ba"), "phases[0].duration", "only when max_duration is in ba"),
])
def test_validation_names_the_key(tmp_path, data16, tiny_data, mutate, key, text):
    recipe = ctx_recipe(tmp_path, data16, tiny_data)
    mutate(recipe["algorithms"][ALG]["phases"])
    if key == "phases[0].duration" and "max_duration" in text:
        recipe["max_duration"] = "1536tok"
    with pytest.raises(ConfigError) as err:
        validate(recipe)
    msg = str(err.value)
    assert msg.startswith(f"algorithms.{ALG}.{key}="), msg
    assert text in msg and "\n" not in msg


def test_validation_against_data_and_batches(tmp_path, data16, tiny_data):
    recipe = ctx_recipe(tmp_path, data16, tiny_data)
    recipe["algorithms"][ALG]["phases"][2]["dataset"] = data16
    with pytest.raises(ConfigError, match=rf"^algorithms.{ALG}.phases\[2\].dataset=.*sequences of 16 tokens"):
        validate(recipe)
    recipe = ctx_recipe(tmp_path, data16, tiny_data, tokens_per_step=100)
    with pytest.raises(ConfigError, match=rf"^algorithms.{ALG}.tokens_per_step=100: .* 8 x 16 = 128"):
        validate(recipe)
    recipe = ctx_recipe(tmp_path, data16, tiny_data)
    recipe["max_duration"] = "1ep"
    with pytest.raises(ConfigError, match=r"^max_duration='1ep': in ba, tok or sp when phases switch datasets"):
        validate(recipe)
    # a missing phase dataset with a prepare block validates (it is built on first use) ...
    recipe = ctx_recipe(tmp_path, data16, tiny_data)
    recipe["algorithms"][ALG]["phases"][2].update(dataset=str(tmp_path / "later"), prepare={"max_bytes": 1000})
    validate(recipe)
    # ... when its options are valid
    recipe["algorithms"][ALG]["phases"][2]["prepare"] = {"source": "web"}
    with pytest.raises(ConfigError, match=rf"^algorithms.{ALG}.phases\[2\].prepare.source='web'"):
        validate(recipe)


def test_gpt2_rejects_a_phase_beyond_its_position_table(tmp_path, data16, tiny_data):
    recipe = ctx_recipe(tmp_path, data16, tiny_data)
    recipe["model"] = {"family": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16}}
    with pytest.raises(ConfigError, match=rf"^algorithms.{ALG}.phases\[2\].rope_scaling=.*gpt2 has learned positions"):
        validate(recipe)
    recipe["algorithms"][ALG]["phases"][2].pop("rope_scaling")
    with pytest.raises(ConfigError, match=rf"^algorithms.{ALG}.phases\[2\].seq_length=32: at most gpt2's learned "
                                          r"position table \(n_positions=16\)"):
        validate(recipe)
    recipe["model"]["config"]["n_positions"] = 32
    validate(recipe)


def test_durations_that_do_not_add_up_warn(tmp_path, data16, tiny_data):
    recipe = ctx_recipe(tmp_path, data16, tiny_data)
    recipe["algorithms"][ALG]["phases"][2]["duration"] = "0.1dur"
    with pytest.warns(UserWarning, match=r"add up to 10.2ba, max_duration is 12ba: the last phase 'long' covers "
                                         r"the rest of the run \(3ba instead of 1.2ba\)"):
        validate(recipe)
    recipe["algorithms"][ALG]["phases"][2].pop("duration")  # no duration: covers the rest, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate(recipe)


def test_shipped_context_recipes_validate(tiny_data):
    llama = validate(load_recipe(os.path.join(ROOT, "yamls", "context_extension_llama.yaml"),
                                 [f"data.path={tiny_data}"])).algorithms[0]
    assert [p.seq_length for p in llama.phases] == [512, 1024, 2048]
    assert llama._unit.value == "ba" and llama._starts == [0.0, 240.0, 288.0]
    qwen = validate(load_recipe(os.path.join(ROOT, "yamls", "context_extension_qwen2_lora.yaml"),
                                [f"data.path={tiny_data}"]))
    alg = qwen.algorithms[0]
    from composer_growth.recipe.build import flash_attention_fallback

    runs_flash = flash_attention_fallback(qwen.recipe) is None  # else it falls back to sdpa at validation
    assert qwen.recipe.model.peft is not None
    assert qwen.recipe.model.attn_implementation == ("flash_attention_2" if runs_flash else "sdpa")
    assert [p.seq_length for p in alg.phases] == [4096, 16384, 32768]
    assert alg._unit.value == "tok" and alg._starts == [0.0, 6e8, 9e8]  # shares of the run's tokens


# -- two ranks ----------------------------------------------------------------------------------------------

@pytest.mark.launcher
def test_composer_launcher_two_ranks(tmp_path, data16, tiny_data):
    recipe = ctx_recipe(tmp_path, data16, tiny_data)
    recipe.update(summary_file=str(tmp_path / "summary-{rank}.json"), eval_first=False, max_duration="8ba",
                  eval_interval="8ba", save_interval="8ba")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    script = os.path.join(ROOT, "scripts", "train.py")
    if "ContextLengthSchedule" not in composer_growth.algorithms.__all__:  # not exported yet: register it here
        script = str(tmp_path / "train_ctx.py")
        with open(script, "w") as f:
            f.write("import sys\nimport composer_growth.algorithms.context_schedule\n"
                    "from composer_growth.cli import main\nsys.exit(main(['train', *sys.argv[1:]]))\n")
    proc = subprocess.run(
        ["composer", "-n", "2", "--stdout", str(tmp_path / "out{rank}.txt"), "--stderr", str(tmp_path / "err{rank}.txt"),
         script, str(path)],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if proc.returncode != 0:
        ranks = "".join(open(tmp_path / f"err{r}.txt").read()[-2000:] for r in (0, 1) if (tmp_path / f"err{r}.txt").exists())
        pytest.fail(proc.stdout[-2000:] + proc.stderr[-2000:] + ranks)
    r0, r1 = read_summary(tmp_path / "summary-0.json"), read_summary(tmp_path / "summary-1.json")
    assert r0["batches"] == r1["batches"] == 8
    assert r0["tokens_trained"] == r1["tokens_trained"] == 8 * TOKENS_PER_STEP  # phase 3: 2 rows of 32 per rank
    assert r0["train_loss"] == r1["train_loss"]
    assert r0["last_eval_loss"] == r1["last_eval_loss"]
    for name in ("short", "mid", "long"):
        assert os.path.isfile(os.path.join(recipe["save_folder"], name, "config.json")), name
    model = AutoModelForCausalLM.from_pretrained(os.path.join(recipe["save_folder"], "long"))
    assert model.config.rope_scaling["factor"] == 2.0
