"""llm-foundry as a home: its MPT model in the family table (growth, positions, the context schedule),
datasets prepared by ``composer-growth prepare-data --column tokens``, and the train YAMLs of
``yamls/foundry/`` run through llm-foundry's own entry (``train_from_yaml``).

Runs in the llm-foundry environment (``.ci/run foundry``); skipped without llm-foundry.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from composer.core import Callback

pytest.importorskip("llmfoundry")

from composer_growth import ConfigError, ContextLengthSchedule, SeqLengthWarmup, StackLayers, WidenMLP  # noqa: E402
from composer_growth.families import family_of  # noqa: E402
from composer_growth.functional import stack_layers, widen_mlp  # noqa: E402
from composer_growth.functional.rope import apply_rope_scaling  # noqa: E402
from composer_growth.unwrap import unwrap_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = os.path.join(ROOT, "yamls", "foundry")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.foundry]
VOCAB = 128


def _mpt(positions="alibi", max_seq_len=64, seed=0, **kw):
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

    attn = {"attn_impl": "torch", "alibi": positions == "alibi", "rope": positions == "rope", "rope_impl": "hf"}
    config = MPTConfig(d_model=32, n_heads=2, n_layers=2, expansion_ratio=2, max_seq_len=max_seq_len,
                       vocab_size=VOCAB, attn_config=attn, learned_pos_emb=positions == "learned", **kw)
    torch.manual_seed(seed)
    return MPTForCausalLM(config).eval()


@torch.no_grad()
def _logits(model, length=12):
    ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    return model(ids).logits


# -- MPT in the family table ------------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["alibi", "learned", "rope"])
def test_mpt_growth_is_function_preserving_and_reloads(positions, tmp_path):
    from llmfoundry.models.mpt import MPTForCausalLM

    model = _mpt(positions)
    family = family_of(model)
    assert (family.name, family.positions(model.config), family.intermediate_size(model.config)) == (
        "mpt", positions, 64)
    before = _logits(model)
    stack_layers(model, mode="repeat", times=2, init="function_preserving")
    widen_mlp(model, 1.5, seed=3)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-5)
    blocks = model.transformer.blocks
    assert model.config.n_layers == len(blocks) == 4 and model.config.ffn_config["ffn_hidden_size"] == 96
    for i, block in enumerate(blocks):  # MPT tags every module of a block with its index and the last one
        assert {m.block_idx for m in block.modules()} == {i} and {m.max_block_idx for m in block.modules()} == {3}
        assert block.ffn.down_proj._is_residual  # the model's own markers survive the new projections
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(MPTForCausalLM.from_pretrained(tmp_path).eval()), before, rtol=0, atol=1e-5)


def test_mpt_rope_scaling_matches_a_fresh_model(tmp_path):
    from llmfoundry.models.mpt import MPTForCausalLM

    model = _mpt("rope", max_seq_len=32)
    report = apply_rope_scaling(model, {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                                max_position_embeddings=64)
    attn = model.config.attn_config
    assert attn["rope_hf_config"] == {"type": "linear", "factor": 2.0} and attn["rope_theta"] == 5000.0
    assert model.config.max_seq_len == 64 and report["max_addressable_positions"] == 64
    model.save_pretrained(tmp_path)
    fresh = MPTForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(model, 64), _logits(fresh, 64), rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"rope_type='yarn': one of default, linear, dynamic, llama3"):
        apply_rope_scaling(model, {"rope_type": "yarn", "factor": 2.0})  # MPT's config cannot say yarn


def _composer(model):
    from composer.models import HuggingFaceModel

    return HuggingFaceModel(model, use_logits=True)


def _init(algorithm, model):
    from composer import Trainer
    from torch.utils.data import DataLoader

    ids = torch.randint(0, VOCAB, (4, 32))
    loader = DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=4)
    return Trainer(model=_composer(model), train_dataloader=loader, max_duration="2ba", algorithms=[algorithm],
                   progress_bar=False, log_to_console=False)


@pytest.mark.parametrize("phase, positions, message", [
    ({"seq_length": 64}, "alibi", r"^context_length_schedule: phases\[1\].seq_length=64: at most mpt's max_seq_len "
                                  r"\(32\): ALiBi needs no scaling"),
    ({"seq_length": 32, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "alibi",
     r"^context_length_schedule: phases\[1\].rope_scaling=.*mpt has alibi positions, not RoPE \(ALiBi needs no"),
    ({"seq_length": 64}, "rope", r"^context_length_schedule: phases\[1\].seq_length=64: beyond what the phase's "
                                 r"rope config can address"),
])
def test_context_schedule_errors_on_mpt_name_the_algorithm(phase, positions, message):
    schedule = ContextLengthSchedule(phases=[{"seq_length": 16, "duration": "1ba"}, phase], verbose=False)
    with pytest.raises(ConfigError, match=message):
        _init(schedule, _mpt(positions, max_seq_len=32))


def test_context_schedule_on_mpt_rope_raises_max_seq_len_with_the_phase(tmp_path):
    from composer import Trainer
    from llmfoundry.models.mpt import MPTForCausalLM
    from torch.utils.data import DataLoader

    model = _mpt("rope", max_seq_len=16)
    ids = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids],
                        batch_size=4)
    schedule = ContextLengthSchedule(phases=[
        {"name": "short", "seq_length": 16, "duration": "2ba"},
        {"name": "long", "seq_length": 32, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}],
        save_folder=str(tmp_path), save_checkpoints=False, eval_batches=0, verbose=False)
    Trainer(model=_composer(model), train_dataloader=loader, max_duration="4ba", algorithms=[schedule],
            optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), progress_bar=False,
            log_to_console=False).fit()
    assert model.config.max_seq_len == 32
    assert model.config.attn_config["rope_hf_config"] == {"type": "linear", "factor": 2.0}
    export = MPTForCausalLM.from_pretrained(tmp_path / "long").eval()
    torch.testing.assert_close(_logits(model.eval(), 32), _logits(export, 32), rtol=0, atol=1e-6)


def test_stack_refuses_mpt_blocks_configured_per_position():
    overrides = {"order": [{"name": "default"}, {"name": "window"}],
                 "overrides": {"window": {"attn_config": {"sliding_window_size": 8}}}}
    with pytest.raises(ConfigError, match=r"^stack_layers: model=.*block_overrides.*cannot be stacked"):
        _init(StackLayers(at="1ba"), _mpt("alibi", block_overrides=overrides))


def test_growth_error_names_the_algorithm():
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(ConfigError, match=r"^stack_layers: model family='bert': supported families: .*mpt"):
        _init(StackLayers(at="1ba"), BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=2, intermediate_size=32)))


# -- the YAMLs of yamls/foundry/ through train_from_yaml, on data prepare-data writes ---------------

@pytest.fixture(scope="module")
def foundry_data(tiny_data, tmp_path_factory):
    """llm-foundry's `tokens` layout, written by `composer-growth prepare-data --column tokens`."""
    from composer_growth.cli import main

    out = str(tmp_path_factory.mktemp("foundry") / "data")
    assert main(["prepare-data", "--out", out, "--column", "tokens", "--seq-len", "32", "--max-bytes", "300000",
                 "--val-percent", "10", "--tokenizer", os.path.join(tiny_data, "tokenizer")]) == 0
    return out


