"""`python -m tuneforge.serve --source JSON --cache-dir DIR --port P`: one model server process.

It makes the model's local folder (converting a GGUF or downloading once, as training does), loads it into the
transformers engine and serves the OpenAI protocol of `serve/app.py` on 127.0.0.1 until it is terminated.
"""

from __future__ import annotations

import argparse
import logging

import msgspec
import uvicorn

from tuneforge.catalog.source import ModelSource


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tuneforge.serve")
    parser.add_argument("--source", required=True, help="the model's ModelSource, as JSON")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--storage-url", default="", help="blob store of fine-tuned outputs (source kind output)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from tuneforge.catalog.loading import resolve_model_dir
    from tuneforge.serve.app import ModelServer, create_model_app
    from tuneforge.serve.engine import TransformersEngine
    from tuneforge.train.hardware import set_threads

    set_threads(args.threads)
    source = msgspec.json.decode(args.source.encode(), type=ModelSource)
    blobs = None
    if args.storage_url:
        from tuneforge.storage import open_blob_store

        blobs = open_blob_store(args.storage_url)
    folder = resolve_model_dir(source, args.cache_dir, blobs=blobs)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    engine = TransformersEngine(folder, dtype=dtype, max_batch=args.max_batch, max_loras=args.max_loras)
    engine.start()
    try:
        app = create_model_app(ModelServer(engine, base_name=source.name, model_dir=folder))
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
