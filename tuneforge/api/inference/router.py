"""`POST /chat/completions` and `POST /completions` (api-contract 4.1, 4.2): check the request, find the weights it
names (`service.resolve`), get their model server from the pool, load the adapter there if needed, and proxy the
request, streamed or not, re-shaped for both SDKs (`wire.py`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from tuneforge.api.deps import DbDep, PrincipalDep
from tuneforge.api.errors import error_body
from tuneforge.api.fine_tunes.deps import CatalogDep
from tuneforge.api.inference import service, wire
from tuneforge.api.inference.schemas import ChatRequest, CompletionRequest, Sampling
from tuneforge.api.responses import errors
from tuneforge.api.routing import api_router
from tuneforge.catalog.source import ModelSource
from tuneforge.errors import InvalidRequestError, TuneForgeError
from tuneforge.serve.adapter_check import AdapterRefused, check_adapter
from tuneforge.serve.pool import ModelProcess, ModelServerPool, PoolError

router = api_router(tags=["inference"])

# Generation can take long; connecting and loading an adapter should not.
_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)


class ServingError(TuneForgeError):
    error_type = "server_error"

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def _pool(request: Request) -> ModelServerPool:
    pool: ModelServerPool = request.app.state.pool
    return pool


def _model_body(body: Sampling, target: service.Target, extra: dict[str, Any]) -> dict[str, Any]:
    """The request as the model server reads it (vLLM's fields): only what was checked, under the served name."""
    out = body.model_dump(exclude_none=True, exclude={"model", "stream_options", "safety_model", "echo", "logit_bias"})
    out["model"] = target.adapter_name or target.base.name
    out.update(extra)
    return out


def _cache(request: Request) -> service.ProxyCache:
    cache: service.ProxyCache = request.app.state.proxy_cache
    return cache


async def _adapter_folder(request: Request, target: service.Target) -> Path | None:
    """The adapter's local folder (downloaded once), checked for what no backend serves (`serve/adapter_check.py`)
    before any model server is started or asked to load it. A folder that passed is kept (its prefix's files never
    change); a refused one is checked, and refused, again on every request."""
    if target.adapter_name is None or target.adapter_prefix is None:
        return None
    settings = request.app.state.settings
    max_rank = settings.vllm_max_lora_rank if settings.serve_backend == "vllm" else None
    key = (target.adapter_name, target.adapter_prefix, max_rank)
    cached = _cache(request).adapter_folders.get(key)
    if cached is not None:
        return cached
    folder: Path = await anyio.to_thread.run_sync(
        service.adapter_folder, request.app.state.blobs, settings.home / "models", target
    )
    try:
        await anyio.to_thread.run_sync(lambda: check_adapter(folder, max_rank=max_rank))
    except AdapterRefused as exc:
        raise InvalidRequestError(f"fine-tuned model {target.public_name}: {exc}", param="model") from None
    _cache(request).adapter_folders.put(key, folder)
    return folder


async def _weights_bytes(request: Request, source: ModelSource) -> int | None:
    """The model's weight size for the pool's memory budget (`service.weights_bytes`), kept once known."""
    sizes = _cache(request).weight_sizes
    size = sizes.get(source)
    if size is None:
        settings, catalog = request.app.state.settings, request.app.state.catalog
        size = await anyio.to_thread.run_sync(
            service.weights_bytes, request.app.state.blobs, settings.home / "models", catalog, source
        )
        if size is not None:
            sizes.put(source, size)
    return size


async def _ensure_adapter(server: ModelProcess, target: service.Target, folder: Path | None) -> bool:
    """Have the model server load the adapter, unless it already answered a load of it; whether it was asked now."""
    name = target.adapter_name
    if name is None or folder is None or name in server.adapters:
        return False
    async with server.adapter_lock:
        if name in server.adapters:  # a concurrent request loaded it while this one waited
            return False
        async with httpx.AsyncClient(timeout=_TIMEOUT) as client:
            r = await client.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name,
                                                                               "lora_path": str(folder)})  # fmt: skip
        if r.status_code != 200:
            message = _upstream_message(r)
            if not (r.status_code == 400 and "already been loaded" in message):  # vLLM's answer to a repeat
                raise ServingError(f"fine-tuned model {target.public_name} cannot be loaded: {message}", 500)
        server.adapters.add(name)
    return True


class _AdapterGone(Exception):
    """The model server answered 404 for an adapter it had loaded (unloaded there since): load it again, once."""


def _gone(server: ModelProcess, target: service.Target, status: int, recheck: bool) -> None:
    if recheck and status == 404 and target.adapter_name is not None:
        server.adapters.discard(target.adapter_name)
        raise _AdapterGone


def _upstream_message(r: httpx.Response) -> str:
    """The message of a model server's error answer: OpenAI's shape, vLLM's older flat one, or the text."""
    try:
        body = r.json()
    except ValueError:
        return r.text or r.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        message = err.get("message") if isinstance(err, dict) else body.get("message") or body.get("detail")
        if message:
            return str(message)
    return r.text or r.reason_phrase


