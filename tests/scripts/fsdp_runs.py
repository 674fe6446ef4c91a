"""Under ``composer -n 2``: one recipe trained several ways, per rank a JSON of what each run did.

    fsdp_runs.py RECIPE OUT RUN [RUN ...]

RUN: ``ddp``, ``sharded`` or ``full`` (FSDP2 with that checkpoint type), ``gathered`` (FSDP2, sharded
checkpoints, growth on gathered tensors: ``COMPOSER_GROWTH_FSDP_PATH=gathered``), or ``sharded@CKPT`` /
``full@CKPT``: that run restarted from its checkpoint CKPT (autoresume from a folder holding only it);
``sharded@CKPT~NEWER``: the same with the newer checkpoint NEWER beside it, rank 1's shard file of it cut
to half its size (the restart must fall back to CKPT).
Each run saves (and exports, for algorithms with an ``export_folder``) under ``<OUT's folder>/<RUN>``;
per run the JSON holds the per-batch training losses and sequence lengths, the trained tokens, the
layer count, the FSDP unit count, a checksum and the shape of every full parameter, the states
of the algorithms that replay, how much more memory a rank holds for an optimizer state tensor
than its part of it, and how many frozen parameters hold a gradient; rank 0 saves every full parameter and its optimizer state tensors at the end
of each run to ``<OUT's folder>/<RUN>.pt``.
"""

import copy
import json
import os
import shutil
import sys

import torch

from composer.core import Callback
from composer.utils import dist
from torch.distributed.fsdp import FSDPModule

from composer_growth.recipe import build_trainer, load_recipe, validate
from composer_growth.unwrap import composer_model, unwrap_hf


class Record(Callback):
    def __init__(self):
        self.losses, self.lengths = [], []

    def after_dataloader(self, state, logger):
        self.lengths.append(int(state.batch["input_ids"].shape[1]))

    def batch_end(self, state, logger):
        self.losses.append(float(state.loss.detach()))


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_tensors(trainer, path):
    """Every full parameter and its optimizer state tensors, on rank 0 (collective)."""
    model, opt = composer_model(trainer.state), trainer.state.optimizers[0]
    out = {"params": {}, "state": {}}
    for name, p in model.named_parameters():
        out["params"][name] = full(p.detach()).clone()
        out["state"][name] = {k: full(v).clone() for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}
    if dist.get_global_rank() == 0:
        torch.save(out, path)


def state_storage(trainer):
    """The largest ratio, over the optimizer's state tensors, of the memory a rank holds for one to its part of it."""
    ratios = [1.0]
    for st in trainer.state.optimizers[0].state.values():
        for v in st.values():
            local = v.to_local() if hasattr(v, "to_local") else v
            if torch.is_tensor(v) and local.numel():
                ratios.append(local.untyped_storage().nbytes() / (local.numel() * local.element_size()))
    return max(ratios)


def train(recipe, tensors):
    plan = validate(recipe)
    record = Record()
    plan.callbacks.append(record)
    trainer = build_trainer(plan)
    trainer.fit()
    model = composer_model(trainer.state)
    sums, shapes = {}, {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        sums[name], shapes[name] = float(full.detach().double().sum()), list(full.shape)
    out = {"losses": record.losses, "lengths": record.lengths, "tokens": int(trainer.state.timestamp.token),
           "layers": unwrap_hf(model).config.num_hidden_layers, "params": sums, "shapes": shapes,
           "fsdp": trainer.state.fsdp_enabled,
           "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
           "replayed": [a.state_dict() for a in trainer.state.algorithms if hasattr(a, "replay")],
           "state_storage": state_storage(trainer),
           "frozen_with_grad": sum(not p.requires_grad and p.grad is not None for p in model.parameters())}
    save_tensors(trainer, tensors)
    trainer.close()
    return out


def with_kind(base, kind, folder):
    recipe = dict(copy.deepcopy(base), save_folder=folder)
    for options in (recipe.get("algorithms") or {}).values():
        if isinstance(options, dict) and options.get("export_folder"):
            options["export_folder"] = os.path.join(folder, "export")
    if kind != "ddp":
        recipe["parallelism"] = {"fsdp": {"version": 2, "state_dict_type": "sharded" if kind == "gathered" else kind}}
    return recipe


base, out = load_recipe(sys.argv[1]), sys.argv[2]
work = os.path.dirname(os.path.abspath(out))
results = {}
for name in sys.argv[3:]:
    kind, _, checkpoint = name.partition("@")
    checkpoint, _, damaged = checkpoint.partition("~")
    folder, tensors = os.path.join(work, name), os.path.join(work, f"{name}.pt")
    if kind == "gathered":
        os.environ["COMPOSER_GROWTH_FSDP_PATH"] = "gathered"
    else:
        os.environ.pop("COMPOSER_GROWTH_FSDP_PATH", None)
    if not checkpoint:
        results[name] = train(with_kind(base, kind, folder), tensors)
        continue
    if dist.get_global_rank() == 0:  # a save folder holding only that checkpoint: autoresume finds it
        os.makedirs(folder)
        src = os.path.join(work, kind, checkpoint)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(folder, checkpoint))
        if damaged:
            shutil.copytree(os.path.join(work, kind, damaged), os.path.join(folder, damaged))
            shard = os.path.join(folder, damaged, "__1_0.distcp")
            os.truncate(shard, os.path.getsize(shard) // 2)
        os.symlink(damaged or checkpoint, os.path.join(folder, "latest-rank0.pt"))
    dist.barrier()
    results[name] = train(dict(with_kind(base, kind, folder), autoresume=True), tensors)
with open(out.format(rank=dist.get_global_rank()), "w") as f:
    json.dump(results, f)