def _train(name, data, run_folder, tmp_path, edit=None, args=()):
    """train_from_yaml on yamls/foundry/<name> (optionally edited), with an in-memory logger."""
    from llmfoundry.command_utils import train_from_yaml

    with open(os.path.join(YAMLS, name)) as f:
        config = yaml.safe_load(f)
    config["variables"].update(data_local=data, run_folder=str(run_folder))
    if "pretrained_model_name_or_path" in config["model"]:
        config["model"]["pretrained_model_name_or_path"] = os.path.join(YAMLS, "llama-tiny")
    config.update(loggers={"inmemory": {}}, log_to_console=False)
    if edit is not None:
        edit(config)
    path = tmp_path / f"{os.path.basename(str(run_folder))}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return train_from_yaml(str(path), list(args))


def _algorithms(trainer):
    return {type(a): a for a in trainer.state.algorithms}


def _series(trainer, key):
    from composer.loggers import InMemoryLogger

    logger = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return [value for _, value in logger.data[key]]


class BatchLengths(Callback):
    """The length each training batch trains at, read at ``BATCH_START`` (after the algorithms cut it);
    built by llm-foundry from its callback registry."""

    def __init__(self):
        self.lengths: list[int] = []

    def batch_start(self, state, logger) -> None:
        self.lengths.append(int(state.batch["input_ids"].shape[1]))


