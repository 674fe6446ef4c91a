"""Functional LoRA ops on real tiny HF models (llama: Linear; gpt2: Conv1D, fan_in_fan_out): merge and
re-init, alpha scaling (rslora too), rank changes by SVD, optimizer-state pruning, embedding adapters,
target resolution and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T
from composer.optim import DecoupledAdamW
from peft.tuners.lora import LoraLayer

from composer_growth.errors import ConfigError
from composer_growth.functional import (add_lora, lora_target_modules, lora_targets, merge_and_reinit_lora, merge_lora,
                                        merged_model, merged_state_dict, param_names, prune_optimizer_state, resize_lora_rank,
                                        scale_lora_alpha, transfer_optimizer_state)

VOCAB = 128
CONFIGS = {
    "llama": lambda: T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                                 tie_word_embeddings=False),
}
EMBED = {"llama": "model.embed_tokens", "gpt2": "transformer.wte"}


def make_model(family: str = "llama", targets="all", rank: int = 4, embedding: bool = True, use_rslora=False,
               seed: int = 0) -> T.PreTrainedModel:
    """A tiny model with adapters on ``targets`` (and the embedding), trained-looking: B nonzero."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager").eval()
    add_lora(model, targets, rank=rank, alpha=2 * rank, use_rslora=use_rslora)
    if embedding:
        add_lora(model, "embedding", rank=rank, alpha=2 * rank, use_rslora=use_rslora)
    with torch.no_grad():  # adapters as if trained: every factor nonzero
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    return model


