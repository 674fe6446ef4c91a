"""LoraMergeRestart (ReLoRA) on real Trainers: merges at the intervals, the same function across a merge,
the LR ramp the optimizer sees, exact resume, two ranks in step, the merged HF export, validation."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from composer.core import Algorithm, Callback, Event
from transformers import AutoModelForCausalLM

from composer_growth import LoraMergeRestart, StackLayers
from composer_growth.errors import ConfigError
from composer_growth.functional import lora_targets
from composer_growth.recipe import run, validate
from composer_growth.unwrap import composer_model, unwrap_hf

from conftest import fsdp_runs, launch, launch_failure, read_summary, resume_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEFT = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]}


def _relora(recipe, peft=True, **alg):
    if peft:
        recipe["model"]["peft"] = dict(PEFT)
    recipe["algorithms"] = {"lora_merge": {"interval": "3ba", "restart_warmup": "2ba", "prune": "magnitude",
                                           "ratio": 0.9, **alg}}
    recipe.update(save_interval="2ba")
    return recipe


def _b_zero(state) -> bool:
    return all(torch.count_nonzero(layer.lora_B["default"].weight) == 0
               for layer in lora_targets(composer_model(state)).values())


class Probe(Callback):
    """Per batch: the LR the batch trains with, and the logits of a fixed input before (``Before``, an
    algorithm listed before lora_merge) and after the algorithms' BATCH_END (this callback)."""

    def __init__(self):
        self.lrs, self.jumps, self.b_zero, self.b_zero_before = [], {}, {}, {}
        self.ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
        probe = self

        class Before(Algorithm):
            def match(self, event, state):
                return event == Event.BATCH_END

            def apply(self, event, state, logger):
                probe._before = probe._logits(state)
                probe.b_zero_before[int(state.timestamp.batch)] = _b_zero(state)

        self.before = Before()

    def _logits(self, state):
        model = composer_model(state)
        was = model.training
        model.eval()
        with torch.no_grad():
            out = unwrap_hf(model)(self.ids).logits
        model.train(was)
        return out

    def batch_start(self, state, logger):
        self.lrs.append(state.optimizers[0].param_groups[0]["lr"])

    def batch_end(self, state, logger):  # after the algorithms' BATCH_END
        b = int(state.timestamp.batch)
        self.jumps[b] = (self._logits(state) - self._before).abs().max().item()
        self.b_zero[b] = _b_zero(state)


def test_merges_at_intervals_same_function_and_lr_ramp(tiny_recipe):
    recipe = _relora(tiny_recipe)
    recipe["scheduler"] = {"name": "constant"}
    plan = validate(recipe)
    probe = Probe()
    plan.callbacks.append(probe)
    plan.algorithms.insert(0, probe.before)
    trainer = run(plan)
    alg = trainer.state.algorithms[1]
    assert alg.merges == 2 and [h["batch"] for h in alg.history] == [3, 6]
    assert all(h["pruned"] > 0 for h in alg.history)
    # right after a merge the adapters' B are zero and the model computes the same logits; the next
    # batch trains at LR 0 (the ramp's start), so they are still zero after it
    assert [b for b, zero in probe.b_zero.items() if zero] == [3, 4, 6, 7]
    assert not probe.b_zero_before[3] and not probe.b_zero_before[6]  # probed before the merge
    assert probe.jumps[3] < 1e-5 and probe.jumps[6] < 1e-5
    # the LR each batch trained with: constant 3e-3, times a 2-batch ramp from 0 after each merge
    expected = [3e-3] * 3 + [0.0, 1.5e-3] + [3e-3] + [0.0, 1.5e-3]
    assert probe.lrs == pytest.approx(expected, abs=1e-12)
    info = read_summary(recipe["summary_file"])
    assert info["last_eval_loss"] < info["first_eval_loss"]


class UpdateNorms(Algorithm):
    """Per batch, the norm of the optimizer step's change of all LoRA A and of all LoRA B parameters:
    at BATCH_END, listed before lora_merge (its merge at BATCH_END falls between two batches' steps)."""

    def __init__(self):
        self.norms: dict[int, dict[str, float]] = {}

    def match(self, event, state):
        return event in (Event.BATCH_START, Event.BATCH_END)

    def apply(self, event, state, logger):
        now = {n: p.detach().clone() for n, p in composer_model(state).named_parameters() if "lora_" in n}
        if event == Event.BATCH_START:
            self._before = now
            return
        deltas = {k: torch.cat([(now[n] - self._before[n]).reshape(-1) for n in now if f"lora_{k}." in n])
                  for k in ("A", "B")}
        self.norms[int(state.timestamp.batch)] = {k: d.norm().item() for k, d in deltas.items()}


