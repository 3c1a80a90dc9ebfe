"""A model server's own small app: the OpenAI protocol as vLLM speaks it, over one `Engine` hosting one base model
and the LoRA adapters loaded into it. The API server proxies to it (and to a real vLLM the same way):

- `POST /v1/chat/completions`, `POST /v1/completions` (streamed as server-sent events, or not): `model` is the base
  model's name or an adapter's `lora_name`; vLLM's extra sampling fields (`top_k`, `min_p`,
  `repetition_penalty`, `seed`) are read from the body;
- `POST /v1/load_lora_adapter {"lora_name", "lora_path"}`, `POST /v1/unload_lora_adapter {"lora_name"}`;
- `GET /health`, `GET /stats` (the engine's batch and adapter-cache figures).

The prompt is rendered with the chat template saved beside the weights it is for (an adapter's own tokenizer
files, else the base model's), through the same code as training (`data/tokenization/chat.py`), so a served prompt
is the token ids a run trained on. Requests come from the API, which has checked them; what is still wrong here
(a prompt past the context, an unknown adapter) is a 4xx in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tuneforge.data.tokenization.chat import ImageContent, prompt_ids
from tuneforge.data.tokenization.hf_tokenizer import HFTokenizer, TokenizerFilesError, read_folder
from tuneforge.data.tokenization.vision import VisionTokenizer, image_urls
from tuneforge.serve import tools as tool_calls
from tuneforge.serve.text import TextStream
from tuneforge.serve.types import (
    Engine,
    EngineError,
    GeneratedToken,
    GenerationRequest,
    SamplingParams,
    UnknownAdapter,
)


@dataclass(frozen=True)
class Served:
    """A name requests may use, with the tokenizer (and chat template) its prompts are rendered with."""

    name: str
    adapter: str | None
    tokenizer: HFTokenizer
    stop_ids: tuple[int, ...]


def _stop_ids(tokenizer: HFTokenizer, folder: Path) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    config = folder / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(i for i in ids if isinstance(i, int)))


def _served(name: str, adapter: str | None, folder: Path, fallback: Served | None = None) -> Served:
    try:
        tokenizer = HFTokenizer(read_folder(folder))
    except TokenizerFilesError:
        if fallback is None:
            raise
        return Served(name, adapter, fallback.tokenizer, fallback.stop_ids)
    return Served(name, adapter, tokenizer, _stop_ids(tokenizer, folder) or (fallback.stop_ids if fallback else ()))


def _error(status: int, message: str, error_type: str = "invalid_request_error", param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def _sampling(body: dict[str, Any], served: Served, *, index: int, chat: bool) -> SamplingParams:
    seed = body.get("seed")
    if chat:
        top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    else:
        top = int(body.get("logprobs") or 0)
    return SamplingParams(
        max_tokens=int(body.get("max_tokens") or 512),
        temperature=float(body["temperature"]) if body.get("temperature") is not None else 1.0,
        top_p=float(body["top_p"]) if body.get("top_p") is not None else 1.0,
        top_k=int(body.get("top_k") or 0),
        min_p=float(body.get("min_p") or 0.0),
        repetition_penalty=float(body.get("repetition_penalty") or 1.0),
        seed=None if seed is None else int(seed) + index,
        top_logprobs=top,
        stop_token_ids=served.stop_ids,
        json_schema=_json_schema(body.get("response_format")) if chat else None,
    )


def _json_schema(response_format: Any) -> str | None:
    """The JSON Schema an answer must match: any JSON object for `json_object`, the given one for `json_schema`."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        return json.dumps(spec.get("schema") or {"type": "object"})
    return None


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(s for s in stop if isinstance(s, str))


class ModelServer:
    """`vision`: a vision-language model's processor, which renders chat prompts with their images (for the base
    model and its adapters, which train with it); None for a text model."""

    def __init__(
        self, engine: Engine, *, base_name: str, model_dir: Path, vision: VisionTokenizer | None = None
    ) -> None:
        self.engine = engine
        self.vision = vision
        self.base = _served(base_name, None, model_dir)
        self.adapters: dict[str, Served] = {}
        self.paths: dict[str, Path] = {}

    def lookup(self, name: str) -> Served | None:
        return self.base if name == self.base.name else self.adapters.get(name)

    def load_adapter(self, name: str, path: Path) -> None:
        """Load (or, when loaded, mark recently used) an adapter; its path is kept, so an adapter the engine's LRU
        evicted is loaded again when a request names it."""
        self.engine.load_adapter(name, path)
        if name not in self.adapters:
            self.adapters[name] = _served(name, name, path, fallback=self.base)
            self.paths[name] = path

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)
        self.adapters.pop(name, None)
        self.paths.pop(name, None)

    async def choice_tokens(
        self, prompt: list[int], served: Served, sampling: SamplingParams, images: tuple[str, ...] = ()
    ) -> AsyncIterator[GeneratedToken]:
        req = GenerationRequest(request_id=uuid.uuid4().hex, prompt_ids=tuple(prompt), sampling=sampling,
                                adapter=served.adapter, images=images)  # fmt: skip
        for attempt in (1, 2):
            stream = self.engine.generate(req)
            try:
                async for token in stream:
                    yield token
                return
            except UnknownAdapter:
                if attempt == 2 or served.adapter not in self.paths:
                    raise
                # Evicted from the engine's LRU since it was loaded here: load it again, then start over.
                await asyncio.to_thread(self.engine.load_adapter, served.adapter, self.paths[served.adapter])
            finally:
                await stream.aclose()  # type: ignore[attr-defined]