def _record_batch_lengths(config) -> None:
    from llmfoundry.registry import callbacks

    if "test_batch_lengths" not in callbacks.get_all():
        callbacks.register("test_batch_lengths", func=BatchLengths)
    config["callbacks"] = {**(config.get("callbacks") or {}), "test_batch_lengths": {}}


def _batch_lengths(trainer) -> list[int]:
    return next(c for c in trainer.state.callbacks if isinstance(c, BatchLengths)).lengths


class BatchFlops(Callback):
    """At each ``BATCH_END`` (where the speed monitor reads them): the model's ``flops_per_batch``, the
    same count from a fresh parameter count, and ours (functional.flops)."""

    def __init__(self):
        self.rows: list[tuple[int, int, int, int]] = []

    def batch_end(self, state, logger) -> None:
        from llmfoundry.models.utils.mpt_param_count import mpt_get_active_params

        from composer_growth.functional.flops import batch_flops

        model, batch = state.model, state.batch
        bs, msl = batch["input_ids"].shape[:2]
        fresh = (2 * mpt_get_active_params(model) * msl + model.get_attention_flops(msl)) * 3 * bs
        self.rows.append((int(state.timestamp.batch), model.flops_per_batch(batch), fresh,
                          batch_flops(model.model.config, batch)))


def _record_flops(config) -> None:
    from llmfoundry.registry import callbacks

    if "test_batch_flops" not in callbacks.get_all():
        callbacks.register("test_batch_flops", func=BatchFlops)
    config["callbacks"] = {**(config.get("callbacks") or {}), "test_batch_flops": {},
                           "speed_monitor": {"window_size": 1},
                           "run_summary": {"path": os.path.join(config["variables"]["run_folder"], "summary.json")}}