def test_first_step_after_a_magnitude_pruned_merge_is_bounded(tiny_recipe):
    """Magnitude pruning at 0.99 and no LR ramp: the first step after the merge moves the adapters no
    more than the step before it (a first moment kept over a zeroed second moment would step m / eps)."""
    recipe = _relora(tiny_recipe, interval="3ba", restart_warmup="0ba", prune="magnitude", ratio=0.99)
    recipe.update(scheduler={"name": "constant"}, max_duration="4ba")
    plan = validate(recipe)
    norms = UpdateNorms()
    plan.algorithms.insert(0, norms)
    trainer = run(plan)
    assert [h["batch"] for h in trainer.state.algorithms[1].history] == [3]
    before, after = norms.norms[3], norms.norms[4]  # batch 3's step, then the merge, then batch 4's step
    assert before["A"] > 0 and before["B"] > 0 and after["B"] > 0
    for k in ("A", "B"):
        assert after[k] <= before[k], (k, before, after)


def test_resume_between_and_right_after_a_merge(tiny_recipe, tmp_path):
    full = _relora(tiny_recipe)
    run(validate(full))
    uninterrupted = read_summary(full["summary_file"])
    # batch 4: between merges (mid-ramp); batch 6: right after the second merge
    for checkpoint in ("ep0-ba4-rank0.pt", "ep0-ba6-rank0.pt"):
        trainer, after = resume_from(full, checkpoint, tmp_path / checkpoint)
        assert trainer.state.algorithms[0].merges == 2
        assert after["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-6)
        assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in uninterrupted["evals"]],
                                                                    rel=1e-6)


def test_full_rank_warm_start_then_adapters_from_the_recipe_block(tiny_recipe, tmp_path):
    """start_at: full rank until 2ba, then the model.peft adapters go on; resume replays them."""
    full = _relora(tiny_recipe, start_at="2ba", interval="3ba", prune="random", ratio=0.5)
    full.update(max_duration="8ba")
    plan = validate(full)
    trainer = run(plan)
    alg = trainer.state.algorithms[0]
    assert alg.started and [h["batch"] for h in alg.history] == [5, 8]
    hf = unwrap_hf(trainer.state.model)
    layers = lora_targets(hf)
    assert len(layers) == 2 * 7 and all(layer.r["default"] == 4 for layer in layers.values())
    assert all(layer.scaling["default"] == 2.0 for layer in layers.values())
    # the optimizer holds the adapters and the parameters that still train, not the frozen base weights
    opt = trainer.state.optimizers[0]
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in hf.parameters() if p.requires_grad}
    assert not any(id(p) in held for n, p in hf.named_parameters() if ".base_layer." in n)
    assert hf.model.embed_tokens.weight.requires_grad
    _, after = resume_from(full, "ep0-ba4-rank0.pt", tmp_path)
    assert after["train_loss"] == pytest.approx(read_summary(full["summary_file"])["train_loss"], rel=1e-6)


def test_plain_trainer_logs_merges_and_exports_a_merged_model(tmp_path):
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import HuggingFaceModel
    from torch.utils.data import DataLoader
    from transformers import GPT2Config, GPT2LMHeadModel

    from composer_growth.functional import add_lora

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    add_lora(hf, "all", rank=4)
    model = HuggingFaceModel(hf, use_logits=True)
    ids = torch.randint(0, 64, (48, 16))
    data = DataLoader([{"input_ids": r, "labels": r.clone()} for r in ids], batch_size=8)
    logs = InMemoryLogger()
    alg = LoraMergeRestart(interval="2ba", prune="reset", export_folder=str(tmp_path / "hf"))
    trainer = Trainer(model=model, train_dataloader=data, max_duration="5ba", algorithms=[alg], loggers=[logs],
                      optimizers=torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-2),
                      progress_bar=False)
    trainer.fit()
    assert [int(v) for _, v in logs.data["lora/merges"]] == [1, 2]
    assert [int(v) for _, v in logs.data["lora/merge_batch"]] == [2, 4]
    state = alg.state_dict()
    assert "repr" in state and state["merges"] == 2
    torch.save(state, tmp_path / "alg.pt")
    assert torch.load(tmp_path / "alg.pt", weights_only=True) == state
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    hf.eval()
    with torch.no_grad():
        x = ids[:2]
        assert torch.allclose(reloaded(x).logits, hf(x).logits, atol=1e-5)


