"""Name -> constructor tables for what a recipe can switch on: algorithms, callbacks, loggers.

The tables are filled where the code lives (``@register_algorithm``, ``@register_callback``); this
module imports none of it. :func:`composer_growth.recipe.build.load_all` imports every module that
registers something.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ALGORITHMS: dict[str, Callable[..., Any]] = {}
CALLBACKS: dict[str, Callable[..., Any]] = {}
LOGGERS: dict[str, Callable[..., Any]] = {}


def register_algorithm(name: str):
    def deco(cls):
        ALGORITHMS[name] = cls
        return cls
    return deco


def register_callback(name: str):
    def deco(cls):
        CALLBACKS[name] = cls
        return cls
    return deco


def register_composer_builtins() -> None:
    """Composer's own algorithms, callbacks and loggers a recipe may name (idempotent)."""
    from composer.algorithms import EMA, GradientClipping
    from composer.callbacks import LRMonitor, MemoryMonitor, OptimizerMonitor, RuntimeEstimator, SpeedMonitor
    from composer.loggers import FileLogger, TensorboardLogger

    ALGORITHMS.setdefault("gradient_clipping", GradientClipping)
    ALGORITHMS.setdefault("ema", EMA)
    CALLBACKS.update(lr_monitor=LRMonitor, memory_monitor=MemoryMonitor, optimizer_monitor=OptimizerMonitor,
                     speed_monitor=SpeedMonitor, runtime_estimator=RuntimeEstimator)
    LOGGERS.update(tensorboard=TensorboardLogger, file=FileLogger)
