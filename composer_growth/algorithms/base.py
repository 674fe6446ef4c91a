"""What every algorithm of the suite provides beyond Composer's ``Algorithm``.

Composer's :class:`~composer.core.Algorithm` says *when* to act (``match``) and *what* to do
(``apply``), and checkpoints its ``state_dict``. The suite adds a few duties that the recipe
builder, ``composer-growth plan``, the run summary and checkpoint loading call on every
algorithm, through this class and nothing else:

=====================  ==========================================================================
``validate_run``       check the options against the whole run before anything is built
``run_events``         the events that changed the run, for the summary
``run_summary``        an optional section of the summary of the algorithm's own
``replay``             redo recorded architecture changes before a checkpoint's weights load
``restore``            take back the instance's own ``state_dict`` from a checkpoint
``length_rank``        where this algorithm sets a batch's length (``None``: it sets none) ...
``set_batch_length``   ... and the step that sets it, run in rank order once per batch
``plan_*``             the algorithm's schedule walked without a Trainer, for ``plan``
=====================  ==========================================================================

Every method has a default that does nothing, so an algorithm implements only what it uses.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from composer.core import Algorithm, State
from composer.loggers import Logger
from torch import nn

from composer_growth.runfacts import RunFacts

# ``now(unit)``: how much of the run is done, in a Composer time unit (``plan.Clock``, or a State)
Now = Callable[[Any], float]


class SuiteAlgorithm(Algorithm):
    """The base class of every algorithm of composer-growth."""

    #: order among the algorithms that set a batch's length (lower first); ``None``: sets none
    length_rank: ClassVar[int | None] = None

    #: whether this algorithm's length step drops tokens (truncates) rather than reshaping rows
    truncates: bool = False

    #: what :meth:`validate_run` checked the options against (``None`` until it ran)
    run_facts: RunFacts | None = None

    #: ``False`` when the recipe switched the algorithm off: it then never acts
    enabled: bool = True

    #: whether the recipe's ``model.peft`` block describes adapters this algorithm adds later
    #: (the recipe then builds the model without them)
    defers_peft: bool = False

    def adds_adapters_later(self) -> bool:
        """Whether this algorithm will put LoRA adapters on the model later in the run (``lora_merge`` ``start_at``)."""
        return False
    #: whether a recipe may hold several of it (a list under its name)
    repeatable: ClassVar[bool] = False
    #: this instance's own state in the checkpoint being loaded, matched by class and position among
    #: the algorithms of its class (Composer keys algorithm states by class name, so it hands every
    #: instance of a class the last one's state); set before the weights load, ``None`` otherwise
    checkpoint_state: dict[str, Any] | None = None

    # -- before the run ---------------------------------------------------------------------
    def validate_run(self, facts: RunFacts) -> None:
        """Check the options against the run (duration, batch, data, model, parallelism).

        Raises :class:`~composer_growth.errors.ConfigError` naming the option. Keep ``facts`` in
        :attr:`run_facts`."""
        self.run_facts = facts

    # -- during the run ---------------------------------------------------------------------
    def set_batch_length(self, state: State, logger: Logger) -> None:
        """Set the length of ``state.batch`` (only for an algorithm with a :attr:`length_rank`)."""
        raise NotImplementedError(f"{type(self).__name__} sets no batch length")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Composer's hook: :meth:`restore` with this instance's own saved state (:attr:`checkpoint_state`
        where set: Composer hands two instances of one class the same state)."""
        if self.checkpoint_state is not None:
            state, self.checkpoint_state = self.checkpoint_state, None
        self.restore(state)

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` saved (this instance's own state)."""

    def replay(self, state: State, saved: dict[str, Any]) -> None:
        """Before a checkpoint's weights load: redo the architecture changes that ``saved`` (this
        algorithm's state in the checkpoint) records, so the model has the checkpoint's shape."""

    # -- after the run ----------------------------------------------------------------------
    def run_events(self) -> list[dict[str, Any]]:
        """The events of this run that changed it (``events.announce`` records), oldest first."""
        return []

    def run_summary(self) -> dict[str, Any] | None:
        """A section of the run summary: ``{"title": str, "lines": [str], ...JSON-able}``, or ``None``."""
        return None

    # -- plan: the schedule walked without a Trainer ---------------------------------------------
    def plan_length(self, now: Now, length: int) -> int:
        """The batch length this algorithm makes of a batch of ``length`` tokens a row."""
        return length

    def plan_lr(self, now: Now, record: dict[str, Any]) -> float:
        """The factor this algorithm applies to the scheduler's learning rate at ``now``."""
        return 1.0

    def plan_events(self, now: Now, batch: int, model: nn.Module, record: dict[str, Any]) -> list[dict[str, Any]]:
        """At the end of ``batch``: change ``model`` (an HF model, e.g. on the meta device) as the run
        would, and return the events, each ``{"event": name, "batch": batch, ...}``. ``record`` is
        this algorithm's scratch space for the walk."""
        return []

    def plan_pending(self, record: dict[str, Any], batch: int) -> list[dict[str, Any]]:
        """Events the walk could not place (they wait on the eval loss), at the end of the run."""
        return []