def _full_rank_names(hf):
    return [n for n, _ in hf.named_parameters() if n.startswith("model.embed_tokens.") or n.startswith("lm_head.")
            or "norm." in n]


class MomentsAcrossMerge(Callback):
    """At the end of each batch, before (``before``, an algorithm listed ahead of lora_merge) and after the
    algorithms' BATCH_END (this callback): the first moments of the full-rank parameters and of the adapters."""

    def __init__(self):
        self.seen: dict[str, dict[int, dict[str, list[torch.Tensor]]]] = {"before": {}, "after": {}}
        probe = self

        class Before(Algorithm):
            def match(self, event, state):
                return event == Event.BATCH_END

            def apply(self, event, state, logger):
                probe._record("before", state)

        self.before = Before()

    def _record(self, when, state):
        opt, hf = state.optimizers[0], unwrap_hf(state.model)
        full = _full_rank_names(hf)
        self.seen[when][int(state.timestamp.batch)] = {
            kind: [opt.state[p]["exp_avg"].clone() for n, p in hf.named_parameters() if pick(n, full)]
            for kind, pick in (("full", lambda n, f: n in f), ("lora", lambda n, f: "lora_" in n))}

    def batch_end(self, state, logger):
        self._record("after", state)


def test_full_rank_embeddings_norms_head_train_next_to_adapters_and_export(tiny_recipe, tmp_path):
    """Default full_rank (the reference's): with a model.peft model (peft freezes all but the adapters) the
    embedding, norms and head train in the optimizer from the first step; merges and the moment pruning
    leave them alone; the adapters carry model.peft.lora_dropout; the merged export gives the same logits."""
    recipe = _relora(tiny_recipe, export_folder=str(tmp_path / "hf"))
    recipe["model"]["peft"]["lora_dropout"] = 0.1
    recipe.update(max_duration="6ba")
    plan = validate(recipe)
    moments = MomentsAcrossMerge()
    plan.callbacks.append(moments)
    plan.algorithms.insert(0, moments.before)
    start = {}

    class Snapshot(Callback):
        def fit_start(self, state, logger):
            start.update({n: p.detach().clone() for n, p in unwrap_hf(state.model).named_parameters()})

    plan.callbacks.append(Snapshot())
    trainer = run(plan)
    hf = unwrap_hf(trainer.state.model)
    alg = trainer.state.algorithms[1]
    assert [h["batch"] for h in alg.history] == [3, 6]
    names = _full_rank_names(hf)
    assert len(names) == 1 + 2 * 2 + 1 + 1  # embedding, two norms per block, final norm, head
    params = dict(hf.named_parameters())
    held = {id(p) for g in trainer.state.optimizers[0].param_groups for p in g["params"]}
    for n in names:
        assert params[n].requires_grad and id(params[n]) in held, n
        assert not torch.equal(params[n].detach(), start[n]), n  # trained
    assert all(not p.requires_grad for n, p in params.items() if ".base_layer." in n)
    for b in (3, 6):  # across each merge: the adapters' moments pruned (90%), the full-rank ones untouched
        before, after = moments.seen["before"][b], moments.seen["after"][b]
        assert len(before["full"]) == len(names) and all(torch.count_nonzero(m) > 0 for m in before["full"])
        assert all(torch.equal(x, y) for x, y in zip(before["full"], after["full"]))
        kept = sum(int(torch.count_nonzero(m)) for m in after["lora"])
        assert kept < 0.2 * sum(int(torch.count_nonzero(m)) for m in before["lora"])
    layers = lora_targets(hf).values()
    assert all(layer.lora_dropout["default"].p == 0.1 for layer in layers)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    hf.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, hf(ids).logits, atol=1e-5)
    assert torch.equal(reloaded.model.embed_tokens.weight, params["model.embed_tokens.weight"].detach())