def _logprob_entry(tokenizer: HFTokenizer, token: GeneratedToken) -> dict[str, Any]:
    text = tokenizer.decode([token.token_id])
    return {
        "token": text,
        "logprob": token.logprob,
        "bytes": list(text.encode()),
        "top_logprobs": [
            {"token": (t := tokenizer.decode([i])), "logprob": lp, "bytes": list(t.encode())}
            for i, lp in token.top_logprobs
        ],
    }


async def _run_choice(
    server: ModelServer,
    prompt: list[int],
    served: Served,
    sampling: SamplingParams,
    stops: tuple[str, ...],
    on_text: Any = None,
    *,
    tools: bool = False,
    images: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Generate one choice; `on_text(piece, token)` is awaited for each piece of text as it becomes safe to show
    (with `tools`, text from a tool-call block on is held until the answer ends: `serve/tools.py`). Returns its text,
    tool calls, finish reason, token count and logprob entries."""
    text = TextStream(served.tokenizer, stops)
    count = 0
    finish = "length"
    logprobs: list[dict[str, Any]] = []
    special = set(sampling.stop_token_ids)
    visible = ""  # what TextStream released
    shown = 0  # how much of it went to on_text

    async def show(upto: int, token: GeneratedToken | None) -> None:
        nonlocal shown
        if on_text is not None and upto > shown:
            await on_text(visible[shown:upto], token)
            shown = upto

    async for token in server.choice_tokens(prompt, served, sampling, images):
        count += 1
        visible += text.push(token.token_id, special=token.token_id in special)
        logprobs.append(_logprob_entry(served.tokenizer, token))
        if token.finish_reason is not None:
            finish = token.finish_reason
        if text.stopped:
            finish = "stop"
        await show(tool_calls.may_open(visible) if tools else len(visible), token)
        if text.stopped:
            break
    visible += text.finish()
    calls: list[dict[str, Any]] = []
    content = visible
    if tools:
        parsed = tool_calls.parse(visible)
        calls, content = parsed.calls, parsed.content if parsed.calls else visible
        if calls:
            finish = "tool_calls"
            content = visible[:shown] + content[shown:] if content.startswith(visible[:shown]) else content
    if on_text is not None and len(content) > shown:
        await on_text(content[shown:], None)
    return {"text": content, "tool_calls": calls, "finish_reason": finish, "tokens": count, "logprobs": logprobs}


def create_model_app(server: ModelServer) -> FastAPI:
    app = FastAPI(title="tuneforge model server")
    app.state.server = server

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": server.base.name}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        s = server.engine.stats()
        out: dict[str, Any] = {
            "running": s.running,
            "waiting": s.waiting,
            "steps": s.steps,
            "dtype": s.dtype,
            "device": s.device,
            **s.extra,
        }
        if s.adapters is not None:
            a = s.adapters
            out["adapters"] = {
                "loaded": list(a.loaded),
                "count": a.count,
                "bytes": a.bytes,
                "max_count": a.max_count,
                "max_bytes": a.max_bytes,
                "hits": a.hits,
                "misses": a.misses,
                "evictions": a.evictions,
            }
        return out

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        names = [server.base.name, *server.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "tuneforge"} for n in names]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        body = await request.json()
        name, path = str(body.get("lora_name", "")), Path(str(body.get("lora_path", "")))
        if not name or not path.is_dir():
            return _error(400, f"lora_path {str(path)!r} is not a folder", param="lora_path")
        try:
            await asyncio.to_thread(server.load_adapter, name, path)
        except (EngineError, TokenizerFilesError, ValueError, OSError) as exc:
            return _error(400, f"adapter {name!r} cannot be loaded: {exc}", param="lora_path")
        return JSONResponse({"loaded": name})

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        body = await request.json()
        name = str(body.get("lora_name", ""))
        if name not in server.adapters:
            return _error(404, f"adapter {name!r} is not loaded", "not_found", "lora_name")
        await asyncio.to_thread(server.unload_adapter, name)
        return JSONResponse({"unloaded": name})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(request, chat=False)

    async def _complete(request: Request, *, chat: bool) -> Response:
        body = await request.json()
        served = server.lookup(str(body.get("model", "")))
        if served is None:
            return _error(404, f"model {body.get('model')!r} is not served here", "not_found", "model")
        images: tuple[str, ...] = ()
        try:
            if chat and server.vision is not None:
                messages = body.get("messages") or []
                prompt = prompt_ids(messages, body.get("tools"), server.vision)
                images = image_urls(messages)
            elif chat:
                prompt = prompt_ids(body.get("messages") or [], body.get("tools"), served.tokenizer)
            else:
                prompt = served.tokenizer(str(body.get("prompt", "")), add_special_tokens=True)["input_ids"]
        except ImageContent:
            return _error(400, "this model reads text only; a message holds an image", param="messages")
        except Exception as exc:  # a template that raises for these messages (jinja2.TemplateError, ValueError)
            return _error(400, f"the chat template cannot render these messages: {exc}", param="messages")
        n = int(body.get("n") or 1)
        stops = _stops(body)
        use_tools = bool(chat and body.get("tools") and body.get("tool_choice") != "none")
        samplings = [_sampling(body, served, index=i, chat=chat) for i in range(n)]
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": served.name}  # fmt: skip
        if body.get("stream"):
            return StreamingResponse(
                _stream(
                    server, prompt, served, samplings, stops, meta, chat=chat, body=body, tools=use_tools, images=images
                ),
                media_type="text/event-stream",
            )
        try:
            results = await asyncio.gather(
                *(_run_choice(server, prompt, served, s, stops, tools=use_tools, images=images) for s in samplings)
            )
        except EngineError as exc:
            return _error(exc.status_code, str(exc))
        answer = _whole(results, prompt, meta, chat=chat, want_logprobs=bool(body.get("logprobs")))
        if body.get("return_token_ids"):
            answer["prompt_token_ids"] = prompt
        return JSONResponse(answer)

    return app


def _usage(prompt: list[int], completion: int) -> dict[str, int]:
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


def _whole(
    results: list[dict[str, Any]], prompt: list[int], meta: dict[str, Any], *, chat: bool, want_logprobs: bool
) -> dict[str, Any]:
    choices = []
    for i, r in enumerate(results):
        logprobs = {"content": r["logprobs"]} if want_logprobs else None
        if chat:
            content = r["text"].strip() if r["tool_calls"] else r["text"]
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if r["tool_calls"]:
                message["tool_calls"] = r["tool_calls"]
            choices.append({"index": i, "message": message, "finish_reason": r["finish_reason"], "logprobs": logprobs})
        else:
            choices.append({"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": logprobs})
    return {
        **meta,
        "object": "chat.completion" if chat else "text_completion",
        "choices": choices,
        "usage": _usage(prompt, sum(r["tokens"] for r in results)),
    }


async def _stream(
    server: ModelServer,
    prompt: list[int],
    served: Served,
    samplings: list[SamplingParams],
    stops: tuple[str, ...],
    meta: dict[str, Any],
    *,
    chat: bool,
    body: dict[str, Any],
    tools: bool = False,
    images: tuple[str, ...] = (),
) -> AsyncIterator[bytes]:
    """Server-sent events, one per piece of text of any choice, then each choice's finish, usage, `[DONE]`."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    obj = "chat.completion.chunk" if chat else "text_completion"
    want_logprobs = bool(body.get("logprobs"))

    def chunk(index: int, text: str | None, finish: str | None, token: GeneratedToken | None) -> bytes:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
            if want_logprobs and token is not None:
                choice["logprobs"] = {"content": [_logprob_entry(served.tokenizer, token)]}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish}
        payload: dict[str, Any] = {**meta, "object": obj, "choices": [choice]}
        if not chat and token is not None:
            payload["token"] = {"id": token.token_id, "text": text or "", "logprob": token.logprob, "special": False}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    async def one(index: int, sampling: SamplingParams) -> dict[str, Any]:
        async def on_text(piece: str, token: GeneratedToken | None) -> None:
            await queue.put(chunk(index, piece, None, token))

        result = await _run_choice(server, prompt, served, sampling, stops, on_text, tools=tools, images=images)
        if result["tool_calls"]:
            delta = {"role": "assistant", "tool_calls": result["tool_calls"]}
            payload = {**meta, "object": obj, "choices": [{"index": index, "delta": delta, "finish_reason": None}]}
            await queue.put(b"data: " + json.dumps(payload).encode() + b"\n\n")
        await queue.put(chunk(index, None, result["finish_reason"], None))
        return result

    async def run_all() -> list[dict[str, Any]]:
        try:
            return await asyncio.gather(*(one(i, s) for i, s in enumerate(samplings)))
        finally:
            await queue.put(None)

    task = asyncio.create_task(run_all())
    try:
        while (item := await queue.get()) is not None:
            yield item
        results = await task
    except EngineError as exc:
        error = {"error": {"message": str(exc), "type": "invalid_request_error"}}
        yield b"data: " + json.dumps(error).encode() + b"\n\n"
        return
    finally:
        if not task.done():  # the client went away: stop generating at the engine's next step
            task.cancel()
    usage = _usage(prompt, sum(r["tokens"] for r in results))
    yield b"data: " + json.dumps({**meta, "object": obj, "choices": [], "usage": usage}).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"
