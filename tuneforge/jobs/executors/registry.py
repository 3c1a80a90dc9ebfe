"""The executors, in one visible table: the `executor` setting names one of these."""

from __future__ import annotations

from collections.abc import Callable

from tuneforge.errors import InvalidRequestError
from tuneforge.jobs.executors.base import Executor
from tuneforge.jobs.executors.fake import FakeExecutor
from tuneforge.jobs.executors.local import LocalExecutor
from tuneforge.jobs.executors.ray import RayExecutor
from tuneforge.settings import Settings

# Each is made from the server's settings; only `ray` uses them (its cluster's address, the cancel grace). The ray
# module imports Ray itself only once a run starts.
EXECUTORS: dict[str, Callable[[Settings], Executor]] = {
    "local": lambda settings: LocalExecutor(),
    "fake": lambda settings: FakeExecutor(),
    "ray": lambda settings: RayExecutor(settings),
}


def make_executor(name: str, settings: Settings) -> Executor:
    try:
        factory = EXECUTORS[name]
    except KeyError:
        raise InvalidRequestError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}") from None
    return factory(settings)