def test_full_rank_empty_trains_only_adapters(tiny_recipe):
    recipe = _relora(tiny_recipe, full_rank=[], interval="2ba", restart_warmup="1ba")
    recipe.update(max_duration="3ba")
    trainer = run(validate(recipe))
    hf = unwrap_hf(trainer.state.model)
    assert {n for n, p in hf.named_parameters() if p.requires_grad} == {n for n, _ in hf.named_parameters()
                                                                       if "lora_" in n}


def test_start_at_full_rank_subset_freezes_the_rest_and_resumes_with_dropout(tiny_recipe, tmp_path):
    """start_at with full_rank [norms]: at the start the embedding and head freeze and leave the optimizer,
    the norms keep training; the recipe's lora_dropout reaches the adapters added mid-run (and those the
    resumed run replays); a run resumed from the checkpoint written right after a merge (dropout on) gives
    the uninterrupted run's losses."""
    full = _relora(tiny_recipe, start_at="2ba", interval="2ba", restart_warmup="1ba", full_rank=["norms"])
    full["model"]["peft"]["lora_dropout"] = 0.2
    trainer = run(validate(full))
    alg = trainer.state.algorithms[0]
    assert [h["batch"] for h in alg.history] == [4, 6, 8]
    hf = unwrap_hf(trainer.state.model)
    assert all(layer.lora_dropout["default"].p == 0.2 for layer in lora_targets(hf).values())
    trainable = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert "model.norm.weight" in trainable and "model.layers.1.input_layernorm.weight" in trainable
    assert "model.embed_tokens.weight" not in trainable and "lm_head.weight" not in trainable
    held = {id(p) for g in trainer.state.optimizers[0].param_groups for p in g["params"]}
    assert held == {id(p) for p in hf.parameters() if p.requires_grad}
    uninterrupted = read_summary(full["summary_file"])
    resumed, after = resume_from(full, "ep0-ba6-rank0.pt", tmp_path)  # saved right after the second merge
    assert after["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-6)
    assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in uninterrupted["evals"]], rel=1e-6)
    assert all(layer.lora_dropout["default"].p == 0.2 for layer in lora_targets(unwrap_hf(resumed.state.model)).values())


class RngAtBatchStart(Callback):
    """torch's global RNG state at the start of every batch (the one dropout draws its masks from)."""

    def __init__(self):
        self.states: dict[int, torch.Tensor] = {}

    def batch_start(self, state, logger):
        self.states[int(state.timestamp.batch)] = torch.get_rng_state()


