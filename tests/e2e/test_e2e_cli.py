"""The real `together` CLI (2.42) against a live server: files upload/list/retrieve/download/delete, whoami.

Every CLI command first calls `GET /v3/whoami` (api-contract 3.13, 7.2), so each of these also checks it.
Output is asked for explicitly with `--json` / `--no-json`: the CLI's default depends on whether it
thinks an AI agent is running it.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import together
from e2e_support import (
    INVALID_LINE,
    TUNEFORGE_FILE_ID_RE,
    LiveServer,
    names_line,
    run_together,
    wait_processed_sdk,
)

pytestmark = pytest.mark.timeout(180)


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)


def test_cli_files_lifecycle(server: LiveServer, alice_key: str, valid_jsonl: Path, tmp_path: Path) -> None:
    def tg(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_together(server, alice_key, *args, cwd=tmp_path, check=check)

    up = tg("--no-json", "files", "upload", str(valid_jsonl))
    found = TUNEFORGE_FILE_ID_RE.findall(up.stdout)
    assert len(found) == 1, up.stdout
    file_id = found[0]

    out = tmp_path / "downloaded"
    out.mkdir()
    # Independent read-only commands, run side by side to save the CLI's start-up time.
    with ThreadPoolExecutor(3) as pool:
        listing = pool.submit(tg, "--json", "files", "list")
        retrieved = pool.submit(tg, "--json", "files", "retrieve", file_id)
        pool.submit(tg, "files", "download", file_id, "--output", str(out)).result()

    assert file_id in {f["id"] for f in as_json(listing.result())}
    got = as_json(retrieved.result())
    assert got["id"] == file_id
    assert got["filename"] == "train.jsonl"
    assert got["bytes"] == valid_jsonl.stat().st_size
    assert got["FileType"] == "jsonl"
    assert got["purpose"] == "fine-tune"
    assert (out / "train.jsonl").read_bytes() == valid_jsonl.read_bytes()

    tg("--json", "files", "delete", file_id)
    gone = tg("--no-json", "files", "retrieve", file_id, check=False)
    assert gone.returncode != 0
    assert "not found" in (gone.stdout + gone.stderr).lower()


def test_cli_upload_of_a_duplicate_names_the_existing_file(
    server: LiveServer, alice: together.Together, valid_jsonl: Path, tmp_path: Path
) -> None:
    first = alice.files.upload(file=valid_jsonl)
    again = run_together(server, server.keys["alice"], "--no-json", "files", "upload", str(valid_jsonl), cwd=tmp_path)
    assert "already exists" in again.stdout.lower(), again.stdout
    assert first.id in again.stdout


def test_cli_upload_of_a_dataset_the_server_rejects(
    server: LiveServer, alice: together.Together, invalid_jsonl: Path, tmp_path: Path
) -> None:
    # The CLI's local check is structural and passes; the server's check finds the bad role.
    up = run_together(server, server.keys["alice"], "--json", "files", "upload", str(invalid_jsonl), cwd=tmp_path)
    file_id = as_json(up)["id"]
    done = wait_processed_sdk(alice, file_id)
    assert done.processing_status == "INVALID_FORMAT"
    assert done.validation_report is not None
    assert names_line(done.validation_report.error, INVALID_LINE), done.validation_report


def test_cli_whoami(server: LiveServer, alice: together.Together, alice_key: str, tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        as_json_run = pool.submit(run_together, server, alice_key, "--json", "whoami", cwd=tmp_path)
        text_run = pool.submit(run_together, server, alice_key, "--no-json", "whoami", cwd=tmp_path)
    body = as_json(as_json_run.result())
    me = alice.whoami()
    assert body["type"] == "project_api_key"
    assert body["api_key"]["id"] == me.api_key_id
    assert body["project"]["id"] == me.project_id
    assert me.api_key_id in text_run.result().stdout


def test_cli_with_a_bad_key_fails_with_the_servers_message(server: LiveServer, tmp_path: Path) -> None:
    proc = run_together(server, "tf-not-a-key", "--no-json", "files", "list", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "invalid or revoked api key" in (proc.stdout + proc.stderr).lower()
