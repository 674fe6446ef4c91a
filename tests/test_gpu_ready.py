"""What a first CUDA bf16 multi-GPU run needs, checked where it can be on the CPU: each test runs on
``cuda`` with ``amp_bf16`` where a GPU is present (the ``accel`` fixture), on the CPU otherwise."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import transformers as T

from composer_growth.functional import add_lora, merge_and_reinit_lora, merged_state_dict, widen_mlp

VOCAB = 128


def bf16_llama(device: str, seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(device, torch.bfloat16).eval()


# -- bf16 bases: deltas and scales in float32, rounded once ---------------------------------------
def test_relora_merge_into_bf16_base_rounds_once(accel):
    model = bf16_llama(accel.torch_device)
    add_lora(model, ["q_proj"], rank=4, alpha=4)
    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        b.normal_(0, 1e-3)  # a small delta, as early in a ReLoRA cycle
    base = layer.get_base_layer().weight
    delta = b.float() @ a.float() * layer.scaling["default"]
    expected = (base.float() + delta).to(torch.bfloat16)
    old_path = base + layer.get_delta_weight("default").to(torch.bfloat16)  # in the base's dtype
    assert not torch.equal(old_path, expected)  # the check below can tell the two apart

    merged = merged_state_dict(model)  # the export path
    assert merged["model.layers.0.self_attn.q_proj.weight"].device.type == "cpu"
    on_cpu = (base.float().cpu() + b.float().cpu() @ a.float().cpu() * layer.scaling["default"]).to(torch.bfloat16)
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], on_cpu, atol=0, rtol=0)
    merge_and_reinit_lora(model, ["q_proj"], generator=torch.Generator().manual_seed(0))  # ReLoRA's in-place merge
    assert base.dtype == torch.bfloat16
    torch.testing.assert_close(base, expected, atol=0, rtol=0)


def test_widen_mlp_scales_bf16_weights_in_float32(accel):
    model = bf16_llama(accel.torch_device)
    old = [blk.mlp.down_proj.weight.detach().clone() for blk in model.model.layers]
    mapping = widen_mlp(model, factor=1.5, seed=3)
    differs = False
    for i, blk in enumerate(model.model.layers):
        src = mapping[f"model.layers.{i}.mlp.down_proj.weight"]
        picked = old[i].index_select(1, src.index.to(old[i].device))
        scale = src.scale.to(picked.device)
        expected = (picked.float() * scale).to(torch.bfloat16)
        torch.testing.assert_close(blk.mlp.down_proj.weight.detach(), expected, atol=0, rtol=0)
        differs |= not torch.equal(picked * scale.to(torch.bfloat16), expected)  # the scale rounded to bf16 first
    assert differs


# -- flash_attention_2 falls back to sdpa at validation -------------------------------------------
def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_flash_attention_falls_back_to_sdpa_at_validation(tiny_recipe, accel, capsys, one_thread, precision):
    from composer_growth.recipe import run, validate

    recipe = accel.recipe(tiny_recipe)
    recipe.update(precision=precision, max_duration="1ba", eval_first=False, save_folder=None)
    recipe["model"] = {**recipe["model"], "attn_implementation": "flash_attention_2"}
    plan = validate(recipe)
    line = capsys.readouterr().out
    reasons = [r for r, applies in [("flash-attn is not importable", not _has_flash_attn()),
                                    ("no CUDA device", not accel.cuda),
                                    ("precision is fp32", precision == "fp32")] if applies]
    if not reasons:
        pytest.skip("flash-attn runs here: nothing to fall back from")
    assert plan.recipe.model.attn_implementation == "sdpa"
    assert line.count("\n") == 1 and "flash_attention_2 -> sdpa" in line and all(r in line for r in reasons), line
    if precision != "fp32" and not accel.cuda:
        return  # Composer runs amp_bf16 on CUDA only
    trainer = run(plan)  # the first forward runs
    assert trainer.state.model.model.config._attn_implementation == "sdpa"


# -- a context phase's microbatch size is set once, at the phase change ----------------------------
class HalveMicrobatch:
    """Lowers the microbatch size after the given batches, as Composer's auto microbatching does after an
    OOM (``state.device_train_microbatch_size = max(1, size // 2)``), and records each batch's size."""

    def __new__(cls, after: tuple[int, ...]):
        from composer.core import Callback

        class _Halve(Callback):
            def __init__(self):
                self.sizes: list[int] = []

            def batch_start(self, state, logger):
                self.sizes.append(state.device_train_microbatch_size)

            def batch_end(self, state, logger):
                if int(state.timestamp.batch) in after:
                    state.device_train_microbatch_size = max(1, state.device_train_microbatch_size // 2)

        return _Halve()


def test_context_phase_microbatch_is_set_once_per_phase(tiny_recipe, accel, one_thread):
    from composer_growth.recipe import run, validate

    recipe = accel.recipe(tiny_recipe)
    recipe.update(eval_first=False, save_folder=None, eval_interval="8ba")
    recipe["algorithms"] = {"context_length_schedule": {"verbose": False, "eval_batches": 1, "phases": [
        {"name": "short", "seq_length": 16, "duration": "0.5dur", "microbatch_size": 4},
        {"name": "full", "seq_length": 32, "duration": "0.5dur", "microbatch_size": 8}]}}
    plan = validate(recipe)
    halve = HalveMicrobatch(after=(2, 6))
    plan.callbacks.append(halve)
    run(plan)
    # halved after batches 2 and 6 (the run's OOM search) and kept; each phase's own size at its start
    assert halve.sizes == [4, 4, 2, 2, 8, 8, 4, 4]


# -- the warmup's memory pre-allocation ---------------------------------------------------------------
def warmup_recipe(recipe: dict, **warmup) -> dict:
    recipe.update(eval_first=False, save_folder=None, eval_interval="8ba", max_duration="4ba")
    recipe["algorithms"] = {"seq_length_warmup": {"min_seq_length": 8, "max_seq_length": 32, "step_size": 8,
                                                  "duration": "0.5dur", **warmup}}
    return recipe


def test_preallocation_catches_cuda_oom_raised_as_runtime_error(tiny_recipe, accel, one_thread):
    """A CUDA OOM can come as a plain RuntimeError (Composer's ``_is_cuda_oom`` looks at the text); the
    pass is skipped, and the activations its traceback held are released before the cache is emptied."""
    import weakref

    from composer.core import Callback

    from composer_growth.recipe import run, validate

    plan = validate(warmup_recipe(accel.recipe(tiny_recipe)))
    warmup = plan.algorithms[0]
    seen = []

    class OutOfMemoryOnce(Callback):
        def fit_start(self, state, logger):
            def hook(module, args, kwargs):
                hidden = kwargs["input_ids"]
                if hidden.shape[-1] == 32 and not seen:
                    activation = module.model.embed_tokens(hidden)  # held by the traceback's frame
                    seen.append(weakref.ref(activation))
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")

            state.model.model.register_forward_pre_hook(hook, with_kwargs=True)

    plan.callbacks.append(OutOfMemoryOnce())
    with pytest.warns(UserWarning, match=r"pre-allocation at 32 tokens x 4 rows ran out of memory and was skipped"):
        trainer = run(plan)
    assert warmup.preallocation == "oom" and int(trainer.state.timestamp.batch) == 4
    assert len(seen) == 1 and seen[0]() is None


def test_preallocation_is_skipped_with_auto_microbatching(tiny_recipe, accel, capsys, one_thread):
    if not accel.cuda:
        pytest.skip("Composer's auto microbatching runs on CUDA only")
    from composer_growth.recipe import run, validate

    recipe = warmup_recipe(accel.recipe(tiny_recipe))
    recipe["device_train_microbatch_size"] = "auto"
    plan = validate(recipe)
    run(plan)
    assert plan.algorithms[0].preallocation == "auto"
    assert "preallocate skipped: device_train_microbatch_size is auto" in capsys.readouterr().out


@pytest.mark.launcher
def test_preallocation_oom_on_one_rank_is_shared(tiny_recipe, tmp_path):
    """Under DDP rank 1 alone runs out of memory in the pass: every rank reports the pass as skipped and
    the run trains on."""
    import json

    import yaml

    from conftest import launch, launch_failure

    recipe = warmup_recipe(tiny_recipe)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    script = os.path.join(os.path.dirname(__file__), "scripts", "gpu_ready.py")
    proc = launch(script, [str(tmp_path / "r.yaml"), str(tmp_path / "o{rank}.json"), "oom_on_rank1"], tmp_path,
                  own_shm=True)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    results = [json.loads((tmp_path / f"o{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [{"preallocation": "oom", "batches": 4}] * 2


# -- rank-0 work that outlasts dist_timeout ---------------------------------------------------------
@pytest.mark.launcher
def test_dataset_build_may_outlast_dist_timeout(tiny_recipe, tiny_data, tmp_path):
    """Rank 0 builds the dataset for three times the run's dist_timeout; the other rank waits through the
    job's store (no collective in flight), and both then meet in a collective."""
    import json

    import yaml

    from conftest import launch, launch_failure

    recipe = dict(tiny_recipe, dist_timeout=4.0)
    recipe["data"] = {"path": str(tmp_path / "built"),
                      "prepare": {"source": "python-source", "seq_len": 32, "vocab_size": 512}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    script = os.path.join(os.path.dirname(__file__), "scripts", "gpu_ready.py")
    proc = launch(script, [str(tmp_path / "r.yaml"), str(tmp_path / "o{rank}.json"), "slow_build", tiny_data],
                  tmp_path)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    assert [json.loads((tmp_path / f"o{rank}.json").read_text()) for rank in (0, 1)] == [{"built": True, "sum": 2.0}] * 2


# -- torch.compile ------------------------------------------------------------------------------------
def test_compiled_warmup_stays_within_the_recompile_limit(tiny_recipe, accel, capsys, one_thread):
    """With ``dynamic=False`` every warmup length is a recompile: the limit is raised at FIT_START to the
    shapes the run trains (past it dynamo would run eagerly; here that is made a hard failure), and the
    graphs are reset when the warmup ends so the full length compiles statically."""
    import torch._dynamo

    from composer_growth.recipe import run, validate

    recipe = warmup_recipe(accel.recipe(tiny_recipe))
    recipe["compile"] = {"backend": "eager", "dynamic": False}
    recipe["max_duration"] = "6ba"
    plan = validate(recipe)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        run(plan)
        limit = torch._dynamo.config.recompile_limit
    torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "seq_length_warmup: torch._dynamo recompile_limit 2 -> 6" in out and limit == 6, out
    assert "torch.compile: graphs reset (seq_length_warmup over at 32 tokens)" in out


# -- a frozen or LoRA trunk leaves the optimizer --------------------------------------------------------
@pytest.mark.parametrize("trunk", ["frozen", "lora"])
def test_frozen_trunk_drops_its_optimizer_state_and_resumes_exactly(tiny_recipe, accel, tmp_path, one_thread, trunk):
    from composer_growth.recipe import run, validate
    from conftest import read_summary, resume_from

    recipe = accel.recipe(tiny_recipe)
    recipe["algorithms"] = {"stack_layers": {"at": "4ba", "mode": "append", "num_new": 1, "init": "random",
                                             "trunk": trunk, "lora_rank": 4}}
    recipe.update(max_duration="8ba", save_interval="2ba", eval_first=False)
    trainer = run(validate(copy.deepcopy(recipe)))
    opt = trainer.state.optimizers[0]
    held = [p for g in opt.param_groups for p in g["params"]]
    frozen = [p for p in trainer.state.model.parameters() if not p.requires_grad]
    assert frozen and held
    assert not {id(p) for p in frozen} & {id(p) for p in held}  # no frozen parameter in a group
    assert not {id(p) for p in frozen} & {id(p) for p in opt.state}  # nor its Adam moments
    assert all(p.requires_grad for p in held)

    _, after = resume_from(recipe, "ep0-ba6-rank0.pt", tmp_path)  # grown, then resumed
    assert after["train_loss"] == pytest.approx(read_summary(recipe["summary_file"])["train_loss"],
                                                rel=1e-5 if not accel.cuda else accel.rtol)


@pytest.mark.launcher
def test_growth_under_ddp_keeps_the_compile_options(tiny_recipe, tmp_path):
    """The DDP wrapper rebuilt after a growth is compiled with the Trainer's compile context (backend,
    ``dynamic``, mode: the user's ``compile_config``), not with torch.compile's defaults."""
    import json

    import yaml

    from conftest import launch, launch_failure

    recipe = dict(tiny_recipe, compile={"backend": "eager", "dynamic": False}, max_duration="4ba",
                  eval_first=False, save_folder=None, eval_interval="4ba")
    recipe["algorithms"] = {"stack_layers": {"at": "2ba", "mode": "repeat", "times": 2, "init": "function_preserving"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    script = os.path.join(os.path.dirname(__file__), "scripts", "gpu_ready.py")
    proc = launch(script, [str(tmp_path / "r.yaml"), str(tmp_path / "o{rank}.json"), "compile_growth"], tmp_path,
                  own_shm=True)
    assert proc.returncode == 0, launch_failure(proc, tmp_path)
    results = [json.loads((tmp_path / f"o{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [{"ddp": True, "compiled": True, "same_options": True, "layers": 4}] * 2
