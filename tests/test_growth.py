"""StackLayers and WidenMLP on real Trainers: growth mid-run, optimizer carried, resume, DDP, trunks."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from composer_growth import StackLayers, WidenMLP
from composer_growth.errors import ConfigError
from composer_growth.recipe import run, validate
from composer_growth.unwrap import composer_model, unwrap_hf

from conftest import launch, launch_failure, read_summary, resume_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grow_twice(recipe, **stack):
    recipe["algorithms"] = {
        "stack_layers": {"at": "4ba", "mode": "repeat", "times": 2, "init": "function_preserving", **stack},
        "widen_mlp": {"at": "8ba", "factor": 1.5},
    }
    recipe.update(max_duration="12ba", save_interval="3ba", eval_interval="6ba")
    return recipe


def test_grow_twice_and_keep_training(tiny_recipe):
    trainer = run(validate(_grow_twice(tiny_recipe)))
    stack, widen = trainer.state.algorithms[:2]
    hf = unwrap_hf(trainer.state.model)
    assert hf.config.num_hidden_layers == 4 and hf.config.intermediate_size == 96
    assert stack.record["batch"] == 4 and widen.record["batch"] == 8
    assert stack.record["params_after"] > stack.record["params_before"]
    # function-preserving growth: the same loss on the same batch right before and after
    for alg in (stack, widen):
        assert alg.record["loss_after"] == pytest.approx(alg.record["loss_before"], abs=1e-4)
    # one optimizer over every parameter of the grown model, with its state and step carried
    opt = trainer.state.optimizers[0]
    params = list(composer_model(trainer.state).parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}
    assert all(int(opt.state[p]["step"]) == 12 for p in params)
    info = read_summary(tiny_recipe["summary_file"])
    assert info["last_eval_loss"] < info["evals"][1]["loss"] < info["first_eval_loss"]
    # the HF export of the grown model reloads with from_pretrained
    out = os.path.join(tiny_recipe["save_folder"], "hf")
    hf.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 16))
    hf.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, hf(ids).logits, atol=1e-5)


def test_scheduler_follows_the_new_optimizer(tiny_recipe):
    trainer = run(validate(_grow_twice(tiny_recipe)))
    sched = trainer.state.schedulers[0]
    opt = trainer.state.optimizers[0]
    assert sched.optimizer is opt
    # the schedule went on across both growths: cosine (2ba warmup, alpha_f 0.1) as of batch 11 of 12
    import math
    expected = 3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (11 - 2) / (12 - 2))))
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("checkpoint", ["ep0-ba3-rank0.pt", "ep0-ba6-rank0.pt", "ep0-ba9-rank0.pt"])
def test_resume_before_between_and_after_growth(tiny_recipe, tmp_path, checkpoint):
    full = _grow_twice(tiny_recipe)
    run(validate(full))
    uninterrupted = read_summary(full["summary_file"])
    trainer, after = resume_from(full, checkpoint, tmp_path)
    assert unwrap_hf(trainer.state.model).config.num_hidden_layers == 4
    assert after["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-5)
    assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in uninterrupted["evals"]], rel=1e-5)


def test_frozen_trunk_stays_unchanged(tiny_recipe):
    tiny_recipe["algorithms"] = {"stack_layers": {"at": "4ba", "mode": "append", "num_new": 2,
                                                  "init": "function_preserving", "trunk": "frozen"}}
    tiny_recipe.update(max_duration="8ba")
    snapshots = {}

    from composer.core import Callback

    class Snapshot(Callback):
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == 4:
                layers = unwrap_hf(state.model).model.layers
                snapshots["old"] = [p.detach().clone() for p in layers[:2].parameters()]
                snapshots["new"] = [p.detach().clone() for p in layers[2:].parameters()]

    plan = validate(tiny_recipe)
    plan.callbacks.append(Snapshot())
    trainer = run(plan)
    layers = unwrap_hf(trainer.state.model).model.layers
    assert len(layers) == 4
    assert all(torch.equal(a, b) for a, b in zip(snapshots["old"], layers[:2].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots["new"], layers[2:].parameters()))
    assert all(not p.requires_grad for p in layers[:2].parameters())
    assert trainer.state.algorithms[0].record["trainable_after"] < trainer.state.algorithms[0].record["params_after"]


def test_lora_trunk_trains_only_adapters_of_the_old_layers(tiny_recipe, tmp_path):
    from composer_growth.functional import merge_lora

    tiny_recipe["algorithms"] = {"stack_layers": {"at": "4ba", "mode": "append", "num_new": 1, "init": "random",
                                                  "trunk": "lora", "lora_rank": 4}}
    tiny_recipe.update(max_duration="8ba", save_interval="2ba")
    snapshots = {}

    from composer.core import Callback

    class Snapshot(Callback):
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == 4:
                hf = unwrap_hf(state.model)
                snapshots.update({n: p.detach().clone() for n, p in hf.named_parameters()})

    plan = validate(tiny_recipe)
    plan.callbacks.append(Snapshot())
    trainer = run(plan)
    hf = unwrap_hf(trainer.state.model)
    now = dict(hf.named_parameters())
    base = [n for n in now if ".base_layer." in n]
    lora = [n for n in now if "lora_" in n]
    assert base and len(lora) == 2 * len(base) and all(n.startswith("model.layers.0.") or
                                                       n.startswith("model.layers.1.") for n in base)
    assert all(torch.equal(now[n], snapshots[n]) for n in base)  # old weights only change through adapters
    assert any(not torch.equal(now[n], snapshots[n]) for n in lora if "lora_B" in n)
    assert any(not torch.equal(now[n], snapshots[n]) for n in now if n.startswith("model.layers.2."))
    assert all(now[n].requires_grad for n in now if n.startswith("model.layers.2.") or "lora_" in n)

    # a resumed run replays the growth and the adapters before loading the weights
    _, after = resume_from(tiny_recipe, "ep0-ba6-rank0.pt", tmp_path)
    assert after["train_loss"] == pytest.approx(read_summary(tiny_recipe["summary_file"])["train_loss"], rel=1e-5)

    # merged, the export is a plain model with the same function
    ids = torch.randint(0, hf.config.vocab_size, (2, 16))
    hf.eval()
    with torch.no_grad():
        before = hf(ids).logits
        assert merge_lora(hf) == len(base)
        assert torch.allclose(hf(ids).logits, before, atol=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, before, atol=1e-5)


@pytest.mark.launcher
def test_two_ranks_hold_identical_parameters_after_growth(tiny_recipe, tmp_path):
    recipe = _grow_twice(tiny_recipe)
    recipe.update(max_duration="10ba", eval_first=False, eval_interval="10ba", save_folder=None)
    recipe["algorithms"]["widen_mlp"]["noise_std"] = 0.01
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = launch(os.path.join(ROOT, "tests", "scripts", "grow_ddp.py"), [str(path), str(tmp_path / "p{rank}.json")], tmp_path)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    r0, r1 = read_summary(tmp_path / "p0.json"), read_summary(tmp_path / "p1.json")
    assert r0["ddp"] and r0["layers"] == 4
    assert r0["params"] == r1["params"]
    assert r0["loss"] == r1["loss"]


@pytest.mark.parametrize("alg, kwargs, key", [
    ("stack_layers", {"at": "20ba"}, "algorithms.stack_layers.at"),
    ("stack_layers", {"at": "1.0dur"}, "algorithms.stack_layers.at"),
    ("stack_layers", {"mode": "explicit", "source_layers": [0, 1, 2]}, "algorithms.stack_layers.source_layers"),
    ("stack_layers", {"mode": "explicit", "source_layers": []}, "algorithms.stack_layers.source_layers"),
    ("stack_layers", {"times": 1}, "algorithms.stack_layers.times"),
    ("stack_layers", {"trunk": "thawed"}, "algorithms.stack_layers.trunk"),
    ("stack_layers", {"trunk": "lora", "lora_rank": 0}, "algorithms.stack_layers.lora_rank"),
    ("widen_mlp", {"factor": 1.0}, "algorithms.widen_mlp.factor"),
    ("widen_mlp", {"factor": 0.5}, "algorithms.widen_mlp.factor"),
    ("widen_mlp", {"at": "2weeks"}, "algorithms.widen_mlp.at"),
    ("widen_mlp", {"seed": "abc"}, "algorithms.widen_mlp.seed"),
    ("stack_layers", {"probe_loss": "no"}, "algorithms.stack_layers.probe_loss"),
])
def test_bad_growth_recipes_fail_before_training(tiny_recipe, alg, kwargs, key):
    tiny_recipe["algorithms"] = {alg: kwargs}
    with pytest.raises(ConfigError) as err:
        validate(tiny_recipe)
    assert str(err.value).startswith(f"{key}="), str(err.value)


@pytest.mark.parametrize("fsdp, extra, key", [
    ({"version": 2, "activation_checkpointing": True}, {}, "parallelism.fsdp.activation_checkpointing"),
])
def test_growth_under_fsdp_rejects_what_it_cannot_carry(tiny_recipe, fsdp, extra, key):
    tiny_recipe["algorithms"] = {"stack_layers": {"at": "4ba", **({"trunk": extra["trunk"]} if "trunk" in extra else {})}}
    if "model.peft" in extra:
        tiny_recipe["model"]["peft"] = extra["model.peft"]
    tiny_recipe["parallelism"] = {"fsdp": fsdp}
    with pytest.raises(ConfigError) as err:
        validate(tiny_recipe)
    assert str(err.value).startswith(f"{key}="), str(err.value)


@pytest.mark.launcher
def test_lora_trunk_under_fsdp2_matches_ddp_and_resumes(tiny_recipe, tmp_path):
    """``trunk: lora`` under FSDP2 (sharded checkpoints) against DDP on two ranks: G_stack at batch 3 puts
    rank-4 adapters on the old blocks' linears and freezes their base weights; both train the same
    losses, the same adapters, and a run resumed from the sharded checkpoint after it goes on exactly."""
    from conftest import fsdp_runs

    tiny_recipe["algorithms"] = {"stack_layers": {"at": "3ba", "times": 2, "init": "function_preserving",
                                                  "trunk": "lora", "lora_rank": 4, "probe_loss": False}}
    tiny_recipe.update(max_duration="6ba", eval_first=False, eval_interval="6ba", save_interval="4ba",
                       summary_file=None)
    runs = ["ddp", "sharded", "sharded@ep0-ba4"]
    for results in fsdp_runs(tiny_recipe, runs, tmp_path):
        ddp, fsdp, resumed = (results[r] for r in runs)
        assert fsdp["fsdp"] and fsdp["layers"] == resumed["layers"] == 4 and fsdp["units"] == 4 + 1
        adapters = sorted(n for n in fsdp["shapes"] if "lora_A" in n)
        assert adapters and all(".layers.0." in n or ".layers.1." in n for n in adapters)  # the old blocks only
        assert fsdp["shapes"] == ddp["shapes"] == resumed["shapes"]
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
        # the new adapters' A draws come from a different point of the RNG stream under FSDP2's gathered
        # growth than under DDP (B starts at zero, so the losses agree); the other weights agree
        base = {n: v for n, v in fsdp["params"].items() if "lora_" not in n}
        assert base == pytest.approx({n: ddp["params"][n] for n in base}, rel=1e-3, abs=1e-3)
        assert resumed["losses"] == pytest.approx(fsdp["losses"][4:], abs=1e-6)
        assert resumed["params"] == pytest.approx(fsdp["params"], rel=1e-6, abs=1e-6)


@pytest.mark.launcher
def test_growth_under_fsdp2_matches_ddp_and_resumes_sharded_and_full(tiny_recipe, tmp_path):
    """Under composer -n 2: the same growth run under DDP and under FSDP2 (sharded and full
    checkpoints) gives the same per-batch training losses; each FSDP2 run resumed from a checkpoint
    written after the growth (before the second growth for sharded, after both for full) goes on
    exactly as the uninterrupted run, with the grown layers restored."""
    recipe = _grow_twice(tiny_recipe)
    recipe.update(max_duration="10ba", eval_first=False, eval_interval="10ba", save_interval="3ba")
    recipe["algorithms"]["widen_mlp"]["noise_std"] = 0.01
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = ["ddp", "sharded", "sharded@ep0-ba6", "full", "full@ep0-ba9-rank0.pt"]
    proc = launch(os.path.join(ROOT, "tests", "scripts", "fsdp_runs.py"),
                  [str(path), str(tmp_path / "p{rank}.json"), *runs], tmp_path, own_shm=True)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    for rank in (0, 1):
        results = read_summary(tmp_path / f"p{rank}.json")
        ddp = results["ddp"]
        assert not ddp["fsdp"] and ddp["layers"] == 4 and len(ddp["losses"]) == 10
        for kind in ("sharded", "full"):
            run_, resumed = results[kind], results[next(r for r in runs if r.startswith(f"{kind}@"))]
            assert run_["fsdp"] and run_["layers"] == 4
            assert run_["units"] == 4 + 1  # one FSDP unit per block of the grown model, and the root
            assert all(g["applied"] for g in run_["replayed"])
            assert run_["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
            assert run_["params"].keys() == ddp["params"].keys()
            assert run_["params"] == pytest.approx(ddp["params"], rel=1e-3, abs=1e-3)
            # the resumed run has the grown model: same layers, same losses, same parameters at the end
            assert resumed["layers"] == 4 and resumed["units"] == 5
            assert resumed["losses"] == pytest.approx(run_["losses"][-len(resumed["losses"]):], abs=1e-6)
            assert resumed["params"] == pytest.approx(run_["params"], rel=1e-6, abs=1e-6)
        assert len(results["sharded@ep0-ba6"]["losses"]) == 4 and len(results["full@ep0-ba9-rank0.pt"]["losses"]) == 1
    # composer-growth export reads each kind of checkpoint of the grown run (sharded: with --trust-checkpoint)
    from composer_growth.cli import main

    sharded = str(tmp_path / "sharded" / "ep0-ba6")
    assert main(["export", sharded, str(tmp_path / "hf-sharded")]) == 2
    logits = {}
    for kind, checkpoint, extra in [("sharded", sharded, ["--trust-checkpoint"]),
                                    ("full", str(tmp_path / "full" / "ep0-ba6-rank0.pt"), []),
                                    ("ddp", str(tmp_path / "ddp" / "ep0-ba6-rank0.pt"), [])]:
        assert main(["export", checkpoint, str(tmp_path / f"hf-{kind}"), *extra]) == 0, kind
        export = AutoModelForCausalLM.from_pretrained(tmp_path / f"hf-{kind}").eval()
        assert export.config.num_hidden_layers == 4 and export.config.intermediate_size == 64
        with torch.no_grad():
            logits[kind] = export(torch.arange(1, 33)[None]).logits
    torch.testing.assert_close(logits["sharded"], logits["full"], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits["sharded"], logits["ddp"], rtol=0, atol=1e-3)


def test_family_outside_the_table_is_named():
    from transformers import OPTConfig, OPTForCausalLM
    from composer.models import HuggingFaceModel
    from composer import Trainer

    model = HuggingFaceModel(OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                                      num_attention_heads=2, vocab_size=64)))
    with pytest.raises(ConfigError, match=r"^stack_layers: model family='opt': supported families: gpt2, gpt_neox"):
        Trainer(model=model, algorithms=[StackLayers(at="2ba")], max_duration="2ba")


def test_widen_refuses_a_config_that_cannot_record_the_width():
    """transformers' own MPT (model_type 'mpt', like llm-foundry's) has a fixed 4x MLP: refused at INIT."""
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from transformers import MptConfig, MptForCausalLM

    model = HuggingFaceModel(MptForCausalLM(MptConfig(d_model=16, n_heads=2, n_layers=1, vocab_size=64)))
    with pytest.raises(ConfigError, match=r"^widen_mlp: model='MptConfig': its config has no 'ffn_config'"):
        Trainer(model=model, algorithms=[WidenMLP(at="2ba")], max_duration="2ba")


def test_direct_use_in_a_script_grows_a_plain_trainer():
    """Composer's own HuggingFaceModel, in a plain script: grown twice, and given a ``flops_per_batch`` (it
    has none) that the speed monitor reads at the grown size after each growth."""
    from composer import Callback, Trainer
    from composer.callbacks import SpeedMonitor
    from composer.loggers import InMemoryLogger
    from composer.models import HuggingFaceModel
    from transformers import GPT2Config, GPT2LMHeadModel
    from torch.utils.data import DataLoader

    from composer_growth.functional.flops import batch_flops

    class Flops(Callback):
        def __init__(self):
            self.rows = []

        def batch_end(self, state, logger):
            config = unwrap_hf(state.model).config
            self.rows.append((state.model.flops_per_batch(state.batch), batch_flops(config, state.batch),
                              config.n_layer))

    torch.manual_seed(0)
    model = HuggingFaceModel(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                                        n_positions=32)), use_logits=True)
    ids = torch.randint(0, 64, (32, 16))
    data = DataLoader([{"input_ids": r, "labels": r.clone()} for r in ids], batch_size=8)
    trainer = Trainer(model=model, train_dataloader=data, max_duration="6ba",
                      algorithms=[StackLayers(at="2ba", init="function_preserving"), WidenMLP(at="4ba", factor=2)],
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), progress_bar=False,
                      callbacks=[flops := Flops(), SpeedMonitor(window_size=1)], loggers=[memory := InMemoryLogger()])
    trainer.fit()
    cfg = unwrap_hf(trainer.state.model).config
    assert cfg.n_layer == 4 and cfg.n_inner == 256
    assert [layers for _, _, layers in flops.rows] == [2, 4, 4, 4, 4, 4]
    assert all(got == want for got, want, _ in flops.rows), flops.rows
    assert flops.rows[0][0] < flops.rows[1][0] < flops.rows[3][0]  # stacked at 2, widened at 4
    assert len(memory.data["throughput/flops_per_sec"]) >= 4


def test_earliest_batch_never_skips_a_batch_where_the_time_is_reached():
    from composer.core import State, Time, TimeUnit, Timestamp
    from composer.devices import DeviceCPU

    from composer_growth.timeutil import earliest_batch, reached

    state = State(model=torch.nn.Linear(1, 1), rank_zero_seed=0, run_name="t", device=DeviceCPU(), max_duration="1ba")

    def reached_at(batch: int, t: Time) -> bool:
        state.timestamp = Timestamp(batch=batch)
        return reached(state, t)

    for n in range(1, 41):
        state.max_duration = f"{n}ba"
        for t in [Time(f, TimeUnit.DURATION) for f in (0.0, 0.1, 0.25, 1 / 3, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0)] + [
                Time(b, TimeUnit.BATCH) for b in (0, 1, n // 2, n)]:
            first = next(b for b in range(n + 2) if reached_at(b, t))
            assert first - 2 <= earliest_batch(state, t) <= first, (n, t)
    state.max_duration = "100tok"
    assert earliest_batch(state, Time(0.5, TimeUnit.DURATION)) is None  # tokens: asked of reached() every batch


@pytest.mark.parametrize("peft", [False, True])
def test_flops_per_batch_follow_growth(tiny_recipe, peft):
    """The speed monitor's FLOPs come from the model's ``flops_per_batch``: after each growth it is the
    grown model's count (functional.flops), at the batch's own length, with and without adapters."""
    from composer.core import Callback
    from composer.loggers import InMemoryLogger

    from composer_growth.functional.flops import training_flops_per_token

    seen = []

    class Flops(Callback):
        def batch_end(self, state, logger):
            cfg = unwrap_hf(state.model).config
            rows, length = state.batch["input_ids"].shape
            seen.append((int(state.timestamp.batch), state.model.flops_per_batch(state.batch),
                         rows * length * training_flops_per_token(cfg, length), cfg.num_hidden_layers,
                         cfg.intermediate_size))

    recipe = _grow_twice(tiny_recipe)
    recipe["callbacks"] = {"speed_monitor": {"window_size": 1}}
    if peft:
        recipe["model"] = dict(recipe["model"], peft={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    valid = validate(recipe)
    memory = InMemoryLogger()
    valid.callbacks.append(Flops())
    valid.loggers.append(memory)
    run(valid)
    by_batch = {b: (got, want, layers, width) for b, got, want, layers, width in seen}
    # grown at the end of batches 4 and 8, before the speed monitor reads the FLOPs of that batch
    assert [by_batch[b][2:] for b in (3, 4, 7, 8)] == [(2, 64), (4, 64), (4, 64), (4, 96)]
    assert all(got == want for got, want, _, _ in by_batch.values())
    assert by_batch[3][0] < by_batch[4][0] < by_batch[8][0]
    logged = [v for _, v in memory.data["throughput/flops_per_sec"]]
    assert len(logged) >= 10 and all(v > 0 for v in logged)


# ---------------------------------------------------------------------------------------------- StackWise


def _two_stacks(recipe, mode):
    """Stack after stack over a LoRA trunk: the first new stack with its own adapters, the second plain."""
    first = {"at": "3ba", "mode": mode, "num_new": 1, "init": "function_preserving", "trunk": "lora",
             "lora_rank": 4, "stack_lora": 2}
    second = {"at": "6ba", "mode": mode, "num_new": 1, "init": "function_preserving", "trunk": "lora", "lora_rank": 4}
    recipe["algorithms"] = {"stack_layers": [first, second]}
    recipe.update(max_duration="9ba", save_interval="3ba", eval_interval="9ba", eval_first=False)
    return recipe


@pytest.mark.parametrize("mode", ["append", "prepend"])
def test_stack_after_stack_over_a_lora_trunk(tiny_recipe, tmp_path, one_thread, mode):
    from composer.core import Callback

    snapshots = {}

    class Snapshot(Callback):
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) in (3, 6):
                hf = unwrap_hf(state.model)
                snapshots[int(state.timestamp.batch)] = {n: p.detach().clone() for n, p in hf.named_parameters()}

    recipe = _two_stacks(tiny_recipe, mode)
    plan = validate(recipe)
    plan.callbacks.append(Snapshot())
    trainer = run(plan)
    first, second = trainer.state.algorithms[:2]
    hf = unwrap_hf(trainer.state.model)
    assert [first.record["batch"], second.record["batch"]] == [3, 6] and hf.config.num_hidden_layers == 4
    for alg in (first, second):  # function-preserving: the same loss on the same batch right before and after
        assert alg.record["loss_after"] == pytest.approx(alg.record["loss_before"], abs=1e-4)
    now = dict(hf.named_parameters())
    # the second stack is a plain copy (adapters folded in) that trains fully; the first stack's adapters
    # stay (rank 2), the old trunk's too (rank 4); no linear of the trunk trains but through an adapter
    newest, middle = (0, 1) if mode == "prepend" else (3, 2)
    assert not any("lora_" in n or "base_layer" in n for n in now if n.startswith(f"model.layers.{newest}."))
    assert now[f"model.layers.{middle}.mlp.up_proj.lora_A.default.weight"].shape[0] == 2
    trunk = [i for i in range(4) if i not in (newest, middle)]
    assert all(now[f"model.layers.{i}.mlp.up_proj.lora_A.default.weight"].shape[0] == 4 for i in trunk)
    assert all(not p.requires_grad for n, p in now.items() if "base_layer" in n)
    # something trains after each growth: the new blocks, and every earlier adapter
    changed = lambda batch, prefix: any(not torch.equal(now[n], snapshots[batch][n])  # noqa: E731
                                        for n in snapshots[batch] if n.startswith(prefix) and n in now)
    assert changed(6, f"model.layers.{newest}.") and changed(6, f"model.layers.{middle}.")
    for i in range(4):
        if i != newest:
            assert changed(6, f"model.layers.{i}.") and any(
                not torch.equal(now[n], snapshots[6][n]) for n in now if n.startswith(f"model.layers.{i}.") and "lora_B" in n)
    # the optimizer holds exactly the trainable parameters (no frozen base weight, no moments for one)
    opt = trainer.state.optimizers[0]
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in now.values() if p.requires_grad} == {id(p) for p in opt.state}
    # exact resume between the stacks and right after the second one (two StackLayers, each its own state)
    full = read_summary(recipe["summary_file"])
    for i, checkpoint in enumerate(["ep0-ba3-rank0.pt", "ep0-ba6-rank0.pt"] if mode == "append" else ["ep0-ba6-rank0.pt"]):
        resumed, after = resume_from(recipe, checkpoint, tmp_path / str(i))
        assert [a.record["batch"] for a in resumed.state.algorithms[:2]] == [3, 6]
        assert unwrap_hf(resumed.state.model).config.num_hidden_layers == 4
        assert after["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
        assert after["last_eval_loss"] == pytest.approx(full["last_eval_loss"], rel=1e-5)


def test_stack_list_is_validated_item_by_item_and_planned(tiny_recipe):
    from composer_growth.plan import facts_from_recipe, plan_run

    recipe = _two_stacks(tiny_recipe, "append")
    valid = validate(recipe)
    assert valid.algorithm_labels[:2] == ["stack_layers.0", "stack_layers.1"]
    planned = plan_run(facts_from_recipe(valid), list(zip(valid.algorithm_labels, valid.algorithms)))
    stacks = [(e["batch"], e["layers"]) for e in planned["events"] if e["event"] == "stack_layers"]
    assert stacks == [(3, [2, 3]), (6, [3, 4])]
    bad = copy.deepcopy(recipe)
    bad["algorithms"]["stack_layers"][1]["at"] = "20ba"
    with pytest.raises(ConfigError, match=r"^algorithms\.stack_layers\.1\.at="):
        validate(bad)
    bad["algorithms"]["stack_layers"][1] = {"at": "6ba", "mode": "append", "stack_lora": 0, "num_new": 1}
    with pytest.raises(ConfigError, match=r"^algorithms\.stack_layers\.1\.stack_lora="):
        validate(bad)
    bad["algorithms"]["stack_layers"][1] = {"at": "6ba", "bogus": 1}
    with pytest.raises(ConfigError, match=r"^algorithms\.stack_layers\.1\.bogus="):
        validate(bad)
    bad["algorithms"] = {"seq_length_warmup": [{}, {}]}
    with pytest.raises(ConfigError, match=r"^algorithms\.seq_length_warmup=.*only for: stack_layers, widen_mlp"):
        validate(bad)


def test_orchestrator_stack_op_takes_the_stack_layers_options(tiny_recipe):
    recipe = dict(tiny_recipe, max_duration="6ba", eval_first=False, save_folder=None)
    op = {"name": "stack_layers", "trigger_loss": None, "max_wait_iters": 2, "args": {"init": "function_preserving"}}
    schedule = [dict(op, value={"mode": "append", "num_new": 1, "trunk": "lora", "lora_rank": 4, "stack_lora": 2}),
                dict(op, value={"mode": "prepend", "num_new": 1, "trunk": "lora"})]
    recipe["algorithms"] = {"orchestrator": {"verbose": False, "schedule": schedule}}
    trainer = run(validate(recipe))
    hf = unwrap_hf(trainer.state.model)
    now = dict(hf.named_parameters())
    assert hf.config.num_hidden_layers == 4
    assert not any("lora_" in n for n in now if n.startswith("model.layers.0."))  # the prepended plain copy
    assert now["model.layers.3.mlp.up_proj.lora_A.default.weight"].shape[0] == 2  # the first, appended stack
    assert now["model.layers.1.mlp.up_proj.lora_A.default.weight"].shape[0] == 4  # the trunk
    schedule[1]["value"] = {"mode": "prepend", "num_new": 1, "trunk": "lora", "stack_lora": [1, 2]}
    with pytest.raises(ConfigError, match=r"schedule\[1\]\.value\.stack_lora="):
        validate(recipe)
    schedule[1]["value"] = {"mode": "prepend", "seed": 3}
    with pytest.raises(ConfigError, match=r"schedule\[1\]\.value\.seed=.*under args"):
        validate(recipe)
