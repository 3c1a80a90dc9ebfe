"""The `tuneforge` command: serve | keys | check | demo."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tuneforge.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tuneforge: self-hosted LLM fine-tuning.")
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
app.add_typer(keys_app, name="keys")
models_app = typer.Typer(no_args_is_help=True, help="The model catalog: list, add and remove base models.")
app.add_typer(models_app, name="models")

HomeOpt = Annotated[
    Path | None, typer.Option("--home", help="tuneforge home folder (default: $TUNEFORGE_HOME or ~/.tuneforge)")
]


def _settings(home: Path | None, **overrides: Any) -> Settings:
    values = {k: v for k, v in overrides.items() if v is not None}
    if home is not None:
        values["home"] = home
    return Settings(**values)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on")] = None,
    home: HomeOpt = None,
) -> None:
    """Run the API server (OpenAPI docs at /docs)."""
    import uvicorn

    from tuneforge.api.app import create_app

    settings = _settings(home, host=host, port=port)
    application = create_app(settings)
    typer.echo(f"tuneforge serving on http://{settings.host}:{settings.port}/v1 (home {settings.home})", err=True)
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=settings.log_level)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="a label for the key")],
    owner: Annotated[
        str | None, typer.Option("--owner", help="who owns what the key creates (default: the name)")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Create an API key and print it (only the key, so scripts can capture it)."""
    from tuneforge.store import open_database
    from tuneforge.store.keys import create_key

    settings = _settings(home)
    settings.ensure_home()
    db = open_database(settings.database_url)
    with db.session() as s:
        _, secret = create_key(s, name=name, owner=owner or name)
    typer.echo(secret)


@keys_app.command("list")
def keys_list(home: HomeOpt = None) -> None:
    """List API keys (never the secrets)."""
    from tuneforge.store import open_database
    from tuneforge.store.keys import list_keys

    settings = _settings(home)
    settings.ensure_home()
    db = open_database(settings.database_url)
    with db.session() as s:
        rows = list_keys(s)
        typer.echo(f"{'ID':<22} {'NAME':<20} {'OWNER':<20} {'PREFIX':<8} STATUS")
        for r in rows:
            status = "revoked" if r.revoked_at else "active"
            typer.echo(f"{r.id:<22} {r.name:<20} {r.owner:<20} {r.prefix:<8} {status}")


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="key id (key-…) or name")],
    home: HomeOpt = None,
) -> None:
    """Revoke a key by id, or every active key with that name."""
    from tuneforge.errors import NotFoundError
    from tuneforge.store import open_database
    from tuneforge.store.keys import revoke_key

    settings = _settings(home)
    settings.ensure_home()
    db = open_database(settings.database_url)
    try:
        with db.session() as s:
            rows = revoke_key(s, key_id_or_name=key)
            for r in rows:
                typer.echo(f"revoked {r.id} ({r.name})")
    except NotFoundError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc


