"""The executors, in one visible table: the `executor` setting names one of these."""

from __future__ import annotations

from collections.abc import Callable

from tuneforge.errors import InvalidRequestError
from tuneforge.jobs.executors.base import Executor
from tuneforge.jobs.executors.fake import FakeExecutor
from tuneforge.jobs.executors.local import LocalExecutor

EXECUTORS: dict[str, Callable[[], Executor]] = {
    "local": LocalExecutor,
    "fake": FakeExecutor,
}


def make_executor(name: str) -> Executor:
    try:
        return EXECUTORS[name]()
    except KeyError:
        raise InvalidRequestError(f"unknown executor {name!r}; known: {', '.join(EXECUTORS)}") from None
