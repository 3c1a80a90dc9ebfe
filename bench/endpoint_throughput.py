"""Benchmark: a dedicated endpoint's generated tokens/s under concurrent streams, with one replica and with two,
in one run.

Starts `tuneforge serve` in a fresh home, makes an API key, creates an endpoint of the model (hardware `cpu`,
min = max = 1 replica) with the together SDK, waits for STARTED, and runs --streams concurrent closed-loop
streams, each sending --rounds chat requests of --tokens greedy tokens through the server's proxy (so the figure
includes the API hop, as a user sees it). Then it raises the endpoint to two replicas (PATCH autoscaling
min = max = 2), waits until both are ready, and runs the same load. tok/s = completion tokens / wall time.

Each replica is a model server with the default torch threads (all cores): on a host with few cores two replicas
share them, and the honest figure may be near 1x; on a host with cores or GPUs to spare it approaches 2x.

    python bench/endpoint_throughput.py [--model smollm2|tiny] [--streams 32] [--rounds 2] [--tokens 32] [--quick]

`--quick`: --streams 8 --rounds 1 --tokens 8. `--model tiny`: a random tiny llama (tests only). The last line
printed is one JSON object with replicas2_vs_1 beside the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import together

ROOT = Path(__file__).resolve().parents[1]
MESSAGES = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper and a storm."}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path) -> dict[str, str]:
    """The server's explicit environment: no TUNEFORGE_* setting of the caller's, a private home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEFORGE_", "TOGETHER_"))}
    pythonpath = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "TUNEFORGE_HOME": str(home), "TUNEFORGE_SERVE_START_TIMEOUT_S": "300"}  # fmt: skip


def _cli(home: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "tuneforge.cli", *args, "--home", str(home)], env=_env(home),
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"tuneforge {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip()


def _prepare_model(home: Path, which: str, cache: Path) -> str:
    """The catalog name to deploy; SmolLM2 is converted once into --cache and linked into the home."""
    if which == "tiny":
        from tuneforge.train.tiny_models import save_tiny_model

        folder = save_tiny_model(home.parent / "tiny-llama", "llama", tie=False)
        _cli(home, "models", "add", "tiny/llama", "--source", f"local:{folder}")
        return "tiny/llama"
    from tuneforge.catalog.entries import SMOLLM2
    from tuneforge.catalog.loading import resolve_model_dir
    from tuneforge.catalog.source import ModelSource

    source = ModelSource(name=SMOLLM2.name, source_kind=SMOLLM2.source_kind, source=SMOLLM2.source)
    prepared = resolve_model_dir(source, cache)
    target = home / "models" / prepared.relative_to(cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(prepared, target_is_directory=True)
    return SMOLLM2.name


def _wait(what: str, predicate: Any, timeout: float, server: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}) while waiting for {what}")
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")


def _load(client: together.Together, name: str, streams: int, rounds: int, tokens: int) -> dict[str, Any]:
    produced = 0
    failures: list[BaseException] = []
    lock = threading.Lock()

    def stream() -> None:
        nonlocal produced
        for _ in range(rounds):
            if failures:
                return
            try:
                out = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=tokens, temperature=0)
            except BaseException as exc:  # one side failing ends the run at once, with its error
                failures.append(exc)
                return
            with lock:
                produced += out.usage.completion_tokens if out.usage else 0

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise SystemExit(f"a request failed: {failures[0]!r}")
    return {"tokens": produced, "seconds": round(wall, 3), "tok_s": round(produced / wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "tuneforge" / "models"))
    a = ap.parse_args()
    if a.quick:
        a.streams, a.rounds, a.tokens = 8, 1, 8

    root = Path(tempfile.mkdtemp(prefix="tf-endpoint-bench-"))
    home = root / "home"
    home.mkdir()
    server: subprocess.Popen[bytes] | None = None
    try:
        model = _prepare_model(home, a.model, Path(a.cache))
        key = _cli(home, "keys", "create", "--name", "bench", "--owner", "bench")
        port = _free_port()
        log = (root / "server.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "tuneforge.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--home",
             str(home)], env=_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait("the server", healthy, 60, server)
        client = together.Together(api_key=key, base_url=f"{base}/v1", max_retries=0, timeout=600)
        ep = client.endpoints.create(model=model, hardware="cpu", autoscaling={"min_replicas": 1, "max_replicas": 1})

        def ready(n: int) -> Any:
            got = client.endpoints.retrieve(ep.id)
            if got.state == "ERROR":
                raise SystemExit(f"the endpoint failed: {got.model_extra.get('error')}")
            return got.state == "STARTED" and got.model_extra.get("ready_replicas") == n

        _wait("one ready replica", lambda: ready(1), 300, server)
        _load(client, ep.name, 2, 1, 4)  # warm-up
        one = _load(client, ep.name, a.streams, a.rounds, a.tokens)
        print(f"1 replica : {one['tok_s']:8.1f} tok/s ({one['tokens']} tokens, {one['seconds']} s)", flush=True)
        client.endpoints.update(ep.id, autoscaling={"min_replicas": 2, "max_replicas": 2})
        _wait("two ready replicas", lambda: ready(2), 300, server)
        _load(client, ep.name, 4, 1, 4)  # warm-up: both replicas
        two = _load(client, ep.name, a.streams, a.rounds, a.tokens)
        print(f"2 replicas: {two['tok_s']:8.1f} tok/s ({two['tokens']} tokens, {two['seconds']} s)", flush=True)
        ratio = two["tok_s"] / one["tok_s"]
        print(f"2 replicas vs 1: {ratio:.2f}x on {os.cpu_count()} cores", flush=True)
        print(json.dumps({
            "replicas2_vs_1": round(ratio, 3),
            "replicas1_tok_s": one["tok_s"],
            "replicas2_tok_s": two["tok_s"],
            "streams": a.streams,
            "rounds": a.rounds,
            "tokens_per_request": a.tokens,
            "model": a.model,
            "cores": os.cpu_count(),
        }))  # fmt: skip
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