@models_app.command("list")
def models_list(home: HomeOpt = None) -> None:
    """List the catalog: name, source and the main limits."""
    from tuneforge.catalog.cache import model_folder
    from tuneforge.catalog.registry import Catalog
    from tuneforge.storage import open_blob_store

    settings = _settings(home)
    settings.ensure_home()
    cache = settings.home / "models"
    typer.echo(f"{'NAME':<50} {'SOURCE':<60} {'PARAMS':>7} {'MAX SEQ':>8} {'LORA':>5} {'FULL':>5} {'DPO':>5} "
               f"{'VISION':>6} {'DOWNLOADED':>10}")  # fmt: skip
    for e in Catalog(open_blob_store(settings.storage_url), hosted=settings.hosted_catalog).list():
        source = f"{e.source_kind}:{e.source}"
        lim = e.limits
        params = f"{e.params / 1e9:.2g}B" if e.params and e.params >= 1e9 else (
            f"{e.params / 1e6:.0f}M" if e.params else "-")  # fmt: skip
        downloaded = model_folder(cache, e) is not None
        typer.echo(
            f"{e.name:<50} {source:<60} {params:>7} {lim.max_seq_length:>8} {lim.supports_lora!s:>5} "
            f"{lim.supports_full!s:>5} {lim.supports_dpo!s:>5} {lim.supports_vision!s:>6} {downloaded!s:>10}"
        )


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Argument(help="the name jobs will use, e.g. my-org/my-model")],
    source: Annotated[str, typer.Option(help="hub:ORG/NAME, local:/path/to/folder, gguf:/path/file.gguf")],
    revision: Annotated[str | None, typer.Option(help="hub revision (branch, tag or commit)")] = None,
    max_seq_length: Annotated[int | None, typer.Option(help="longest training sequence")] = None,
    no_full: Annotated[bool, typer.Option("--no-full", help="refuse full fine-tuning")] = False,
    vision: Annotated[
        bool, typer.Option("--vision", help="a vision-language model (a local folder's config.json says so itself)")
    ] = False,
    replace: Annotated[bool, typer.Option("--replace", help="replace an entry of the same name")] = False,
    home: HomeOpt = None,
) -> None:
    """Add a base model to the catalog."""
    from tuneforge.catalog.entries import SOURCE_KINDS, ModelEntry
    from tuneforge.catalog.registry import Catalog
    from tuneforge.errors import TuneForgeError
    from tuneforge.storage import open_blob_store

    kind, _, location = source.partition(":")
    if kind not in SOURCE_KINDS or not location:
        typer.echo(f"error: --source must be KIND:LOCATION with KIND one of {', '.join(SOURCE_KINDS)}", err=True)
        raise typer.Exit(2)
    if kind in ("local", "gguf"):
        location = str(Path(location).expanduser().resolve())
        if not Path(location).exists():
            typer.echo(f"error: {location} does not exist", err=True)
            raise typer.Exit(2)
    if kind == "local" and not vision:
        vision = _has_vision_tower(Path(location))
    changes: dict[str, Any] = {"supports_full": not no_full, "supports_vision": vision, "supports_dpo": not vision}
    if max_seq_length is not None:
        changes.update(max_seq_length=max_seq_length, max_seq_length_dpo=max_seq_length)
    entry = ModelEntry(name=name, source_kind=kind, source=location, revision=revision).with_limits(**changes)  # type: ignore[arg-type]
    settings = _settings(home)
    settings.ensure_home()
    try:
        Catalog(open_blob_store(settings.storage_url), hosted=settings.hosted_catalog).add(entry, replace=replace)
    except TuneForgeError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"added {name} ({kind}:{location})")


def _has_vision_tower(folder: Path) -> bool:
    """A local model folder whose config.json has a vision tower (`vision_config`): a vision-language model."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("vision_config") is not None


@models_app.command("remove")
def models_remove(name: Annotated[str, typer.Argument()], home: HomeOpt = None) -> None:
    """Remove a model that was added to the catalog."""
    from tuneforge.catalog.registry import Catalog
    from tuneforge.errors import TuneForgeError
    from tuneforge.storage import open_blob_store

    settings = _settings(home)
    settings.ensure_home()
    try:
        Catalog(open_blob_store(settings.storage_url), hosted=settings.hosted_catalog).remove(name)
    except TuneForgeError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"removed {name}")


@app.command()
def worker(home: HomeOpt = None) -> None:
    """Run the job worker on its own (for servers started with TUNEFORGE_RUN_WORKER=false)."""
    import signal
    import threading

    from tuneforge.jobs.executors.registry import make_executor
    from tuneforge.jobs.worker import Worker
    from tuneforge.storage import open_blob_store
    from tuneforge.store import open_database
    from tuneforge.store.sealing import home_key

    settings = _settings(home)
    settings.ensure_home()
    runner = Worker(
        open_database(settings.database_url, secrets_key=home_key(settings.home, settings.secrets_key)),
        open_blob_store(settings.storage_url),
        settings,
        make_executor(settings.executor, settings),
        slots=settings.train_slots,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    runner.start()
    typer.echo(f"tuneforge worker running ({settings.executor} executor, {settings.train_slots} slot(s))", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        done.wait()
    runner.stop()


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="a .jsonl, .parquet or .csv dataset")],
    purpose: Annotated[str, typer.Option(help="fine-tune, eval, calibration or batch-api")] = "fine-tune",
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON (SDK check_file keys)")] = False,
) -> None:
    """Check a dataset file the way the server will, and say what is wrong and where."""
    from tuneforge.data import check_file, render_text

    report = check_file(file, purpose=purpose)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        typer.echo(render_text(report))
    raise typer.Exit(0 if report.get("is_check_passed") else 1)


@app.command()
def demo(
    home: HomeOpt = None,
    port: Annotated[int, typer.Option(help="port for the demo server (0: a free one)")] = 0,
) -> None:
    """The end-to-end demo: start a server, then check and upload a sample dataset with the together SDK."""
    from tuneforge.demo import run_demo

    sys.exit(run_demo(home=home, port=port))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
