"""The base of every JSON request body: its strings must be text the database can store (no NUL, no lone
surrogate) and its numbers finite, or the request is a 400 naming the field. JSON lets a client send all of these,
and without this check they reach SQL (a 500, and a dropped keep-alive connection) or a spec a run cannot read."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, model_validator

from tuneforge.jobs.plan import Problems, check_text_and_numbers


class RequestBody(BaseModel):
    @model_validator(mode="after")
    def _storable(self) -> Self:
        problems = Problems("request")
        check_text_and_numbers(problems, self.model_dump(), path="")
        problems.raise_if_any()
        return self
