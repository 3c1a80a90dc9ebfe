"""Named queries on dedicated endpoints and their events.

A state change is one conditional UPDATE plus the event that records it, in one transaction; only a move the
state table (`store/endpoint_states.py`) allows can happen: `transition` raises on any other, and its WHERE clause
matches only rows in an allowed source state, so two writers racing (a PATCH and the supervisor) cannot both win.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from tuneforge.errors import NotFoundError
from tuneforge.store.endpoint_states import EndpointState, IllegalTransitionError, can_transition, sources_of
from tuneforge.store.tables import EndpointAdapterRow, EndpointEventRow, EndpointRow

_GUARDED = frozenset({"state", "id", "owner", "name"})


def insert_endpoint(session: Session, *, row: EndpointRow, message: str) -> EndpointRow:
    """A new endpoint, PENDING (to be started) or STOPPED (created stopped), with its first event."""
    if row.state not in (EndpointState.PENDING, EndpointState.STOPPED):
        raise IllegalTransitionError(f"a new endpoint starts PENDING or STOPPED, not {row.state}")
    session.add(row)
    session.flush()
    add_event(session, endpoint_id=row.id, type_="endpoint_created", message=message, data={"state": row.state})
    return row


def get_endpoint(session: Session, *, endpoint_id: str, owner: str | None = None) -> EndpointRow:
    """The endpoint (the owner's only, when given); NotFoundError otherwise, for another owner's too."""
    row = session.get(EndpointRow, endpoint_id)
    if row is None or (owner is not None and row.owner != owner):
        raise NotFoundError(f"endpoint {endpoint_id!r} not found", param="endpoint_id")
    return row


def find_by_name(session: Session, *, name: str, owner: str | None = None) -> EndpointRow | None:
    stmt = select(EndpointRow).where(EndpointRow.name == name)
    if owner is not None:
        stmt = stmt.where(EndpointRow.owner == owner)
    return session.scalars(stmt).first()


def list_endpoints(session: Session, *, owner: str | None = None) -> list[EndpointRow]:
    stmt = select(EndpointRow)
    if owner is not None:
        stmt = stmt.where(EndpointRow.owner == owner)
    return list(session.scalars(stmt.order_by(EndpointRow.created_at, EndpointRow.id)))


def transition(
    session: Session,
    *,
    endpoint_id: str,
    from_states: tuple[str, ...],
    to_state: str,
    event_type: str,
    message: str,
    event_data: dict[str, Any] | None = None,
    **values: Any,
) -> bool:
    """Move the endpoint from one of `from_states` to `to_state` and record the event; False if it was in none
    of them (it moved on, or was deleted). Entering a state other than ERROR clears the error.

    Raises:
        IllegalTransitionError: the state table allows no move from one of `from_states` to `to_state`.
    """
    illegal = [s for s in from_states if not can_transition(s, to_state)]
    if illegal or not from_states:
        raise IllegalTransitionError(
            f"an endpoint that is {' or '.join(illegal) or '(no state)'} cannot become {to_state}"
        )
    if _GUARDED & values.keys():
        raise IllegalTransitionError("the state is set by transition itself; id, owner and name never change")
    if to_state != EndpointState.ERROR:
        values = {"error": None, **values}
    allowed = [s.value for s in sources_of(to_state) if s.value in from_states]
    now = time.time()
    stmt = update(EndpointRow).where(EndpointRow.id == endpoint_id, EndpointRow.state.in_(allowed))
    result = session.execute(stmt.values(state=to_state, updated_at=now, **values))
    if not getattr(result, "rowcount", 0):
        return False
    add_event(session, endpoint_id=endpoint_id, type_=event_type, message=message,
              data={"state": to_state, **(event_data or {})})  # fmt: skip
    return True


def update_endpoint(session: Session, *, endpoint_id: str, **values: Any) -> bool:
    """Write settings columns (display name, autoscaling, inactive timeout); never the state."""
    if _GUARDED & values.keys():
        raise IllegalTransitionError("the state changes only through transition")
    stmt = update(EndpointRow).where(EndpointRow.id == endpoint_id)
    result = session.execute(stmt.values(updated_at=time.time(), **values))
    return bool(getattr(result, "rowcount", 0))


def delete_endpoint(session: Session, *, endpoint_id: str) -> None:
    session.execute(delete(EndpointEventRow).where(EndpointEventRow.endpoint_id == endpoint_id))
    session.execute(delete(EndpointAdapterRow).where(EndpointAdapterRow.endpoint_id == endpoint_id))
    session.execute(delete(EndpointRow).where(EndpointRow.id == endpoint_id))


def add_event(
    session: Session, *, endpoint_id: str, type_: str, message: str, data: dict[str, Any] | None = None
) -> None:
    session.add(
        EndpointEventRow(endpoint_id=endpoint_id, created_at=time.time(), type=type_, message=message, data=data or {})
    )


def list_events(session: Session, *, endpoint_id: str) -> list[EndpointEventRow]:
    stmt = select(EndpointEventRow).where(EndpointEventRow.endpoint_id == endpoint_id)
    return list(session.scalars(stmt.order_by(EndpointEventRow.created_at, EndpointEventRow.id)))


def list_adapters(session: Session, *, endpoint_id: str) -> list[EndpointAdapterRow]:
    stmt = select(EndpointAdapterRow).where(EndpointAdapterRow.endpoint_id == endpoint_id)
    return list(session.scalars(stmt.order_by(EndpointAdapterRow.created_at, EndpointAdapterRow.model)))


def has_adapter(session: Session, *, endpoint_id: str, model: str) -> bool:
    return session.get(EndpointAdapterRow, (endpoint_id, model)) is not None


def add_adapter(session: Session, *, endpoint_id: str, model: str) -> bool:
    """Register the adapter (False: it was already); the primary key makes a racing second add a no-op."""
    if has_adapter(session, endpoint_id=endpoint_id, model=model):
        return False
    session.add(EndpointAdapterRow(endpoint_id=endpoint_id, model=model, created_at=time.time()))
    add_event(session, endpoint_id=endpoint_id, type_="adapter_added", message=f"adapter {model} added",
              data={"model": model})  # fmt: skip
    return True


def remove_adapter(session: Session, *, endpoint_id: str, model: str) -> bool:
    row = EndpointAdapterRow
    result = session.execute(delete(row).where(row.endpoint_id == endpoint_id, row.model == model))
    if getattr(result, "rowcount", 0):
        add_event(session, endpoint_id=endpoint_id, type_="adapter_removed", message=f"adapter {model} removed",
                  data={"model": model})  # fmt: skip
        return True
    return False
