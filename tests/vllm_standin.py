"""A loopback stand-in for vLLM's OpenAI server (`vllm serve MODEL ...`), for tests without a GPU.

Started the way tuneforge starts vLLM (`TUNEFORGE_VLLM_COMMAND="<python> .../vllm_standin.py"`, so its argv is
`vllm serve`'s with this script in place of `vllm serve`), it:

- parses vLLM's command line as vLLM does and exits 2 on a flag vLLM would not take, or on a value vLLM would
  refuse (a LoRA rank outside its list, --max-cpu-loras below --max-loras, a model folder without config.json);
  it also exits 2 when a flag tuneforge must pass is missing (--host, --port, --served-model-name, --enable-lora);
- writes what it was given (argv, environment names, the values of VLLM_* and CUDA_VISIBLE_DEVICES) as JSON to
  the file `VLLM_STANDIN_RECORD` names, before anything else can fail;
- appends one JSON line per `/v1/load_lora_adapter` request it receives (its pid, lora_name, lora_path), whatever
  the answer, to the file `VLLM_STANDIN_LOADS` names;
- serves `/health`, `/v1/models`, `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (only when
  VLLM_ALLOW_RUNTIME_LORA_UPDATING is true: otherwise vLLM does not add these routes, and they are 404s), and
  `/v1/chat/completions`, `/v1/completions`, streamed or not, in vLLM's shapes: a chat stream's first chunk
  alone has `role` in its delta, `usage` comes only as a last chunk with no choices and only when
  `stream_options.include_usage` asks, a second load of a loaded name is a 400, and an adapter holding
  lm_head / embed_tokens weights or a rank above --max-lora-rank does not load.

The text it "generates" is deterministic and names the model asked for: `[MODEL] you said: LAST USER WORDS ...`, one
word per token, cut at max_tokens (finish_reason "length") or ending "stop".

Only the standard library, FastAPI and uvicorn.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
REFUSED = ("lm_head", "embed_tokens")
RECORD_ENV = "VLLM_STANDIN_RECORD"
LOADS_ENV = "VLLM_STANDIN_LOADS"
MAX_MODEL_LEN = 2048


def _truthy(value: str | None) -> bool:
    # vllm.envs: VLLM_ALLOW_RUNTIME_LORA_UPDATING is true for "1" or "true", any case.
    return (value or "").strip().lower() in ("1", "true")


def parser() -> argparse.ArgumentParser:
    """The part of `vllm serve`'s command line this stand-in knows (flag names as in vLLM's arg_utils.py and
    entrypoints/openai/cli_args.py); any other flag is an error, as it would be for vLLM."""
    p = argparse.ArgumentParser(prog="vllm serve", allow_abbrev=False)
    p.add_argument("model_tag", nargs="?", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-lora-rank", type=int, default=16, choices=LORA_RANKS)
    p.add_argument("--max-cpu-loras", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=None)
    return p


def record(args_ok: bool) -> None:
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    shown = {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k == "CUDA_VISIBLE_DEVICES"}
    data = {"argv": sys.argv, "env_keys": sorted(os.environ), "env": shown, "args_ok": args_ok, "pid": os.getpid()}
    Path(path).write_text(json.dumps(data, indent=2))


def record_load(body: dict[str, Any]) -> None:
    path = os.environ.get(LOADS_ENV)
    if path:
        with open(path, "a") as fh:
            line = {"pid": os.getpid(), "lora_name": body.get("lora_name"), "lora_path": body.get("lora_path")}
            fh.write(json.dumps(line) + "\n")


def fail(message: str) -> None:
    print(f"vllm serve: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check(args: argparse.Namespace) -> Path:
    if args.model_tag and args.model and args.model_tag != args.model:
        print("warning: the positional model overrides --model", file=sys.stderr)
    model = args.model_tag or args.model
    if not model:
        fail("no model (vllm serve MODEL, or --model MODEL)")
    folder = Path(model)
    if not (folder / "config.json").is_file():
        fail(f"{model} is not a local model folder with a config.json (no hub here)")
    max_cpu = args.max_cpu_loras if args.max_cpu_loras is not None else args.max_loras
    if max_cpu < args.max_loras:
        fail(f"max_cpu_loras ({max_cpu}) must be >= max_loras ({args.max_loras})")
    missing = [flag for flag, value in (("--host", args.host), ("--served-model-name", args.served_model_name),
                                        ("--enable-lora", args.enable_lora)) if not value]  # fmt: skip
    if "--port" not in sys.argv:
        missing.append("--port")
    if missing:
        fail(f"tuneforge must pass {', '.join(missing)}")
    return folder


# --- adapters -----------------------------------------------------------------------------------------------


def adapter_refusal(path: Path, max_rank: int) -> str | None:
    """Why vLLM would not load this adapter (an independent reading, not tuneforge's check), or None."""
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        return f"No adapter found for {path}"
    config = json.loads(config_path.read_text())
    if config.get("modules_to_save"):
        return f"LoRA adapter with modules_to_save {config['modules_to_save']} is not supported"
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        with open(weights, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            names = [k for k in json.loads(fh.read(size)) if k != "__metadata__"]
        bad = sorted({m for n in names for m in REFUSED if m in n.split(".")})
        if bad:
            return f"While loading {path}, expected target modules without {bad}, but received {bad}"
    rank = int(config.get("r") or 0)
    if rank > max_rank:
        return f"LoRA rank {rank} is greater than max_lora_rank {max_rank}."
    return None


# --- generation ---------------------------------------------------------------------------------------------


def words_of(body: dict[str, Any], chat: bool) -> tuple[list[str], int]:
    """(the answer's words, the prompt's token count) for a request, deterministically."""
    if chat:
        messages = body.get("messages") or []
        users = [m for m in messages if m.get("role") == "user"]
        last = users[-1].get("content") if users else ""
        text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last or [])
        prompt_tokens = sum(len(str(m.get("content") or "").split()) + 4 for m in messages) + 2
    else:
        text = str(body.get("prompt", ""))
        prompt_tokens = len(text.split()) + 1
    model = body.get("model")
    return [f"[{model}]", "you", "said:", *text.split()], prompt_tokens


def pieces(words: list[str], max_tokens: int) -> tuple[list[str], str]:
    cut = words[:max_tokens]
    return [w if i == 0 else " " + w for i, w in enumerate(cut)], ("length" if len(words) > max_tokens else "stop")


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
            "prompt_tokens_details": None}  # fmt: skip


