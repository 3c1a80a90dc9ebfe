"""The end-to-end demo (`tuneforge demo`): a real server, a real dataset, the real together SDK.

Starts `tuneforge serve` as a child process, creates an API key, checks the shipped customer-support
dataset locally, shows what the checker says about a broken copy, uploads it with the together SDK,
waits for the server's own verdict, then LoRA fine-tunes SmolLM2-135M-Instruct on it with a live
progress line and asks the result a question from the data (see demo/finetune.py). It talks to the
server over HTTP only, like any user.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tuneforge.settings import Settings

DATASET = Path(__file__).parent / "support.jsonl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy in time")


def run_demo(*, home: Path | None = None, port: int = 0) -> int:
    """Run the demo; returns a process exit code."""
    from together import Together

    from tuneforge.data import check_file, render_text
    from tuneforge.store import open_database
    from tuneforge.store.files import STILL_CHECKING, FileProcessingStatus
    from tuneforge.store.keys import create_key

    settings = Settings(home=home) if home is not None else Settings()
    settings.ensure_home()
    port = port or _free_port()
    base = f"http://127.0.0.1:{port}"

    _say(f"starting the tuneforge server on {base} (home {settings.home})")
    log_path = settings.home / "demo-server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tuneforge.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--home",
                str(settings.home),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_healthy(base, proc)
        with open_database(settings.database_url).session() as s:
            _, api_key = create_key(s, name="demo", owner="demo")
        print(f"server is up; API docs at {base}/docs; created API key {api_key[:7]}…")

        work = Path(tempfile.mkdtemp(prefix="tuneforge-demo-"))
        train = work / "support.jsonl"
        shutil.copy(DATASET, train)

        _say(f"checking {train.name} locally with `tuneforge check`")
        report = check_file(train)
        print(render_text(report))
        if not report["is_check_passed"]:
            return 1

        _say("the same checker on a broken copy (a typo in a role on line 2, a weight of 2 on line 3)")
        lines = train.read_text().splitlines()
        broken_rows = [json.loads(line) for line in lines[:4]]
        broken_rows[1]["messages"][1]["role"] = "usr"
        broken_rows[2]["messages"][-1]["weight"] = 2
        broken = work / "broken.jsonl"
        broken.write_text("".join(json.dumps(r) + "\n" for r in broken_rows))
        print(render_text(check_file(broken)))

        _say("uploading with the together SDK (TOGETHER_BASE_URL points at tuneforge)")
        client = Together(api_key=api_key, base_url=f"{base}/v1")
        uploaded = client.files.upload(file=train, purpose="fine-tune", check=True)
        print(f"uploaded {uploaded.filename} as {uploaded.id} ({uploaded.bytes} bytes)")

        _say("waiting for the server's own check of the upload")
        deadline = time.monotonic() + 60
        info = client.files.retrieve(uploaded.id)
        while info.processing_status in (None, *STILL_CHECKING) and time.monotonic() < deadline:
            time.sleep(0.2)
            info = client.files.retrieve(uploaded.id)
        vr = info.validation_report
        print(f"processing_status: {info.processing_status}")
        if vr is not None:
            print(
                f"validation_report: valid={vr.valid} format={vr.dataset_format} lines={vr.nlines} "
                f"message_weights={vr.dataset_has_message_weights}"
            )

        _say("the files this key owns")
        for f in client.files.list().data:
            print(f"{f.id}  {f.filename}  {f.bytes} bytes  {f.processing_status}")
        if info.processing_status != FileProcessingStatus.COMPLETED:
            _say("demo failed: the server did not accept the dataset")
            return 1

        _say("LoRA fine-tuning SmolLM2-135M-Instruct on it, on this machine's CPU")
        from tuneforge.demo import finetune

        learned = finetune.run(client, uploaded.id)
        _say("demo finished" if learned else "demo finished, but the model did not learn the answer")
        return 0 if learned else 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