async def _proxy(
    request: Request, body: Sampling, target: service.Target, *, chat: bool, together_logprobs: bool
) -> Response:
    pool = _pool(request)
    folder = await _adapter_folder(request, target)
    try:
        if target.endpoint_id is not None:
            supervisor, endpoint_id = request.app.state.endpoints, target.endpoint_id
            server = await anyio.to_thread.run_sync(lambda: supervisor.acquire(endpoint_id))
        else:
            size = await _weights_bytes(request, target.base)
            server = await anyio.to_thread.run_sync(lambda: pool.acquire(target.base, size_hint=size))
    except PoolError as exc:
        raise ServingError(exc.message, exc.status_code) from None
    path = "/v1/chat/completions" if chat else "/v1/completions"
    extra: dict[str, Any] = {}
    if isinstance(body, ChatRequest):
        top = body.top_alternatives()
        extra = {"logprobs": top is not None, "top_logprobs": top or 0}
        extra["max_tokens"] = body.max_tokens or body.max_completion_tokens
        extra = {k: v for k, v in extra.items() if v is not None}
    payload = _model_body(body, target, extra)
    if body.stream:  # vLLM sends a stream's usage only when asked; wire.stream puts it where each SDK reads it
        payload["stream_options"] = {"include_usage": True}
    streaming = False
    try:
        loaded_now = await _ensure_adapter(server, target, folder)
        try:
            response = await _answer(pool, server, path, payload, body, target, chat=chat,
                                     together_logprobs=together_logprobs, recheck=not loaded_now)  # fmt: skip
        except _AdapterGone:
            await _ensure_adapter(server, target, folder)
            response = await _answer(pool, server, path, payload, body, target, chat=chat,
                                     together_logprobs=together_logprobs, recheck=False)  # fmt: skip
        streaming = isinstance(response, StreamingResponse)
        return response
    except httpx.HTTPError as exc:
        raise ServingError(f"the model server for {target.base.name} failed: {type(exc).__name__}", 502) from None
    finally:
        if not streaming:  # a stream releases its server when it ends
            pool.release(server)


async def _answer(
    pool: ModelServerPool,
    server: ModelProcess,
    path: str,
    payload: dict[str, Any],
    body: Sampling,
    target: service.Target,
    *,
    chat: bool,
    together_logprobs: bool,
    recheck: bool,
) -> Response:
    """The model server's answer, whole or streamed; `recheck`: a 404 raises _AdapterGone (the adapter was not loaded
    for this request, as the server had loaded it before)."""
    if body.stream:
        return await _stream(pool, server, path, payload, body, target, chat=chat,
                             together_logprobs=together_logprobs, recheck=recheck)  # fmt: skip
    async with httpx.AsyncClient(timeout=_TIMEOUT) as client:
        r = await client.post(f"{server.url}{path}", json=payload)
    answer = r.json()
    if r.status_code != 200:
        _gone(server, target, r.status_code, recheck)
        return _relay_error(r.status_code, answer)
    return JSONResponse(wire.whole(answer, model=target.public_name, chat=chat, together_logprobs=together_logprobs))


def _relay_error(status: int, answer: Any) -> Response:
    err = answer.get("error", {}) if isinstance(answer, dict) else {}
    message = err.get("message") or f"the model server answered {status}"
    kind = err.get("type") or ("invalid_request_error" if status < 500 else "server_error")
    headers = {"x-should-retry": "false"} if status >= 500 else None
    return JSONResponse(error_body(message, kind, err.get("param")), status_code=status, headers=headers)


async def _stream(
    pool: ModelServerPool,
    server: ModelProcess,
    path: str,
    payload: dict[str, Any],
    body: Sampling,
    target: service.Target,
    *,
    chat: bool,
    together_logprobs: bool,
    recheck: bool,
) -> Response:
    client = httpx.AsyncClient(timeout=_TIMEOUT)
    upstream = await client.send(client.build_request("POST", f"{server.url}{path}", json=payload), stream=True)
    if upstream.status_code != 200:
        content = await upstream.aread()
        await upstream.aclose()
        await client.aclose()
        _gone(server, target, upstream.status_code, recheck)
        return _relay_error(upstream.status_code, json.loads(content or b"{}"))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    done = False

    async def finish() -> None:
        """Close the upstream stream (the model server then frees the slot) and release the server, once: from the
        events' end, or from the response's background task when a client left before the events began."""
        nonlocal done
        if done:
            return
        done = True
        await upstream.aclose()
        await client.aclose()
        pool.release(server)

    async def events() -> AsyncIterator[bytes]:
        try:
            chunks = wire.stream(
                upstream.aiter_lines(),
                model=target.public_name,
                chat=chat,
                include_usage=include_usage,
                together_logprobs=together_logprobs,
            )
            async for chunk in chunks:
                yield chunk
        finally:  # a client that went away closes the upstream stream, and the model server frees its slot
            await finish()

    return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(finish))


_SERVED = {
    200: {
        "description": "The answer; with `stream`, server-sent events of chunks, then `data: [DONE]`",
        "content": {"application/json": {}, "text/event-stream": {}},
    },
    **errors(404, 500, 502, 503, 507),
}


@router.post("/chat/completions", responses=_SERVED)
async def chat_completions(
    request: Request, body: ChatRequest, principal: PrincipalDep, db: DbDep, catalog: CatalogDep
) -> Response:
    """Chat with a catalog model or one of your fine-tuned models (streamed as server-sent events, or not)."""
    target = await anyio.to_thread.run_sync(lambda: service.resolve_with_endpoints(
        db, catalog, owner=principal.owner, model=body.model))  # fmt: skip
    together_style = isinstance(body.logprobs, int) and not isinstance(body.logprobs, bool)
    return await _proxy(request, body, target, chat=True, together_logprobs=together_style)


@router.post("/completions", responses=_SERVED)
async def completions(
    request: Request, body: CompletionRequest, principal: PrincipalDep, db: DbDep, catalog: CatalogDep
) -> Response:
    """Continue a prompt with a catalog model or one of your fine-tuned models."""
    target = await anyio.to_thread.run_sync(lambda: service.resolve_with_endpoints(
        db, catalog, owner=principal.owner, model=body.model))  # fmt: skip
    return await _proxy(request, body, target, chat=False, together_logprobs=False)