def ids(seed: int = 1, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(ids()).logits


def adapter_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_reinit_keeps_logits_and_parameter_objects(family):
    model = make_model(family)
    layers = lora_targets(model)
    if family == "gpt2":  # peft wraps Conv1D with fan_in_fan_out (weight is [in, out])
        assert layers["transformer.h.0.attn.c_attn"].fan_in_fan_out
    before_params = {n: p for n, p in model.named_parameters()}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    out = logits(model)
    fresh = merge_and_reinit_lora(model, generator=torch.Generator().manual_seed(3))
    assert (logits(model) - out).abs().max().item() < 1e-5
    assert {n: p for n, p in model.named_parameters()} == before_params  # same objects
    assert {id(p) for p in fresh} == {id(p) for p in adapter_params(model)}
    # every base weight changed (the delta went in); adapters re-initialised as peft does
    assert all(not torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before
               and n.endswith("weight"))
    for name, layer in layers.items():
        if layer.lora_A:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            assert torch.count_nonzero(b) == 0 and a.abs().max() <= 1 / math.sqrt(a.shape[1])
            assert a.abs().max() > 0.5 / math.sqrt(a.shape[1])  # kaiming uniform bound 1/sqrt(fan_in)
        else:
            assert name == EMBED[family]
            assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0
            assert 0.7 < layer.lora_embedding_B["default"].std() < 1.3
    # the same generator seed gives the same adapters (ranks agree); another seed does not
    again = make_model(family)
    merge_and_reinit_lora(again, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(adapter_params(model), adapter_params(again)))
    other = make_model(family)
    merge_and_reinit_lora(other, generator=torch.Generator().manual_seed(4))
    assert not all(torch.equal(p, q) for p, q in zip(adapter_params(model), adapter_params(other)))


def test_merge_only_the_targets():
    model = make_model("llama")
    out = logits(model)
    mlp_b = lora_targets(model, "mlp")["model.layers.0.mlp.up_proj"].lora_B["default"].weight.detach().clone()
    fresh = merge_and_reinit_lora(model, targets="attention")
    assert len(fresh) == 2 * 4 * 2  # q, k, v, o in two layers; A and B each
    assert (logits(model) - out).abs().max().item() < 1e-5
    assert torch.equal(lora_targets(model, "mlp")["model.layers.0.mlp.up_proj"].lora_B["default"].weight, mlp_b)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_after_merge_moves_the_model(family):
    """After a merge, B = 0 but A is not: a step changes the function (the adapters are not dead)."""
    model = make_model(family).train()
    merge_and_reinit_lora(model, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(adapter_params(model), lr=1e-2)
    before = logits(model)
    model(ids(), labels=ids()).loss.backward()
    opt.step()
    assert (logits(model) - before).abs().max().item() > 1e-4


@pytest.mark.parametrize("use_rslora", [False, True])
def test_scale_alpha(use_rslora):
    model = make_model("llama", use_rslora=use_rslora)
    layer = lora_targets(model)["model.layers.0.self_attn.q_proj"]
    assert layer.scaling["default"] == pytest.approx(8 / (2 if use_rslora else 4))
    base = logits(model) - _without_adapters(model)
    assert scale_lora_alpha(model, 3.0, targets="attention") == 8
    assert layer.lora_alpha["default"] == 24 and layer.scaling["default"] == pytest.approx(3 * 8 / (2 if use_rslora else 4))
    assert lora_targets(model)["model.layers.0.mlp.up_proj"].scaling["default"] == pytest.approx(8 / (2 if use_rslora else 4))
    scale_lora_alpha(model, 3.0, targets=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "embed_tokens"])
    # every adapter x3: the adapters' contribution to the logits changed (not the base)
    assert not torch.allclose(logits(model) - _without_adapters(model), base, atol=1e-4)
    with pytest.raises(ConfigError, match="factor"):
        scale_lora_alpha(model, -1.0)
    # 0 turns the adapters off: the base model's logits
    scale_lora_alpha(model, 0.0)
    assert torch.equal(logits(model), _without_adapters(model))
    with pytest.raises(ConfigError, match="scaling 0"):
        resize_lora_rank(model, divisor=2)


@torch.no_grad()
def _without_adapters(model) -> torch.Tensor:
    for layer in lora_targets(model).values():
        layer.enable_adapters(False)
    out = logits(model)
    for layer in lora_targets(model).values():
        layer.enable_adapters(True)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_resize_rank_up_is_exact_down_is_svd(family, use_rslora):
    model = make_model(family, rank=4, use_rslora=use_rslora)
    out = logits(model)
    names_before = param_names(model)
    opt = DecoupledAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    model(ids(), labels=ids()).loss.backward()
    opt.step()
    model.eval()
    out = logits(model)
    layers = lora_targets(model)
    deltas = {n: layer.get_delta_weight("default").clone() for n, layer in layers.items()}
    mapping = resize_lora_rank(model, rank=6, targets="all")
    assert all(layer.r["default"] == 6 for layer in layers.values())
    expect = 8 / (math.sqrt(6) if use_rslora else 6)
    assert all(layer.scaling["default"] == pytest.approx(expect) for layer in layers.values())
    assert (logits(model) - out).abs().max().item() < 1e-4
    # the new A / B are fresh (no mapping entry); everything else maps to itself
    new_names = {n for n, _ in model.named_parameters()}
    assert set(mapping) == {n for n in new_names if "lora_" not in n}
    assert all(src.source == n and src.is_identity for n, src in mapping.items())
    new_opt = transfer_optimizer_state(opt, names_before, model, mapping)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for g in new_opt.param_groups for p in g["params"]} == {id(p) for p in trainable}
    assert all(p not in new_opt.state for n, p in model.named_parameters() if "lora_" in n)
    # down to rank 1 (attention only): the best rank-1 approximation of each delta
    resize_lora_rank(model, divisor=6, targets="attention")
    for name, layer in lora_targets(model, "attention").items():
        assert layer.r["default"] == 1
        s = torch.linalg.svdvals(deltas[name].float())
        err = (layer.get_delta_weight("default") - deltas[name]).norm()
        assert err.item() == pytest.approx(s[1:].norm().item(), rel=1e-3)
    assert all(layer.r["default"] == 6 for layer in lora_targets(model, "mlp").values())
    new_opt.step()  # the rebuilt optimizer steps with the new shapes


def test_resize_a_fresh_adapter_keeps_it_trainable():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="eager")
    add_lora(model, "attention", rank=4)
    out = logits(model)
    resize_lora_rank(model, rank=2)
    layer = lora_targets(model)["model.layers.0.self_attn.q_proj"]
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    assert torch.equal(logits(model), out)