def _resumes_exactly(full, checkpoint, tmp_path):
    """Run ``full`` and a run resumed from ``checkpoint`` (mid-epoch: the StreamingDataset resumes itself);
    both draw the same random numbers batch by batch and end with the same train and eval losses."""
    rng_full = RngAtBatchStart()
    plan = validate(full)
    plan.callbacks.append(rng_full)
    run(plan)
    uninterrupted = read_summary(full["summary_file"])
    rng_resumed = RngAtBatchStart()
    trainer, after = resume_from(full, checkpoint, tmp_path, callbacks=[rng_resumed])
    assert int(trainer.state.timestamp.batch_in_epoch) > 0 and trainer.state.dataset_resumption.get("train")
    assert sorted(rng_resumed.states) == [b for b in sorted(rng_full.states) if b >= min(rng_resumed.states)]
    assert all(torch.equal(rng_resumed.states[b], rng_full.states[b]) for b in rng_resumed.states)
    assert after["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-6)
    assert [e["loss"] for e in after["evals"]] == pytest.approx([e["loss"] for e in uninterrupted["evals"]], rel=1e-6)
    return trainer


def test_resume_right_after_a_merge_with_full_rank_and_dropout(tiny_recipe, tmp_path):
    """model.peft adapters with dropout, resumed mid-epoch right after the second merge (batch 6): the
    checkpoint's RNG states are loaded before the first batch, so the dropout masks are the run's."""
    full = _relora(tiny_recipe)
    full["model"]["peft"]["lora_dropout"] = 0.1
    trainer = _resumes_exactly(full, "ep0-ba6-rank0.pt", tmp_path)  # the second merge is at batch 6
    assert trainer.state.algorithms[0].merges == 2


def test_adapters_added_mid_run_with_dropout_resume_from_the_first_merge(tiny_recipe, tmp_path):
    """start_at with lora_merge's own dropout: a run resumed from the checkpoint written at the first merge
    (batch 4, four batches of dropout ahead) draws the uninterrupted run's masks and ends with its losses."""
    full = _relora(tiny_recipe, start_at="2ba", interval="2ba", restart_warmup="1ba", dropout=0.2)
    trainer = _resumes_exactly(full, "ep0-ba4-rank0.pt", tmp_path)
    alg = trainer.state.algorithms[0]
    assert [h["batch"] for h in alg.history] == [4, 6, 8]
    assert all(layer.lora_dropout["default"].p == 0.2 for layer in lora_targets(unwrap_hf(trainer.state.model)).values())


@pytest.mark.launcher
def test_two_ranks_hold_identical_parameters_after_merges(tiny_recipe, tmp_path):
    recipe = _relora(tiny_recipe, peft=False, start_at="2ba", interval="2ba", prune="random", ratio=0.5)
    recipe.update(max_duration="6ba", eval_first=False, eval_interval="6ba", save_folder=None)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = launch(os.path.join(ROOT, "tests", "scripts", "grow_ddp.py"), [str(path), str(tmp_path / "p{rank}.json")],
                  tmp_path)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    r0, r1 = read_summary(tmp_path / "p0.json"), read_summary(tmp_path / "p1.json")
    assert r0["ddp"] and any("lora_A" in n for n in r0["params"])
    assert r0["params"] == r1["params"]  # base weights after the merges, and the fresh adapters
    assert r0["loss"] == r1["loss"]


@pytest.mark.launcher
def test_lora_under_fsdp2_matches_ddp_and_resumes_after_a_merge(tiny_recipe, tmp_path, capsys):
    """Under composer -n 2, DDP and FSDP2 (sharded checkpoints): a full-rank warm start, adapters on
    q/v at batch 2 (through surgery.grow), G_stack at batch 3 giving the new stack rank-2 adapters on its
    other linears (stack_lora), merges with magnitude pruning at batches 4, 6 and 8. FSDP2 trains what
    DDP trains; a run resumed from the sharded checkpoint after the first merge goes on exactly; the
    merged HF exports agree."""
    tiny_recipe["model"]["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    tiny_recipe["algorithms"] = {
        "lora_merge": {"start_at": "2ba", "interval": "2ba", "prune": "magnitude", "ratio": 0.5,
                       "restart_warmup": "1ba", "export_folder": "export"},
        "stack_layers": {"at": "3ba", "times": 2, "stack_lora": 2, "probe_loss": False},
        # one phase at the data's length: its end-of-run HF export must fold the injected adapters in
        "context_length_schedule": {"phases": [{"name": "all", "seq_length": 32}], "save_checkpoints": False,
                                    "eval_batches": 0},
    }
    tiny_recipe.update(max_duration="8ba", eval_first=False, eval_interval="8ba", save_interval="5ba")
    runs = ["ddp", "sharded", "sharded@ep0-ba5"]
    for results in fsdp_runs(tiny_recipe, runs, tmp_path):
        ddp, fsdp, resumed = (results[r] for r in runs)
        assert not ddp["fsdp"] and fsdp["fsdp"] and fsdp["units"] == 4 + 1
        merges = [[h["batch"] for h in next(a for a in run_["replayed"] if "history" in a)["history"]]
                  for run_ in (ddp, fsdp, resumed)]
        assert merges == [[4, 6, 8]] * 3
        # stack_lora on a peft model: not shard-local, the growth ran on gathered tensors
        assert [next(a["path"] for a in r["replayed"] if "path" in a) for r in (ddp, fsdp)] == ["unsharded", "gathered"]
        assert fsdp["layers"] == resumed["layers"] == 4
        assert any("layers.3.mlp.up_proj.lora_A" in n for n in fsdp["params"])
        assert fsdp["params"].keys() == ddp["params"].keys() == resumed["params"].keys()
        assert fsdp["losses"] == pytest.approx(ddp["losses"], abs=1e-5)
        assert fsdp["params"] == pytest.approx(ddp["params"], rel=1e-3, abs=1e-3)
        assert resumed["losses"] == pytest.approx(fsdp["losses"][5:], abs=1e-6)
        assert resumed["params"] == pytest.approx(fsdp["params"], rel=1e-6, abs=1e-6)
    # a checkpoint with adapters of two ranks (model.peft's and stack_lora's) is refused by the checkpoint
    # export, in one line that names the in-run exports
    from composer_growth.cli import main

    assert main(["export", str(tmp_path / "ddp" / "ep0-ba5-rank0.pt"), str(tmp_path / "hf"), "--lora-alpha", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapters of ranks [2, 4]" in err and "export_folder" in err, err
    exports = {r: AutoModelForCausalLM.from_pretrained(tmp_path / r / "export").eval() for r in runs}
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        logits = {r: m(ids).logits for r, m in exports.items()}
    assert exports["sharded"].config.architectures == ["LlamaForCausalLM"]
    assert torch.allclose(logits["sharded"], logits["ddp"], atol=1e-4)
    assert torch.allclose(logits["sharded@ep0-ba5"], logits["sharded"], atol=1e-5)
    for r in runs:  # the schedule's phase export: a plain model, the same weights as lora_merge's export
        phase = AutoModelForCausalLM.from_pretrained(tmp_path / r / "all").eval()
        with torch.no_grad():
            assert torch.allclose(phase(ids).logits, logits[r], atol=1e-5), r


@pytest.mark.parametrize("kwargs, peft, key", [
    ({"interval": "20ba"}, True, "algorithms.lora_merge.interval"),
    ({"interval": "1.0dur"}, True, "algorithms.lora_merge.interval"),
    ({"interval": "0ba"}, True, "algorithms.lora_merge.interval"),
    ({"start_at": "4ba", "interval": "4ba"}, True, "algorithms.lora_merge.interval"),
    ({"start_at": "2ba", "rank": 0}, False, "algorithms.lora_merge.rank"),
    ({"rank": 4}, True, "algorithms.lora_merge.rank"),
    ({"ratio": 1.0}, True, "algorithms.lora_merge.ratio"),
    ({"ratio": -0.1}, True, "algorithms.lora_merge.ratio"),
    ({"prune": "half"}, True, "algorithms.lora_merge.prune"),
    ({"restart_warmup": "4ba"}, True, "algorithms.lora_merge.restart_warmup"),
    ({"targets": "embedding"}, True, "algorithms.lora_merge.targets"),
    ({"targets": ["c_attn"]}, True, "algorithms.lora_merge.targets"),
    ({"targets": "vocab"}, True, "algorithms.lora_merge.targets"),
    ({"start_at": "2ba", "targets": ["wq"]}, False, "algorithms.lora_merge.targets"),
    ({}, False, "algorithms.lora_merge.start_at"),
    ({"seed": "x"}, True, "algorithms.lora_merge.seed"),
    ({"full_rank": ["vocab"]}, True, "algorithms.lora_merge.full_rank"),
    ({"full_rank": "norms"}, True, "algorithms.lora_merge.full_rank"),
    ({"full_rank": ["head", "head"]}, True, "algorithms.lora_merge.full_rank"),
    ({"start_at": "2ba", "targets": "embedding", "full_rank": ["embeddings"]}, False,
     "algorithms.lora_merge.full_rank"),
    ({"dropout": 0.1}, True, "algorithms.lora_merge.dropout"),
    ({"start_at": "2ba", "dropout": 1.0}, False, "algorithms.lora_merge.dropout"),
])
def test_bad_lora_merge_recipes_fail_before_training(tiny_recipe, kwargs, peft, key):
    recipe = _relora(tiny_recipe, peft=peft, **kwargs)
    with pytest.raises(ConfigError) as err:
        validate(recipe)
    assert str(err.value).startswith(f"{key}="), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, match", [
    ({"config": {"tie_word_embeddings": True}}, "both embeddings and head, or neither"),
    ({"peft": {**PEFT, "modules_to_save": ["lm_head"]}}, "lm_head already trains through a peft modules_to_save copy"),
])
def test_full_rank_conflicts_fail_before_training(tiny_recipe, change, match):
    recipe = _relora(tiny_recipe, full_rank=["head"])
    model = recipe["model"]
    model["config"] = {**model["config"], **change.get("config", {})}
    model["peft"] = change.get("peft", model["peft"])
    with pytest.raises(ConfigError, match=f"^algorithms.lora_merge.full_rank=.*{match}") as err:
        validate(recipe)
    assert "\n" not in str(err.value)


def test_modules_to_save_with_adapters_added_mid_run_fails_before_training(tiny_recipe):
    recipe = _relora(tiny_recipe, start_at="2ba", full_rank=[])
    recipe["model"]["peft"]["modules_to_save"] = ["lm_head"]
    with pytest.raises(ConfigError, match=r"^model.peft.modules_to_save=\['lm_head'\]: .*lora_merge.full_rank$") as err:
        validate(recipe)
    assert "\n" not in str(err.value)
    recipe["model"]["peft"]["modules_to_save"] = []
    validate(recipe)


def test_lora_merge_under_fsdp2_rejects_activation_checkpointing_before_training(tiny_recipe):
    recipe = _relora(tiny_recipe)
    recipe["parallelism"] = {"fsdp": {"version": 2, "activation_checkpointing": True}}
    with pytest.raises(ConfigError, match=r"^parallelism.fsdp.activation_checkpointing=True: false with lora_merge"):
        validate(recipe)


def test_targets_error_names_family_and_modules(tiny_recipe):
    recipe = _relora(tiny_recipe, targets=["c_attn"])
    with pytest.raises(ConfigError, match=r"llama model.*model.layers.0.self_attn.q_proj"):
        validate(recipe)


def test_plain_trainer_without_adapters_fails_at_init():
    from composer import Trainer
    from composer.models import HuggingFaceModel
    from transformers import LlamaConfig, LlamaForCausalLM

    model = HuggingFaceModel(LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                          num_attention_heads=2, vocab_size=64)))
    with pytest.raises(ConfigError, match="llama model has no LoRA adapters"):
        Trainer(model=model, algorithms=[LoraMergeRestart(interval="2ba")], max_duration="4ba")


