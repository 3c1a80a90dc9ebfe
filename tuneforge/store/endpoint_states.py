"""Dedicated endpoint states and the one table of allowed transitions, enforced by the store itself
(`store/endpoints.transition`), as the job states are (`store/states.py`).

    PENDING  --(supervisor takes it)-->  STARTING  --(min_replicas ready)-->  STARTED
    STARTED  --(a replica set must be rebuilt: server restart)-->  STARTING
    any live state  --(stop asked, or inactive_timeout)-->  STOPPING  --(replicas ended)-->  STOPPED
    STOPPED / ERROR  --(start asked)-->  PENDING
    PENDING / STARTING / STARTED  --(replicas cannot be had: model, memory, start failures)-->  ERROR (with reason)

The names are the hosted service's (`ERROR`, not FAILED: the SDK and CLI wait for these exact strings).
"""

from __future__ import annotations

from enum import StrEnum

from tuneforge.store.states import IllegalTransitionError


class EndpointState(StrEnum):
    PENDING = "PENDING"  # asked to run; the supervisor has not started replicas yet
    STARTING = "STARTING"  # replicas starting
    STARTED = "STARTED"  # at least min_replicas (and one) ready: requests are served
    STOPPING = "STOPPING"  # replicas being stopped
    STOPPED = "STOPPED"  # no replicas; a request gets an error saying how to start it
    ERROR = "ERROR"  # replicas could not be had; `error` says why


# The states in which the endpoint should have replicas.
LIVE = frozenset({EndpointState.PENDING, EndpointState.STARTING, EndpointState.STARTED})

TRANSITIONS: dict[EndpointState, frozenset[EndpointState]] = {
    EndpointState.PENDING: frozenset({EndpointState.STARTING, EndpointState.STOPPING, EndpointState.ERROR}),
    EndpointState.STARTING: frozenset({EndpointState.STARTED, EndpointState.STOPPING, EndpointState.ERROR}),
    EndpointState.STARTED: frozenset({EndpointState.STARTING, EndpointState.STOPPING, EndpointState.ERROR}),
    EndpointState.STOPPING: frozenset({EndpointState.STOPPED}),
    EndpointState.STOPPED: frozenset({EndpointState.PENDING}),
    EndpointState.ERROR: frozenset({EndpointState.PENDING, EndpointState.STOPPING}),
}


def can_transition(current: str, target: str) -> bool:
    return EndpointState(target) in TRANSITIONS[EndpointState(current)]


def sources_of(target: str) -> frozenset[EndpointState]:
    goal = EndpointState(target)
    return frozenset(state for state, targets in TRANSITIONS.items() if goal in targets)


__all__ = ["LIVE", "TRANSITIONS", "EndpointState", "IllegalTransitionError", "can_transition", "sources_of"]