def test_mpt_yaml_grows_preserves_logits_and_resumes_exactly(foundry_data, tmp_path):
    full = _train("mpt_cpu.yaml", foundry_data, tmp_path / "full", tmp_path, edit=_record_flops)
    algs = _algorithms(full)
    assert set(algs) >= {SeqLengthWarmup, ContextLengthSchedule, StackLayers, WidenMLP}
    hf = unwrap_hf(full.state.model)
    assert type(hf).__name__ == "MPTForCausalLM"
    assert hf.config.n_layers == 4 and hf.config.ffn_config["ffn_hidden_size"] == 128
    for alg in (algs[StackLayers], algs[WidenMLP]):  # the loss on the growth batch, right before and after
        assert alg.applied and abs(alg.record["loss_before"] - alg.record["loss_after"]) < 1e-5, alg.record
    assert [b.block_idx for b in hf.transformer.blocks] == [0, 1, 2, 3]
    # FLOPs follow growth: llm-foundry's cached parameter count is dropped by each surgery
    flops = next(c for c in full.state.callbacks if isinstance(c, BatchFlops)).rows
    assert all(got == fresh for _, got, fresh, _ in flops), flops
    assert flops[0][1] < flops[-1][1]
    assert all(abs(got / ours - 1) < 0.05 for _, got, _, ours in flops), flops  # the plan's count, near enough
    # run_summary comes from llm-foundry's callbacks registry (our entry point), with the growth events
    with open(tmp_path / "full" / "summary.json") as f:
        events = [e["name"] for e in json.load(f)["events"]]
    assert {"stack_layers", "widen_mlp"} <= set(events), events
    # the schedule took the Trainer's save_folder: a checkpoint and an HF export per phase
    for phase in ("short", "long"):
        assert os.path.isfile(tmp_path / "full" / "checkpoints" / phase / "model.safetensors")

    resumed = _train("mpt_cpu.yaml", foundry_data, tmp_path / "resumed", tmp_path,
                     args=[f"load_path={tmp_path / 'full' / 'checkpoints' / 'ep0-ba3-rank0.pt'}"])
    assert int(resumed.state.timestamp.batch) == 6
    assert int(resumed.state.timestamp.token) == int(full.state.timestamp.token)
    grown = unwrap_hf(resumed.state.model)
    assert grown.config.n_layers == 4 and grown.config.ffn_config["ffn_hidden_size"] == 128
    for (name, a), (_, b) in zip(hf.named_parameters(), grown.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


class ModelFlops(Callback):
    """At each ``BATCH_END``: the model's ``flops_per_batch`` (None where it has none) and ours."""

    def __init__(self):
        self.rows: list[tuple[int | None, int]] = []

    def batch_end(self, state, logger) -> None:
        from composer_growth.functional.flops import batch_flops

        count = getattr(state.model, "flops_per_batch", None)
        self.rows.append((None if count is None else count(state.batch),
                          batch_flops(unwrap_hf(state.model).config, state.batch)))


def _record_model_flops(config) -> None:
    from llmfoundry.registry import callbacks

    if "test_model_flops" not in callbacks.get_all():
        callbacks.register("test_model_flops", func=ModelFlops)
    config["callbacks"] = {**(config.get("callbacks") or {}), "test_model_flops": {},
                           "speed_monitor": {"window_size": 1}}


def test_llama_yaml_context_schedule_with_phase_end_evals(foundry_data, tmp_path):
    trainer = _train("llama_cpu.yaml", foundry_data, tmp_path / "llama", tmp_path, edit=_record_model_flops)
    hf = unwrap_hf(trainer.state.model)
    assert hf.config.num_hidden_layers == 4 and hf.config.intermediate_size == 128
    # llm-foundry's hf_causal_lm has no flops_per_batch: the growth algorithms give it one, at the grown size
    flops = next(c for c in trainer.state.callbacks if isinstance(c, ModelFlops)).rows
    assert all(got == ours for got, ours in flops), flops
    assert flops[0][0] < flops[-1][0] and _series(trainer, "throughput/flops_per_sec")
    assert hf.config.rope_scaling["rope_type"] == "linear"
    # the schedule's own perplexity loop ran on llm-foundry's eval batches at every phase end
    with open(tmp_path / "llama" / "checkpoints" / "long" / "phase.json") as f:
        info = json.load(f)
    assert set(info["perplexity"]) == {"16", "32"} and all(v > 0 for v in info["perplexity"].values())
    assert _series(trainer, "context/phase_end_ppl/32")


@pytest.mark.parametrize("name", ["mpt_cpu.yaml", "llama_cpu.yaml"])
def test_warmup_and_schedule_in_either_order_give_the_same_lengths(foundry_data, tmp_path, name):
    def order(first):
        def edit(config):
            algs = config["algorithms"]
            names = [first, *(n for n in ("seq_length_warmup", "context_length_schedule") if n != first)]
            config["algorithms"] = {n: algs[n] for n in names}
            config["algorithms"]["context_length_schedule"].update(save_checkpoints=False, export_hf=False,
                                                                   eval_batches=0)
            config.update(save_folder=None, eval_interval="6ba")
            _record_batch_lengths(config)
        return edit

    runs = [_train(name, foundry_data, tmp_path / first, tmp_path, edit=order(first))
            for first in ("seq_length_warmup", "context_length_schedule")]
    lengths = [_batch_lengths(t) for t in runs]
    assert lengths[0] == lengths[1] == [8, 8, 16, 32, 32, 32]
    assert int(runs[0].state.timestamp.token) == int(runs[1].state.timestamp.token)


def _eval(tmp_path, name, models, data):
    """llm-foundry's eval_from_yaml with the training YAML's eval loader; returns the eval loss per model."""
    from llmfoundry.command_utils import eval_from_yaml

    with open(os.path.join(YAMLS, "mpt_cpu.yaml")) as f:
        train = yaml.safe_load(f)
    loader = train["eval_loader"]
    loader["dataset"].update(local=data, max_seq_len=32)
    config = {"run_name": name, "seed": 17, "max_seq_len": 32, "device_eval_batch_size": 4, "precision": "fp32",
              "eval_subset_num_batches": 2, "eval_loader": loader, "models": models,
              "loggers": {"inmemory": {}}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    trainers, _ = eval_from_yaml(str(path), [])
    return [float(_series(t, "metrics/eval/LanguageCrossEntropy")[-1]) for t in trainers]


def _eval_each(tmp_path, models, data):  # one eval_from_yaml per model: llm-foundry consumes its loader config
    return [loss for m in models for loss in _eval(tmp_path, m["model_name"], [m], data)]


def test_grown_mpt_checkpoint_evaluates_in_llm_foundry_eval(foundry_data, tmp_path, capsys):
    """A grown checkpoint that train_from_yaml wrote leaves the run two ways, both read by llm-foundry's own
    eval: the HF folder ``composer-growth export`` writes (``hf_causal_lm``, its remote code), and the
    Composer checkpoint itself under the grown model block that export prints. Both give the training
    run's last eval loss on the same rows."""
    from composer_growth.cli import main

    def edit(config):
        config["algorithms"].pop("context_length_schedule")  # the last eval then sees what eval_from_yaml sees
        config.update(eval_interval="6ba")

    full = _train("mpt_cpu.yaml", foundry_data, tmp_path / "run", tmp_path, edit=edit)
    trained_loss = float(_series(full, "metrics/eval/LanguageCrossEntropy")[-1])
    checkpoint = str(tmp_path / "run" / "checkpoints" / "ep0-ba6-rank0.pt")
    capsys.readouterr()
    assert main(["export", checkpoint, str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    grown = yaml.safe_load(printed.split("# llm-foundry:")[1])["model"]
    assert grown["n_layers"] == 4 and grown["ffn_config"]["ffn_hidden_size"] == 128

    with open(os.path.join(YAMLS, "mpt_cpu.yaml")) as f:
        train_model = {**yaml.safe_load(f)["model"], "max_seq_len": 32}
    tokenizer = {"name": os.path.join(foundry_data, "tokenizer"), "kwargs": {"model_max_length": 32}}
    hf_model = {"name": "hf_causal_lm", "pretrained_model_name_or_path": str(tmp_path / "hf"), "pretrained": True,
                "trust_remote_code": True, "use_auth_token": False}
    models = [{"model_name": "export", "model": hf_model, "tokenizer": tokenizer},
              {"model_name": "checkpoint", "model": {**train_model, **grown}, "tokenizer": tokenizer,
               "load_path": checkpoint}]
    losses = _eval_each(tmp_path, models, foundry_data)
    assert losses == pytest.approx([trained_loss, trained_loss], rel=0, abs=1e-5), (losses, trained_loss)
    # the training YAML's own (pre-growth) model block cannot load it: what the printed block is for
    with pytest.raises(RuntimeError, match="size mismatch"):
        _eval(tmp_path, "eval-small", [{"model_name": "small", "model": dict(train_model), "tokenizer": tokenizer,
                                        "load_path": checkpoint}], foundry_data)
