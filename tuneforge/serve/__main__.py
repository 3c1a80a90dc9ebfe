"""`python -m tuneforge.serve --source JSON --cache-dir DIR --port P`: one model server process.

It makes the model's local folder (converting a GGUF or downloading once, as training does), loads it into the
transformers engine and serves the OpenAI protocol of `serve/app.py` on 127.0.0.1 until it is terminated.

`--prepare-only` makes the folder, prints its path as the last line of stdout and exits, loading no engine. With
`--exec-model-at N -- COMMAND...` it then replaces itself with COMMAND, the folder inserted after COMMAND's first N
words and the `--exec-unset` names left out of its environment: how the vLLM backend starts vLLM
(`backends/vllm.py`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

import msgspec
import uvicorn

from tuneforge.catalog.source import ModelSource


def _prepare(source: ModelSource, cache_dir: str, storage_url: str) -> Path:
    from tuneforge.catalog.loading import resolve_model_dir

    blobs = None
    if storage_url:
        from tuneforge.storage import open_blob_store

        blobs = open_blob_store(storage_url)
    return resolve_model_dir(source, cache_dir, blobs=blobs)


def _exec(command: list[str], folder: Path, at: int, unset: list[str]) -> NoReturn:
    """Become `command` with `folder` after its first `at` words; never returns (exit 127 when it cannot run)."""
    if not command or not 0 < at <= len(command):
        sys.exit(f"--exec-model-at {at}: the command after -- has {len(command)} words")
    argv = [*command[:at], str(folder), *command[at:]]
    env = {k: v for k, v in os.environ.items() if k not in unset}
    print(f"starting: {shlex.join(argv)}", file=sys.stderr, flush=True)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        print(f"cannot start {argv[0]!r}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    command: list[str] = []
    if "--" in args_in:
        at = args_in.index("--")
        args_in, command = args_in[:at], args_in[at + 1 :]
    parser = argparse.ArgumentParser(prog="python -m tuneforge.serve")
    parser.add_argument("--source", required=True, help="the model's ModelSource, as JSON")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--prepare-only", action="store_true",
                        help="make the model's local folder, print its path (last stdout line) and exit")  # fmt: skip
    parser.add_argument("--exec-model-at", type=int, default=None,
                        help="with --prepare-only: then become the command after --, with the folder inserted "
                        "after its first N words")  # fmt: skip
    parser.add_argument("--exec-unset", default="", help="comma-separated names left out of the command's environment")
    parser.add_argument("--port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--storage-url", default="", help="blob store of fine-tuned outputs (source kind output)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the GPUs CUDA_VISIBLE_DEVICES leaves)")
    args = parser.parse_args(args_in)
    if command and args.exec_model_at is None:
        parser.error("a command after -- needs --exec-model-at")
    if args.exec_model_at is not None and not args.prepare_only:
        parser.error("--exec-model-at needs --prepare-only")
    if not args.prepare_only and args.port is None:
        parser.error("the following arguments are required: --port")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = msgspec.json.decode(args.source.encode(), type=ModelSource)

    if args.prepare_only:
        folder = _prepare(source, args.cache_dir, args.storage_url)
        print(folder, flush=True)
        if args.exec_model_at is not None:
            _exec(command, folder, args.exec_model_at, [n for n in args.exec_unset.split(",") if n])
        return

    import torch

    from tuneforge.serve.app import ModelServer, create_model_app
    from tuneforge.serve.engine import TransformersEngine
    from tuneforge.serve.threads import off_thread
    from tuneforge.serve.vision_engine import VisionEngine
    from tuneforge.train.hardware import set_threads
    from tuneforge.train.vision import is_vision_model

    set_threads(args.threads)
    # Torch work on the main thread would slow the engine's step thread for the life of the process (off_thread).
    folder = off_thread(lambda: _prepare(source, args.cache_dir, args.storage_url))
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    engine: TransformersEngine | VisionEngine
    if is_vision_model(folder):  # its config has a vision tower: images and text, one request at a time
        engine = VisionEngine(folder, device=args.device, dtype=dtype, max_loras=args.max_loras)
    else:
        engine = TransformersEngine(folder, device=args.device, dtype=dtype, max_batch=args.max_batch,
                                    max_loras=args.max_loras)  # fmt: skip
    engine.start()
    try:
        vision = engine.processor if isinstance(engine, VisionEngine) else None
        app = create_model_app(ModelServer(engine, base_name=source.name, model_dir=folder, vision=vision))
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
