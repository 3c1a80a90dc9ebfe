"""The `tuneforge` command: serve | keys | check | demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tuneforge.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tuneforge: self-hosted LLM fine-tuning.")
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
app.add_typer(keys_app, name="keys")

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