@pytest.mark.parametrize("mode", ["reset", "random", "magnitude"])
def test_prune_optimizer_state(mode):
    model = make_model("llama", embedding=False).train()
    opt = DecoupledAdamW(adapter_params(model), lr=1e-3)
    for _ in range(2):
        model(ids(), labels=ids()).loss.backward()
        opt.step()
    pruned = adapter_params(model)[:4]
    kept = adapter_params(model)[4]
    kept_state = opt.state[kept]["exp_avg"].clone()
    before = {id(p): {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in pruned}
    n = prune_optimizer_state(opt, pruned, mode=mode, ratio=0.75, generator=torch.Generator().manual_seed(0))
    total = sum(2 * p.numel() for p in pruned)
    for p in pruned:
        m, v = opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]
        # one mask for both moments: no entry keeps m != 0 with v == 0 (m / eps after the merge)
        assert not ((m != 0) & (v == 0)).any()
        assert torch.equal(m == 0, v == 0)
        for key in ("exp_avg", "exp_avg_sq"):
            t, old = opt.state[p][key], before[id(p)][key]
            zero = t == 0
            if mode == "reset":
                assert zero.all()
            else:
                share = zero.float().mean().item()
                assert 0.6 < share < 0.9 if mode == "random" else share == pytest.approx(0.75, abs=1 / t.numel())
                assert torch.equal(t[~zero], old[~zero])  # the rest untouched
        if mode == "magnitude":  # the zeroed entries are those with the smallest first moments
            old_m, zero = before[id(p)]["exp_avg"], m == 0
            assert old_m[zero].abs().max() <= old_m[~zero].abs().min()
        assert int(opt.state[p]["step"]) == 2
    assert n == total if mode == "reset" else 0.6 * total < n < 0.9 * total
    assert torch.equal(opt.state[kept]["exp_avg"], kept_state)
    opt.step()
    with pytest.raises(ConfigError, match="ratio"):
        prune_optimizer_state(opt, pruned, mode="magnitude", ratio=1.0)
    with pytest.raises(ConfigError, match="mode"):
        prune_optimizer_state(opt, pruned, mode="half")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_embedding_adapters_and_merged_export(family, tmp_path):
    model = make_model(family, targets="mlp")
    layer = lora_targets(model, "embedding")[EMBED[family]]
    assert isinstance(layer, LoraLayer) and "default" in layer.lora_embedding_A
    out = logits(model)
    plain = merged_model(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert len(lora_targets(model)) > 0  # the model itself still has its adapters
    plain.save_pretrained(tmp_path / "copy")
    model.save_pretrained(tmp_path / "sd", state_dict=merged_state_dict(model))  # no copy of the model
    for folder in ("copy", "sd"):
        reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / folder, attn_implementation="eager").eval()
        assert (logits(reloaded) - out).abs().max().item() < 1e-5
    assert merge_lora(model) == len(lora_targets(make_model(family, targets="mlp")))
    assert (logits(model) - out).abs().max().item() < 1e-5


def test_targets_resolve_by_family_and_name():
    model = make_model("gpt2", targets="attention", embedding=False)
    assert list(lora_targets(model, "attention")) == [f"transformer.h.{i}.attn.{m}" for i in (0, 1)
                                                      for m in ("c_attn", "c_proj")]
    assert list(lora_targets(model, ["c_attn"])) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert lora_target_modules(model, "mlp") == [f"transformer.h.{i}.mlp.{m}" for i in (0, 1)
                                                 for m in ("c_fc", "c_proj")]
    with pytest.raises(ConfigError, match=r"targets='mlp'.*gpt2.*transformer.h.0.attn.c_attn"):
        lora_targets(model, "mlp")
    with pytest.raises(ConfigError, match=r"targets='q_proj'.*gpt2"):
        lora_targets(model, ["q_proj"])
    with pytest.raises(ConfigError, match="targets='vocab'"):
        lora_targets(model, "vocab")
    plain = T.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    with pytest.raises(ConfigError, match="llama model has no LoRA adapters"):
        merge_and_reinit_lora(plain)
    tied = T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ConfigError, match="tied to the output head"):
        add_lora(tied, "embedding")
    with pytest.raises(ConfigError, match="rank"):
        resize_lora_rank(model, rank=0)
    with pytest.raises(ConfigError, match="rank"):
        resize_lora_rank(model, rank=2, divisor=2)
    with pytest.raises(ConfigError, match="rank=99"):
        resize_lora_rank(model, rank=99)


def test_merged_state_dict_writes_the_trained_modules_to_save_copy(tmp_path):
    """peft's modules_to_save trains a copy of the module: the export writes that copy under the plain name
    (and drops the frozen original), so the reloaded model gives the trained model's logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = T.AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="eager").eval()
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    hf = peft.get_base_model()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.3)
    sd = merged_state_dict(hf)
    assert "lm_head.weight" in sd and not any("original_module" in k or "modules_to_save" in k for k in sd)
    hf.save_pretrained(tmp_path, state_dict=sd)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(reloaded(ids()).logits, logits(hf), atol=1e-5)