def chat_logprobs(piece_list: list[str], top: int) -> dict[str, Any]:
    return {"content": [
        {"token": p, "logprob": -0.5, "bytes": list(p.encode()),
         "top_logprobs": [{"token": p, "logprob": -0.5 - j, "bytes": list(p.encode())} for j in range(top)]}
        for p in piece_list
    ]}  # fmt: skip


def main() -> None:
    try:
        args = parser().parse_args()
    except SystemExit:
        record(False)
        raise
    record(True)
    folder = check(args)
    served = args.served_model_name[0]
    runtime_lora = _truthy(os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING"))

    app = FastAPI()
    loras: dict[str, str] = {}

    def error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)

    @app.get("/health")
    def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        cards = [{"id": served, "object": "model", "created": int(time.time()), "owned_by": "vllm",
                  "root": str(folder), "parent": None, "max_model_len": MAX_MODEL_LEN}]  # fmt: skip
        cards += [{"id": name, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": path,
                   "parent": served, "max_model_len": None} for name, path in loras.items()]  # fmt: skip
        return {"object": "list", "data": cards}

    if runtime_lora:  # vLLM adds these routes only then

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request) -> Response:
            body = await request.json()
            record_load(body)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                return error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
            if name in loras and not body.get("load_inplace"):
                return error(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                                  "adapter in place, set 'load_inplace' to True.", "InvalidUserInput")  # fmt: skip
            if not Path(path).is_dir():
                return error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
            refusal = adapter_refusal(Path(path), args.max_lora_rank)
            if refusal:
                return error(500, refusal, "InternalServerError")
            loras[name] = str(path)
            return Response(f"Success: LoRA adapter '{name}' added successfully.", status_code=200)

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request) -> Response:
            body = await request.json()
            name = body.get("lora_name")
            if name not in loras:
                return error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del loras[name]
            return Response(f"Success: LoRA adapter '{name}' removed successfully.", status_code=200)

    async def complete(request: Request, chat: bool) -> Response:
        body = await request.json()
        model = body.get("model")
        if model != served and model not in loras:
            return error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        words, prompt_tokens = words_of(body, chat)
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or 16)
        if prompt_tokens + max_tokens > MAX_MODEL_LEN:
            return error(400, f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
                              f"requested {prompt_tokens + max_tokens} tokens.", "BadRequestError")  # fmt: skip
        text_pieces, finish = pieces(words, max_tokens)
        top = int(body.get("top_logprobs") or 0)
        want_logprobs = bool(body.get("logprobs"))
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model}  # fmt: skip
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(meta, chat, n, text_pieces, finish, prompt_tokens, include_usage,
                                            want_logprobs, top), media_type="text/event-stream")  # fmt: skip
        choices = []
        for i in range(n):
            if chat:
                message = {"role": "assistant", "content": "".join(text_pieces), "refusal": None,
                           "annotations": None, "audio": None, "function_call": None, "tool_calls": [],
                           "reasoning_content": None}  # fmt: skip
                lp = chat_logprobs(text_pieces, top) if want_logprobs else None
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish,
                                "stop_reason": None})  # fmt: skip
            else:
                choices.append({"index": i, "text": "".join(text_pieces), "logprobs": None, "finish_reason": finish,
                                "stop_reason": None, "prompt_logprobs": None})  # fmt: skip
        answer = {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                  "usage": usage(prompt_tokens, n * len(text_pieces)), "prompt_logprobs": None,
                  "kv_transfer_params": None}  # fmt: skip
        if chat:
            answer |= {"service_tier": None, "system_fingerprint": None}
        if body.get("return_token_ids"):
            answer["prompt_token_ids"] = list(range(1, prompt_tokens + 1))
        return JSONResponse(answer)

    def stream(meta: dict[str, Any], chat: bool, n: int, text_pieces: list[str], finish: str, prompt_tokens: int,
               include_usage: bool, want_logprobs: bool, top: int) -> Iterator[bytes]:  # fmt: skip
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + json.dumps({**meta, "object": obj, "choices": choices, **extra}).encode() + b"\n\n"

        for i in range(n):
            if chat:  # vLLM: the role comes once, in a first chunk of its own
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])  # fmt: skip
            for piece in text_pieces:
                if chat:
                    lp = chat_logprobs([piece], top) if want_logprobs else None
                    yield event([{"index": i, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None}])
                else:
                    yield event([{"index": i, "text": piece, "logprobs": None, "finish_reason": None,
                                  "stop_reason": None}])  # fmt: skip
            if chat:
                yield event([{"index": i, "delta": {"content": ""}, "logprobs": None, "finish_reason": finish,
                              "stop_reason": None}])  # fmt: skip
            else:
                yield event([{"index": i, "text": "", "logprobs": None, "finish_reason": finish,
                              "stop_reason": None}])  # fmt: skip
        if include_usage:
            yield event([], usage=usage(prompt_tokens, n * len(text_pieces)))
        yield b"data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    print(f"vllm stand-in: serving {served} from {folder} on {args.host}:{args.port} (runtime LoRA "
          f"{'on' if runtime_lora else 'off'})", flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
