"""``torch.compile`` around algorithms that change shapes or the model.

Composer compiles a model in place: ``state.model.forward`` becomes the ``torch.compile`` context
(built from the Trainer's ``compile_config``) applied to the original forward.

* :func:`compile_context` finds that context again, so a wrapper rebuilt after surgery compiles
  with the user's options (backend, mode, ``dynamic``, ...) instead of the defaults.
* :func:`make_static` drops every traced graph once shapes stop changing (a warmup ended): with
  ``dynamic=None`` dynamo recompiled with dynamic shapes as lengths changed, and kept those
  slower, shape-generic graphs; after ``torch._dynamo.reset()`` the next step traces the fixed
  shape again, statically. (``reset`` also forgets the dimensions dynamo marked dynamic.)
* :func:`raise_recompile_limit`: with ``dynamic=False`` every distinct (rows, length) shape is a
  recompile, and beyond ``torch._dynamo.config.recompile_limit`` (8) dynamo silently runs the
  frame eagerly for the rest of the run; an algorithm that knows how many shapes it will produce
  raises the limit to that number, once, with one line.
"""

from __future__ import annotations

from typing import Any

import torch
from composer.core import State
from composer.utils import dist

__all__ = ["compile_context", "is_compiled", "make_static", "raise_recompile_limit"]


def is_compiled(state: State) -> bool:
    """Whether Composer compiled the Trainer's model (``compile_config``)."""
    return getattr(state.model.forward, "_torchdynamo_orig_callable", None) is not None


def compile_context(forward: Any) -> Any | None:
    """The ``torch.compile`` context that wrapped ``forward`` (holding the compile options), or None."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    for cell in getattr(forward, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _TorchDynamoContext):
            return value
    return None


def make_static(state: State, why: str) -> None:
    """Drop the compiled graphs (and the dimensions dynamo made dynamic) of a compiled model."""
    if is_compiled(state):
        torch._dynamo.reset()
        if dist.get_global_rank() == 0:
            print(f"torch.compile: graphs reset ({why}); the next steps compile for static shapes", flush=True)


def raise_recompile_limit(state: State, shapes: int, who: str) -> int:
    """Raise dynamo's recompile limits to ``shapes`` where they are lower and the model is compiled;
    returns the limit in force."""
    config = torch._dynamo.config
    if not is_compiled(state) or shapes <= config.recompile_limit:
        return config.recompile_limit
    old = config.recompile_limit
    config.recompile_limit = shapes
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * shapes)
    if dist.get_global_rank() == 0:
        print(f"{who}: torch._dynamo recompile_limit {old} -> {shapes} (the run trains up to {shapes} shapes; "
              "past the limit compile falls back to eager)", flush=True)
    return shapes
