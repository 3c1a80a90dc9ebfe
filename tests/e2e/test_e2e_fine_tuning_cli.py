"""The real `together` CLI (2.42) drives fine-tuning on a live server: create, retrieve, list, list-events,
list-checkpoints, download, cancel and delete, as subprocesses, checked by exit code and output.

Every command first calls `GET /v3/whoami` (api-contract 3.13). Output is asked for explicitly with `--json` /
`--no-json` (the CLI's default depends on whether it thinks an AI agent runs it). Independent commands run side by
side: each pays the CLI's start-up time of a few seconds.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import LiveServer, unique, write_jsonl
from ft_support import (
    JOB_ID_RE,
    TERMINAL,
    TINY_LLAMA,
    Watch,
    client,
    event_types,
    ft_server,
    intermediate_steps,
    qa_records,
    run_together,
    run_together_all,
    skip_without_training,
    upload_ready,
)
from together import Together

pytestmark = pytest.mark.timeout(240)

EPOCHS, BATCH, EXAMPLES = 2, 2, 8
STEPS = EPOCHS * EXAMPLES // BATCH


@pytest.fixture(scope="module")
def ft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    skip_without_training()
    with ft_server(tmp_path_factory.mktemp("ft-cli"), owners=("alice",), slots=1) as server:
        yield server


@pytest.fixture(scope="module")
def alice(ft: LiveServer) -> Together:
    return client(ft, ft.keys["alice"])


def as_json(proc: Any) -> Any:
    return json.loads(proc.stdout)


def created_id(proc: Any) -> str:
    found = set(JOB_ID_RE.findall(proc.stdout))
    assert len(found) == 1, f"expected one job id in the output of create:\n{proc.stdout}\n{proc.stderr}"
    return found.pop()


def assert_tar_gz(path: Path, size: int) -> list[str]:
    assert path.is_file(), path
    assert path.name.endswith(".tar.gz"), path.name
    assert path.stat().st_size == size
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    with tarfile.open(path, "r:gz") as tar:
        return tar.getnames()


def test_cli_create_inspect_download_delete(ft: LiveServer, alice: Together, tmp_path: Path) -> None:
    key = ft.keys["alice"]
    file_id = upload_ready(alice, tmp_path / "facts.jsonl", qa_records(EXAMPLES, nonce=unique()))

    def tg(*args: str, check: bool = True) -> Any:
        return run_together(ft, key, *args, cwd=tmp_path, check=check)

    create = tg(
        "--no-json", "fine-tuning", "create", "-t", file_id, "-M", TINY_LLAMA, "--lora",
        "--n-epochs", str(EPOCHS), "--batch-size", str(BATCH), "--no-packing", "--lr", "0.01",
        "--n-checkpoints", "2", "--suffix", "cli", "-y",
    )  # fmt: skip
    job_id = created_id(create)
    job = Watch(alice, job_id).completed(timeout=150)
    assert job.model == TINY_LLAMA and job.suffix == "cli" and job.n_epochs == EPOCHS
    assert job.learning_rate == pytest.approx(0.01)
    step = intermediate_steps(alice, job_id)[0]

    # `-o` names the archive file itself (the CLI's help says "directory", its code writes to the path given).
    out = {name: tmp_path / "out" / f"{name}.tar.gz" for name in ("adapter", "step")}
    out["step"].parent.mkdir()
    (
        ret_json, ret_text, list_text, ev_json, ev_text, cp_json, cp_text, dl_merged, dl_adapter, dl_step, no_cancel,
    ) = run_together_all(ft, key, [
        ("--json", "fine-tuning", "retrieve", job_id),
        ("--no-json", "fine-tuning", "retrieve", job_id),  # with the metric plots
        ("--no-json", "fine-tuning", "list"),
        ("--json", "fine-tuning", "list-events", job_id),
        ("--no-json", "fine-tuning", "list-events", job_id),
        ("--json", "fine-tuning", "list-checkpoints", job_id),
        ("--no-json", "fine-tuning", "list-checkpoints", job_id),
        ("--json", "fine-tuning", "download", job_id),  # no -o: named after the job's output model
        ("--json", "fine-tuning", "download", job_id, "-c", "adapter", "-o", str(out["adapter"])),
        ("--json", "fine-tuning", "download", f"{job_id}:{step}", "-o", str(out["step"])),
        ("--no-json", "--non-interactive", "fine-tuning", "cancel", job_id),
    ], cwd=tmp_path, check=False)  # fmt: skip

    for proc in (ret_json, ret_text, list_text, ev_json, ev_text, cp_json, cp_text):
        assert proc.returncode == 0, f"{proc.args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    got = as_json(ret_json)
    assert got["id"] == job_id and got["status"] == "completed" and got["model"] == TINY_LLAMA, got
    assert job_id in ret_text.stdout and "completed" in ret_text.stdout, ret_text.stdout
    assert job_id in list_text.stdout, list_text.stdout
    types = [e["type"] for e in as_json(ev_json)]
    assert types[0] == "job_pending" and types[-1] == "job_complete", types
    assert "job_complete" in ev_text.stdout and "Fine-tune job created" in ev_text.stdout, ev_text.stdout
    kinds = {c["checkpoint_type"] for c in as_json(cp_json)}
    assert {"Final Merged", "Final Adapter", "Intermediate"} <= kinds, kinds
    assert f"{job_id}:{step}" in cp_text.stdout, cp_text.stdout  # the CLI names intermediate rows ID:STEP

    archives = {}
    for name, proc in (("merged", dl_merged), ("adapter", dl_adapter), ("step", dl_step)):
        assert proc.returncode == 0, f"download {name}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        info = as_json(proc)
        path = tmp_path / info["filename"]
        archives[name] = assert_tar_gz(path, int(info["size"]))
        if name in out:
            assert path.resolve() == out[name].resolve(), info
        else:
            assert path.resolve() == (tmp_path / f"{job.x_model_output_name}.tar.gz").resolve(), info
    assert "model.safetensors" in archives["merged"], archives["merged"]
    assert "adapter_model.safetensors" in archives["adapter"], archives["adapter"]
    assert "adapter_model.safetensors" in archives["step"], archives["step"]

    # A completed job cannot be cancelled: the CLI says so and exits non-zero.
    assert no_cancel.returncode != 0, no_cancel.stdout
    assert "not currently cancellable" in no_cancel.stdout + no_cancel.stderr, no_cancel.stdout + no_cancel.stderr

    deleted = tg("--no-json", "fine-tuning", "delete", job_id, "--force")
    assert "deleted" in deleted.stdout.lower(), deleted.stdout
    gone = tg("--no-json", "fine-tuning", "retrieve", job_id, check=False)
    assert gone.returncode != 0
    assert "not found" in (gone.stdout + gone.stderr).lower(), gone.stdout + gone.stderr


def test_cli_create_from_a_local_file_then_cancel(ft: LiveServer, alice: Together, tmp_path: Path) -> None:
    key = ft.keys["alice"]
    # A local path: the CLI uploads it first. Long enough (960 steps) to be cancelled while it trains.
    path = write_jsonl(tmp_path / "long.jsonl", qa_records(48, nonce=unique()))

    def tg(*args: str, check: bool = True) -> Any:
        return run_together(ft, key, *args, cwd=tmp_path, check=check)

    create = tg(
        "--no-json", "fine-tuning", "create", "--training-file", str(path), "--model", TINY_LLAMA, "--lora",
        "--n-epochs", "20", "--batch-size", "1", "--no-packing", "--suffix", "cli-cancel", "--confirm",
    )  # fmt: skip
    job_id = created_id(create)
    watch = Watch(alice, job_id)
    running = watch.until(lambda j: j.status in TERMINAL or j.status == "running", timeout=60, what="running")
    assert running.status == "running", running.status
    assert running.training_file and running.training_file.startswith("file-")

    cancel = tg("--no-json", "--non-interactive", "fine-tuning", "cancel", job_id)
    assert re.search(r"cancel", cancel.stdout, re.IGNORECASE), cancel.stdout
    done = watch.finished(timeout=60)
    assert done.status == "cancelled", done.status
    assert "cancel_requested" in event_types(alice, job_id)

    again = tg("--no-json", "--non-interactive", "fine-tuning", "cancel", job_id, check=False)
    assert again.returncode != 0
    assert "cancelled" in again.stdout + again.stderr, again.stdout + again.stderr
