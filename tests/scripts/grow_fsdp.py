"""Under ``composer -n 2``: one recipe grown under DDP, under FSDP2 with sharded and with full
checkpoints, and each FSDP2 run resumed from its checkpoint after the growth.

Writes, per rank, the per-batch training losses of every run, the layer count, a checksum of
every full parameter and the peak resident memory.
"""

import copy
import json
import os
import shutil
import sys

import torch
from composer.core import Callback
from composer.utils import dist

from composer_growth.algorithms.surgery import composer_model
from composer_growth.families import unwrap_hf
from composer_growth.recipe import build_trainer, load_recipe, validate


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def batch_end(self, state, logger):
        self.losses.append(float(state.loss.detach()))


def train(recipe):
    plan = validate(recipe)
    losses = Losses()
    plan.callbacks.append(losses)
    trainer = build_trainer(plan)
    trainer.fit()
    model = composer_model(trainer.state)
    sums = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        sums[name] = float(full.detach().double().sum())
    from torch.distributed.fsdp import FSDPModule

    out = {"losses": losses.losses, "units": sum(isinstance(m, FSDPModule) for m in model.modules()), "layers": unwrap_hf(model).config.num_hidden_layers, "params": sums,
           "fsdp": trainer.state.fsdp_enabled,
           "grown": [a.state_dict() for a in trainer.state.algorithms if hasattr(a, "replay")]}
    trainer.close()
    return out


def resumed(recipe, checkpoint, folder):
    """The run restarted from ``checkpoint`` of its save folder (autoresume finds it)."""
    if dist.get_global_rank() == 0:
        os.makedirs(folder)
        src = os.path.join(recipe["save_folder"], checkpoint)
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(folder, checkpoint))
        os.symlink(checkpoint, os.path.join(folder, "latest-rank0.pt"))
    dist.barrier()
    return train(dict(recipe, save_folder=folder, autoresume=True))


base, out = load_recipe(sys.argv[1]), sys.argv[2]
work = os.path.dirname(os.path.abspath(out))
results = {"ddp": train(dict(copy.deepcopy(base), save_folder=None))}
for kind in ("sharded", "full"):
    recipe = copy.deepcopy(base)
    recipe["parallelism"] = {"fsdp": {"version": 2, "state_dict_type": kind}}
    recipe["save_folder"] = os.path.join(work, kind)
    results[kind] = train(recipe)
    checkpoint = "ep0-ba6" if kind == "sharded" else "ep0-ba9-rank0.pt"
    results[f"{kind}_resumed"] = resumed(recipe, checkpoint, os.path.join(work, f"{kind}-resumed"))
with open(out.format(rank=dist.get_global_rank()), "w") as f:
    json.dump(results, f)
