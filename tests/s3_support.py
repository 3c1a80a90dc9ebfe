"""A real S3-compatible server for the tests: moto's server mode, started as a child process on a loopback port.

`S3Server.start(log_path)` runs `python -m moto.server` and waits until it answers; `env()` is what a tuneforge
server (or a training child) needs to reach it, the standard AWS settings; `bucket_url(name)` makes a bucket and
returns its `s3://` storage URL. Its log (Werkzeug's access log) shows every request the bucket received.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HOST = "127.0.0.1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "tuneforge-test", "AWS_SECRET_ACCESS_KEY": "tuneforge-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @classmethod
    def start(cls, log_path: Path, timeout: float = 30) -> S3Server:
        port = _free_port()
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **CREDENTIALS},
            )
        server = cls(proc, port, log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"moto server exited at start-up:\n{server.log()}")
            try:
                httpx.get(f"{server.endpoint}/moto-api/", timeout=1)
                return server
            except httpx.HTTPError:
                time.sleep(0.1)
        server.stop()
        raise AssertionError(f"moto server did not answer within {timeout} s:\n{server.log()}")

    def env(self) -> dict[str, str]:
        """The standard AWS settings that point boto/s3fs at this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def bucket_url(self, bucket: str, prefix: str = "blobs") -> str:
        """Make `bucket` (if it is new) and return the storage URL of `prefix` in it."""
        r = httpx.put(f"{self.endpoint}/{bucket}", timeout=10)
        assert r.status_code in (200, 409), r.text
        return f"s3://{bucket}/{prefix}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
