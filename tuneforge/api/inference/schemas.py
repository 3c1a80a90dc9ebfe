"""Request bodies of `POST /chat/completions` and `POST /completions` (api-contract 4.1, 4.2): every field either
SDK sends is typed and range-checked here, with a 400 naming it; keys neither SDK defines are ignored, as the
hosted service does. Fields tuneforge cannot honour (a safety model, images for a text model) are refused by name
rather than silently dropped."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from tuneforge.api.bodies import RequestBody
from tuneforge.data.validation.images import check_data_url

# Largest n and stop list: the hosted service's limits.
MAX_N = 16
MAX_STOPS = 16


class Message(RequestBody):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "function", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content(self) -> Self:
        if self.role in ("system", "user", "developer", "tool", "function") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if isinstance(self.content, list):
            for i, part in enumerate(self.content):
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise ValueError(f"content[{i}]: a text part needs a string `text`")
                elif kind == "image_url":
                    _check_image(i, self.role, part)
                elif kind in ("video_url", "audio_url", "input_audio"):
                    raise ValueError(f"content[{i}]: {kind} parts need a video or audio model; served models "
                                     "here read text and images")  # fmt: skip
                else:
                    raise ValueError(f"content[{i}]: unknown part type {kind!r}")
        return self


def _check_image(i: int, role: str, part: dict[str, Any]) -> None:
    """An image part as the datasets take it: in a user message, an inline data URL (the server fetches no URL a
    request names); a text model refuses it when it renders the prompt."""
    holder = part.get("image_url")
    url = holder.get("url") if isinstance(holder, dict) else None
    if not isinstance(url, str) or not url:
        raise ValueError(f"content[{i}]: an image_url part needs an object `image_url` with a string `url`")
    if role != "user":
        raise ValueError(f"content[{i}]: only user messages may hold images (this one is {role})")
    problem = check_data_url(url)
    if problem is not None:
        raise ValueError(f"content[{i}]: {problem}")


class StreamOptions(RequestBody):
    include_usage: bool = False


class Sampling(RequestBody):
    """What both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: int | None = None
    echo: bool = False
    logit_bias: dict[str, float] | None = None
    safety_model: str | None = None
    # vLLM's extension: the answer also holds `prompt_token_ids`, the ids the model read.
    return_token_ids: bool = False

    @model_validator(mode="after")
    def _unsupported(self) -> Self:
        if self.safety_model:
            raise ValueError("safety_model: no safety models are served here")
        if self.echo:
            raise ValueError("echo: echoing the prompt is not supported")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported; use repetition_penalty")
        return self


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    # Together: an int 0-20 (the top alternatives per token); openai: a bool with `top_logprobs`.
    logprobs: bool | Annotated[int, Field(ge=0, le=20)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat(self) -> Self:
        if self.response_format:
            kind = self.response_format.get("type")
            if kind not in (None, "text", "json_object", "json_schema"):
                raise ValueError(f"response_format: unknown type {kind!r} (text, json_object or json_schema)")
            spec = self.response_format.get("json_schema")
            if kind == "json_schema" and not (isinstance(spec, dict) and isinstance(spec.get("schema"), dict)):
                raise ValueError("response_format: json_schema needs {'name', 'schema': {...}}")
        if self.tool_choice not in (None, "auto", "none"):
            raise ValueError("tool_choice: only 'auto' and 'none' are supported (no forced tool calls yet)")
        return self

    def top_alternatives(self) -> int | None:
        """How many alternatives per token to report, or None for no log-probabilities at all."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True:
            return self.top_logprobs or 0
        return int(self.logprobs)


class CompletionRequest(Sampling):
    prompt: Annotated[str, Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