def test_stack_lora_gives_new_stacks_their_ranks_and_frozen_trunk_freezes_adapters(tiny_recipe):
    tiny_recipe["model"]["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    tiny_recipe["algorithms"] = {"stack_layers": {"at": "2ba", "mode": "repeat", "times": 3, "trunk": "frozen",
                                                  "init": "function_preserving", "stack_lora": [2, 3]},
                                 "lora_merge": {"interval": "2ba"}}
    tiny_recipe.update(max_duration="4ba", eval_interval="4ba", save_interval="4ba")
    trainer = run(validate(tiny_recipe))
    hf = unwrap_hf(trainer.state.model)
    assert len(hf.model.layers) == 6
    ranks = {n: layer.r["default"] for n, layer in lora_targets(hf).items()}
    for i, rank in ((2, 2), (3, 2), (4, 3), (5, 3)):
        assert ranks[f"model.layers.{i}.self_attn.q_proj"] == 4  # copied with the block, as in the trunk
        assert ranks[f"model.layers.{i}.self_attn.o_proj"] == rank and ranks[f"model.layers.{i}.mlp.up_proj"] == rank
    # the trunk (layers 0, 1) is frozen, its adapters too; the new stacks train through their adapters
    for name, p in hf.named_parameters():
        if name.startswith(("model.layers.0.", "model.layers.1.")):
            assert not p.requires_grad, name
        elif name.startswith("model.layers.") and "lora_" in name:
            assert p.requires_grad, name
        elif name.startswith("model.layers.") and name.endswith("norm.weight"):  # lora_merge's full_rank norms
            assert p.requires_grad, name
        elif name.startswith("model.layers."):  # copies of peft blocks: base weights frozen as in peft
            assert not p.requires_grad, name
    assert trainer.state.algorithms[1].merges == 2
    assert StackLayers(mode="repeat", times=4, stack_lora=2, stack_lora_pattern="increasing").stack_lora_ranks == [2, 4, 6]
    assert StackLayers(mode="append", num_new=2, stack_lora=8).stack_lora_ranks == [8]
    with pytest.raises(ConfigError, match="stack_lora="):
        StackLayers(mode="repeat", times=3, stack_lora=[2])
    with pytest.raises(ConfigError, match="stack_lora_pattern="):
        StackLayers(stack_lora=2, stack_lora_pattern="random")
