"""Under ``composer -n 2``: ``gpu_ready.py RECIPE OUT MODE [ARG]``; writes ``OUT`` (``{rank}`` in it) as JSON.

Modes:
* ``slow_build SOURCE``: the recipe's ``data.path`` is missing; rank 0 builds it (a copy of ``SOURCE``)
  only after sleeping past the recipe's ``dist_timeout``; the other ranks wait (``prepare_once``),
  then every rank joins a collective.
* ``compile_growth``: train the recipe (compiled, with a growth); report whether the DDP wrapper rebuilt
  after the growth is compiled with the Trainer's own compile context (its options).
* ``oom_on_rank1``: train the recipe; rank 1's pre-allocation pass runs out of memory (a CUDA
  out-of-memory ``RuntimeError`` raised by a forward pre-hook at the warmup's longest length, once).
"""

import json
import shutil
import sys
import time

import torch
from composer.core import Callback
from composer.utils import dist

from composer_growth.recipe import build_trainer, load_recipe, validate
from composer_growth.recipe.build import init_dist

recipe_path, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
plan = validate(load_recipe(recipe_path))
result = {}

if mode == "slow_build":
    from composer_growth.data.prepare import prepare_once

    init_dist(plan)

    def build():
        time.sleep(3 * plan.recipe.dist_timeout)
        shutil.copytree(sys.argv[4], plan.recipe.data.path)

    result["built"] = prepare_once(plan.recipe.data.path, build, "data.path", "")
    t = torch.ones(1)
    dist.all_reduce(t)
    result["sum"] = float(t.item())
elif mode == "compile_growth":
    from composer_growth.algorithms.compiling import compile_context

    seen = {}

    class Contexts(Callback):
        def fit_start(self, state, logger):
            seen["before"] = compile_context(state.model.forward)

    plan.callbacks.append(Contexts())
    trainer = build_trainer(plan)
    trainer.fit()
    after = compile_context(trainer.state.model.forward)
    result = {"ddp": isinstance(trainer.state.model, torch.nn.parallel.DistributedDataParallel),
              "compiled": after is not None,
              "same_options": after is not None and after is seen["before"],
              "layers": trainer.state.model.module.model.config.num_hidden_layers}
elif mode == "oom_on_rank1":
    warmup = next(a for a in plan.algorithms if type(a).__name__ == "SeqLengthWarmup")

    class OutOfMemoryOnce(Callback):
        def fit_start(self, state, logger):
            if dist.get_global_rank() != 1:
                return
            raised = []

            def hook(module, args, kwargs):
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids.shape[-1] == warmup.max_seq_length and not raised:
                    raised.append(1)
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")

            state.model.module.model.register_forward_pre_hook(hook, with_kwargs=True)

    plan.callbacks.append(OutOfMemoryOnce())
    trainer = build_trainer(plan)
    trainer.fit()
    result = {"preallocation": warmup.preallocation, "batches": int(trainer.state.timestamp.batch)}
with open(out.format(rank=dist.get_global_rank()), "w") as f:
    json.dump(result, f)
