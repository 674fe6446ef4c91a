"""Run a recipe under the composer launcher and write, per rank, a checksum of every parameter."""

import json
import sys

import torch

from composer_growth.recipe import build_trainer, load_recipe, validate
from composer_growth.unwrap import composer_model
from composer.utils import dist

recipe, out = sys.argv[1], sys.argv[2]
trainer = build_trainer(validate(load_recipe(recipe)))
trainer.fit()
model = composer_model(trainer.state)
sums = {n: float(p.detach().double().sum()) for n, p in model.named_parameters()}
info = {"params": sums, "loss": trainer.state.total_loss_dict, "layers": model.model.config.num_hidden_layers,
        "ddp": isinstance(trainer.state.model, torch.nn.parallel.DistributedDataParallel)}
with open(out.format(rank=dist.get_global_rank()), "w") as f:
    json.dump(info, f)
