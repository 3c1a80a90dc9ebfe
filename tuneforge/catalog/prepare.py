"""`python -m tuneforge.catalog.prepare SOURCE_JSON CACHE_DIR`: prepare one catalog model before its first job, its GGUF
file converted or its hub snapshot downloaded into the training cache, exactly as the first run would do it
(`loading.resolve_model_dir`, under the same lock). Spawned by `catalog.background.start`.
"""

from __future__ import annotations

import sys

import msgspec

from tuneforge.catalog.loading import resolve_model_dir
from tuneforge.catalog.source import ModelSource


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m tuneforge.catalog.prepare SOURCE_JSON CACHE_DIR", file=sys.stderr)
        return 2
    source = msgspec.json.decode(args[0].encode(), type=ModelSource)
    try:
        folder = resolve_model_dir(source, args[1])
    except Exception as exc:
        print(f"preparing {source.name} failed: {exc}", file=sys.stderr)
        return 1
    print(f"{source.name} is ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
