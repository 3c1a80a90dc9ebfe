"""The recipe table: a TrainSpec's `recipe` name -> the function that runs it, and what a recipe returns.

Torch-free on purpose (the job queue imports it to check names): the table holds import paths, and a recipe's
module (which imports torch) is loaded only by the training process that runs it.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tuneforge.errors import InvalidRequestError
from tuneforge.train.events import EventWriter
from tuneforge.train.spec import TrainSpec


@dataclass(frozen=True)
class Outcome:
    """How a recipe ended when it did not raise: `completed` or `cancelled`, a message for people, extra data."""

    status: Literal["completed", "cancelled"]
    message: str
    data: dict[str, Any] = field(default_factory=dict)


# A recipe runs a spec, writing events to `out`; `stop` is set when the run should checkpoint and end (SIGTERM).
Recipe = Callable[[TrainSpec, EventWriter, threading.Event], Outcome]

RECIPES: dict[str, str | None] = {
    "sft": "tuneforge.train.recipes.sft:run",  # supervised fine-tuning, LoRA or full
    "dpo": "tuneforge.train.recipes.dpo:run",  # preference tuning (DPO, RPO, SimPO), LoRA or full
}


def available() -> list[str]:
    """The recipe names this build can run."""
    return [name for name, target in RECIPES.items() if target]


def load_recipe(name: str) -> Recipe:
    """The run function of recipe `name`, imported now.

    Raises:
        InvalidRequestError: the name is unknown or reserved for a recipe not built yet.
    """
    if name not in RECIPES:
        raise InvalidRequestError(f"unknown training recipe {name!r}; available: {', '.join(available())}")
    target = RECIPES[name]
    if target is None:
        raise InvalidRequestError(f"the {name!r} training method is not available on this server yet")
    module_name, _, attr = target.partition(":")
    recipe: Recipe = getattr(importlib.import_module(module_name), attr)
    return recipe
