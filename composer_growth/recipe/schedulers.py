"""The recipe's ``scheduler`` block -> a Composer scheduler, restartable (see :mod:`composer_growth.algorithms.lr`)."""

from __future__ import annotations

from composer_growth.algorithms.lr import RestartableSchedule
from composer_growth.recipe.schema import Recipe


def build_scheduler(recipe: Recipe) -> RestartableSchedule:
    """The recipe's Composer scheduler, wrapped so the orchestrator can restart it or change its warmup."""
    from composer.optim import (ConstantScheduler, ConstantWithWarmupScheduler, CosineAnnealingWithWarmupScheduler,
                                LinearWithWarmupScheduler)

    s = recipe.scheduler
    if s.name == "constant":
        schedule = ConstantScheduler()
    elif s.name == "constant_with_warmup":
        schedule = ConstantWithWarmupScheduler(t_warmup=s.t_warmup)
    elif s.name == "linear_with_warmup":
        schedule = LinearWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f)
    else:
        schedule = CosineAnnealingWithWarmupScheduler(t_warmup=s.t_warmup, alpha_f=s.alpha_f)
    return RestartableSchedule(schedule)
