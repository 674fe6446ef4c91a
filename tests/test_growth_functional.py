"""Functional growth ops on real tiny HF models: function preservation, config / cache bookkeeping,
save / reload, optimizer-state transfer by mapping, and argument errors."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from composer.optim import DecoupledAdamW

from composer_growth.errors import ConfigError
from composer_growth.families import family_of
from composer_growth.functional.growth import ParamSource, param_names, stack_layers, widen_mlp
from composer_growth.functional.optim import transfer_optimizer_state

VOCAB = 128
CONFIGS = {
    "llama": lambda: T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
    # one full and one sliding-window layer, to exercise config.layer_types
    "qwen2": lambda: T.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                   use_sliding_window=True, sliding_window=32, max_window_layers=1),
    "mistral": lambda: T.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
    "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64),
    "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
}
FAMILIES = list(CONFIGS)
STACKS = {  # mode -> kwargs; all grow 2 layers to 4
    "repeat": {},
    "explicit": {"source_layers": [0, 0, 1, 1]},
    "append": {"num_new": 2},
    "prepend": {"num_new": 2},
}
LAYERS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gpt2": "transformer.h",
          "gpt_neox": "gpt_neox.layers"}


def make_model(family: str = "llama", seed: int = 0) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="eager").eval()


def ids(seed: int = 1, length: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids=None) -> torch.Tensor:
    return model(ids() if input_ids is None else input_ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def attention_layer_idx(block) -> list[int]:
    return [m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")]


# ------------------------------------------------------------------------------------------ depth


@pytest.mark.parametrize("mode", list(STACKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_function_preserving_stack_keeps_logits(family, mode):
    model = make_model(family)
    before = logits(model)
    stack_layers(model, mode=mode, init="function_preserving", **STACKS[mode])
    assert model.config.num_hidden_layers == 4
    assert max_diff(logits(model), before) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_stack_updates_layer_idx_and_kv_cache_decoding_matches(family):
    model = make_model(family)
    stack_layers(model, mode="explicit", source_layers=[1, 0, 0, 1, 1], init="copy")
    blocks = model.get_submodule(LAYERS[family])
    assert len(blocks) == 5 and model.config.num_hidden_layers == 5
    for i, block in enumerate(blocks):
        assert attention_layer_idx(block) and set(attention_layer_idx(block)) == {i}
    x = ids(length=9)
    with torch.no_grad():
        full = model(x).logits[:, -1]
        prefix = model(x[:, :-1], use_cache=True)
        step = model(x[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    assert max_diff(full, step) <= 1e-5


def test_stack_rebuilds_layer_types_by_source():
    model = make_model("qwen2")
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    stack_layers(model, mode="explicit", source_layers=[1, 0, 1])
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [b.attention_type for b in model.model.layers] == model.config.layer_types


def test_copy_stack_changes_logits_and_copies_weights():
    model = make_model()
    before = logits(model)
    stack_layers(model, mode="repeat", times=3, init="copy")
    layers = model.model.layers
    assert len(layers) == 6
    assert torch.equal(layers[3].mlp.up_proj.weight, layers[1].mlp.up_proj.weight)
    assert layers[3].mlp.up_proj.weight is not layers[1].mlp.up_proj.weight
    assert max_diff(logits(model), before) > 1e-3


def test_random_stack_is_seeded_and_leaves_global_rng_alone():
    grown = []
    for seed in (3, 3, 4):
        model = make_model()
        rng = torch.get_rng_state()
        mapping = stack_layers(model, mode="append", num_new=1, init="random", seed=seed)
        assert torch.equal(torch.get_rng_state(), rng)
        assert not any(name.startswith("model.layers.2.") for name in mapping)  # fresh: no source
        assert mapping["model.layers.1.mlp.up_proj.weight"].source == "model.layers.1.mlp.up_proj.weight"
        grown.append(model.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(grown[0], grown[1]) and not torch.equal(grown[0], grown[2])
    assert not torch.equal(grown[0], make_model().model.layers[1].mlp.up_proj.weight)


def test_stack_mapping_names_follow_moved_layers():
    model = make_model()
    old = dict(model.named_parameters())
    originals = [block for block in model.model.layers]
    mapping = stack_layers(model, mode="prepend", num_new=1, init="function_preserving")
    assert set(mapping) == set(dict(model.named_parameters()))
    assert model.model.layers[1] is originals[0] and model.model.layers[2] is originals[1]
    new_o = mapping["model.layers.0.self_attn.o_proj.weight"]
    assert (new_o.source, new_o.scale) == ("model.layers.0.self_attn.o_proj.weight", 0.0)
    assert mapping["model.layers.0.mlp.up_proj.weight"].scale == 1.0
    assert mapping["model.layers.2.mlp.up_proj.weight"].source == "model.layers.1.mlp.up_proj.weight"
    assert mapping["model.embed_tokens.weight"].is_identity
    for name, p in model.named_parameters():
        src = mapping[name]
        assert torch.equal(p, src.apply(old[src.source]))


def test_stack_wrapped_model_uses_wrapper_names():
    from composer.models import HuggingFaceModel

    wrapped = HuggingFaceModel(make_model(), tokenizer=None, use_logits=True)
    names = param_names(wrapped)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-3)
    mapping = stack_layers(wrapped, mode="repeat")
    assert "model.model.layers.3.mlp.up_proj.weight" in mapping
    assert mapping["model.model.layers.3.mlp.up_proj.weight"].source == "model.model.layers.1.mlp.up_proj.weight"
    new = transfer_optimizer_state(opt, names, wrapped, mapping)
    assert len(new.param_groups[0]["params"]) == len(list(wrapped.parameters()))


# ------------------------------------------------------------------------------------------ width


@pytest.mark.parametrize("family", FAMILIES)
def test_widen_mlp_keeps_logits_and_sets_config(family):
    model = make_model(family)
    size = family_of(model).intermediate_size(model.config)  # gpt2: n_inner unset, 4 x 32
    before = logits(model)
    mapping = widen_mlp(model, 1.5, seed=5)
    assert getattr(model.config, family_of(model).intermediate_key) == round(1.5 * size)
    assert max_diff(logits(model), before) <= 1e-5
    assert set(mapping) == {name for name, _ in model.named_parameters()}
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    widened = [n for n, src in mapping.items() if src.index is not None]
    assert widened and all(round(1.5 * size) in model.get_parameter(n).shape for n in widened)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_widen_mlp_keeps_lora_adapters_on_the_mlp_and_their_moments(family):
    """A peft model with adapters on every MLP projection: the wrappers stay, the adapters are widened
    along the units with the base (the function is kept), they still train, and Adam's moments follow."""
    from peft import LoraConfig, get_peft_model

    targets = ["gate_proj", "up_proj", "down_proj", "q_proj"] if family == "llama" else ["c_fc", "mlp.c_proj", "c_attn"]
    model = get_peft_model(make_model(family), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          fan_in_fan_out=family == "gpt2")).eval()
    opt = DecoupledAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # trained adapters (B != 0) and moments to carry
        opt.zero_grad()
        model(input_ids=ids(), labels=ids()).loss.backward()
        opt.step()
    names = param_names(model)
    before = logits(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    mapping = widen_mlp(model, 1.5, seed=3)
    assert max_diff(logits(model), before) <= 1e-5
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # same names, still training
    widened = {n: src for n, src in mapping.items() if "lora_" in n and src.index is not None}
    assert widened and all(("lora_B" in n) == (src.dim == 0) for n, src in widened.items())
    old_state = {names[p]: opt.state[p]["exp_avg"].clone() for p in opt.state}
    new_opt = transfer_optimizer_state(opt, names, model, mapping)
    for name, src in widened.items():
        p = model.get_parameter(name)
        assert torch.equal(new_opt.state[p]["exp_avg"], src.apply(old_state[src.source]))
    model(input_ids=ids(), labels=ids()).loss.backward()  # gradients reach the widened adapters
    assert all(model.get_parameter(n).grad is not None for n in widened)


def test_widen_mlp_mapping_rebuilds_the_new_parameters():
    model = make_model("gpt2")
    old = {name: p.detach().clone() for name, p in model.named_parameters()}
    mapping = widen_mlp(model, 1.25, seed=2)
    for name, p in model.named_parameters():
        assert torch.equal(p, mapping[name].apply(old[mapping[name].source]))
    fc, proj = mapping["transformer.h.0.mlp.c_fc.weight"], mapping["transformer.h.0.mlp.c_proj.weight"]
    assert (fc.dim, proj.dim) == (1, 0)  # Conv1D: weight is [in, out]
    assert torch.equal(fc.index, proj.index) and torch.equal(fc.index[:128], torch.arange(128))
    counts = torch.bincount(proj.index)
    assert torch.allclose(proj.scale, 1.0 / counts[proj.index].float())
    assert mapping["transformer.h.0.mlp.c_proj.bias"].is_identity


def test_widen_mlp_same_seed_same_result_and_noise_changes_slightly():
    a, b, c = make_model(), make_model(), make_model()
    before = logits(a)
    map_a, map_b = widen_mlp(a, 2.0, seed=7), widen_mlp(b, 2.0, seed=7)
    map_c = widen_mlp(c, 2.0, seed=8)
    key = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(map_a[key].index, map_b[key].index) and not torch.equal(map_a[key].index, map_c[key].index)
    assert torch.equal(a.model.layers[1].mlp.gate_proj.weight, b.model.layers[1].mlp.gate_proj.weight)

    noisy = make_model()
    map_n = widen_mlp(noisy, 2.0, noise_std=1e-3, seed=7)
    assert torch.equal(map_n[key].index, map_a[key].index)  # the noise has its own stream
    up_a, up_n = a.model.layers[0].mlp.up_proj.weight, noisy.model.layers[0].mlp.up_proj.weight
    assert torch.equal(up_a[:64], up_n[:64]) and not torch.equal(up_a[64:], up_n[64:])
    diff = max_diff(logits(noisy), before)
    assert 1e-7 < diff < 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_grown_model_saves_and_reloads(family, tmp_path):
    model = make_model(family)
    stack_layers(model, mode="explicit", source_layers=[0, 1, 1], init="copy")
    widen_mlp(model, 1.5)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.num_hidden_layers == 3
    assert max_diff(logits(reloaded), expected) <= 1e-6


# -------------------------------------------------------------------------------------- optimizer


def batch_loss(model, x):
    return model(x, labels=x).loss


def trained(model, optimizer, steps: int = 2):
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        batch_loss(model, ids(seed=11)).backward()
        optimizer.step()
    return model.eval()


def two_groups(model, cls=torch.optim.AdamW, **kw):
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    return cls([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], **kw)


def check_step_lowers_loss(model, optimizer):
    x = ids(seed=11)
    with torch.no_grad():
        start = batch_loss(model.eval(), x).item()
    trained(model, optimizer, steps=1)
    with torch.no_grad():
        assert batch_loss(model, x).item() < start


def test_transfer_after_stack_copies_state_by_name():
    model = make_model()
    opt = two_groups(model, lr=1e-2, betas=(0.8, 0.9))
    trained(model, opt)
    names = param_names(model)
    old_state = {names[p]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    mapping = stack_layers(model, mode="repeat", init="function_preserving")
    new = transfer_optimizer_state(opt, names, model, mapping)

    assert type(new) is torch.optim.AdamW and new is not opt
    for old_g, new_g in zip(opt.param_groups, new.param_groups):
        assert {k: v for k, v in old_g.items() if k != "params"} == {k: v for k, v in new_g.items() if k != "params"}
    layers = model.model.layers
    assert len(new.param_groups[0]["params"]) + len(new.param_groups[1]["params"]) == len(list(model.parameters()))
    assert any(p is layers[2].input_layernorm.weight for p in new.param_groups[1]["params"])
    up = new.state[layers[2].mlp.up_proj.weight]
    src = old_state["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(up["exp_avg"], src["exp_avg"]) and torch.equal(up["exp_avg_sq"], src["exp_avg_sq"])
    assert float(up["step"]) == float(src["step"]) == 2.0
    zeroed = new.state[layers[3].self_attn.o_proj.weight]
    assert not zeroed["exp_avg"].any() and not zeroed["exp_avg_sq"].any()
    kept = new.state[layers[0].mlp.up_proj.weight]  # same parameter object, state carried over
    assert torch.equal(kept["exp_avg"], src["exp_avg"])
    # a surviving parameter's state is moved, not copied; a duplicate gets tensors of its own
    assert kept["exp_avg"] is opt.state[layers[0].mlp.up_proj.weight]["exp_avg"]
    assert up["exp_avg"].data_ptr() != kept["exp_avg"].data_ptr()
    check_step_lowers_loss(model, new)


def test_transfer_after_widen_scales_moments():
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trained(model, opt)
    names = param_names(model)
    old_state = {names[p]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    mapping = widen_mlp(model, 1.5, seed=3)
    new = transfer_optimizer_state(opt, names, model, mapping)

    mlp = model.model.layers[1].mlp
    index = mapping["model.layers.1.mlp.down_proj.weight"].index
    count = torch.bincount(index)[index].float()
    down, down_src = new.state[mlp.down_proj.weight], old_state["model.layers.1.mlp.down_proj.weight"]
    torch.testing.assert_close(down["exp_avg"], down_src["exp_avg"][:, index] / count)
    torch.testing.assert_close(down["exp_avg_sq"], down_src["exp_avg_sq"][:, index] / count**2)
    up, up_src = new.state[mlp.up_proj.weight], old_state["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(up["exp_avg"], up_src["exp_avg"][index]) and float(up["step"]) == 2.0
    assert new.state[model.model.norm.weight]["exp_avg"].shape == (32,)
    check_step_lowers_loss(model, new)


@pytest.mark.parametrize("cls,kw,key", [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}, "momentum_buffer"),
    (DecoupledAdamW, {"lr": 1e-2, "weight_decay": 1e-5}, "exp_avg"),
])
def test_transfer_other_optimizers(cls, kw, key):
    model = make_model("gpt2")
    opt = two_groups(model, cls, **kw)
    trained(model, opt)
    names = param_names(model)
    old = {names[p]: s[key].clone() for p, s in opt.state.items()}
    mapping = stack_layers(model, mode="append", num_new=1, init="copy")
    new = transfer_optimizer_state(opt, names, model, mapping)
    assert type(new) is cls and new.defaults == opt.defaults
    assert [g["lr"] for g in new.param_groups] == [g["lr"] for g in opt.param_groups]
    assert torch.equal(new.state[model.transformer.h[2].mlp.c_fc.weight][key], old["transformer.h.1.mlp.c_fc.weight"])

    names = param_names(model)
    mapping = widen_mlp(model, 1.5)
    newer = transfer_optimizer_state(new, names, model, mapping)
    fc = model.transformer.h[2].mlp.c_fc
    index = mapping["transformer.h.2.mlp.c_fc.weight"].index
    assert torch.equal(newer.state[fc.weight][key], old["transformer.h.1.mlp.c_fc.weight"][:, index])
    check_step_lowers_loss(model, newer)


def test_transfer_random_layers_start_fresh_in_matching_group():
    model = make_model()
    opt = two_groups(model, lr=1e-2)
    trained(model, opt)
    names = param_names(model)
    mapping = stack_layers(model, mode="append", num_new=1, init="random", seed=1)
    new = transfer_optimizer_state(opt, names, model, mapping)
    fresh = model.model.layers[2]
    assert fresh.mlp.up_proj.weight not in new.state and fresh.input_layernorm.weight not in new.state
    assert any(p is fresh.mlp.up_proj.weight for p in new.param_groups[0]["params"])
    assert any(p is fresh.input_layernorm.weight for p in new.param_groups[1]["params"])
    check_step_lowers_loss(model, new)


def test_param_source_apply():
    old = torch.arange(6.0).reshape(2, 3)
    src = ParamSource("w", torch.tensor([0, 2, 2]), dim=1, scale=torch.tensor([1.0, 0.5, 0.5]))
    assert torch.equal(src.apply(old), torch.tensor([[0.0, 1.0, 1.0], [3.0, 2.5, 2.5]]))
    assert torch.equal(src.apply(old, power=2), torch.tensor([[0.0, 0.5, 0.5], [3.0, 1.25, 1.25]]))
    assert not ParamSource("w", scale=0.0).apply(old).any()
    copy = ParamSource("w").apply(old)
    assert torch.equal(copy, old) and copy.data_ptr() != old.data_ptr()


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("op,kwargs,key", [
    (stack_layers, {"times": 1}, "times"),
    (stack_layers, {"times": 2.0}, "times"),
    (stack_layers, {"mode": "sideways"}, "mode"),
    (stack_layers, {"init": "zeros"}, "init"),
    (stack_layers, {"mode": "explicit", "source_layers": []}, "source_layers"),
    (stack_layers, {"mode": "explicit", "source_layers": [0, 2]}, "source_layers"),
    (stack_layers, {"mode": "explicit"}, "source_layers"),
    (stack_layers, {"mode": "repeat", "source_layers": [0, 1]}, "source_layers"),
    (stack_layers, {"mode": "append"}, "num_new"),
    (stack_layers, {"mode": "prepend", "num_new": 0}, "num_new"),
    (stack_layers, {"mode": "repeat", "num_new": 1}, "num_new"),
    (widen_mlp, {"factor": 1.0}, "factor"),
    (widen_mlp, {"factor": 0.5}, "factor"),
    (widen_mlp, {"factor": 1.001}, "factor"),
    (widen_mlp, {"factor": True}, "factor"),
    (widen_mlp, {"factor": 2, "noise_std": -0.1}, "noise_std"),
])
def test_bad_arguments_raise_config_error(op, kwargs, key):
    model = make_model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError) as err:
        op(model, **kwargs)
    assert err.value.key == key and str(err.value).startswith(f"{key}=")
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in before.items()}
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 64


def test_unknown_mode_lists_allowed_and_unknown_family_raises():
    with pytest.raises(ConfigError, match="repeat, explicit, append, prepend"):
        stack_layers(make_model(), mode="sideways")
    opt_config = T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=VOCAB, word_embed_proj_dim=32, max_position_embeddings=64)
    model = T.OPTForCausalLM(opt_config)
    for op, kwargs in ((stack_layers, {}), (widen_mlp, {"factor": 2})):
        with pytest.raises(ConfigError, match="model.family='opt'"):
            op(model, **kwargs)
