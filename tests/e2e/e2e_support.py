"""Helpers for the end-to-end tests: a live `tuneforge serve` subprocess, the real CLIs, raw HTTP.

Knows the wire contract (docs/api-contract.md) and the on-disk layout of a tuneforge home
(`<home>/blobs/{files,uploads,.tmp}`, `<home>/upload_secret`), and never imports the server's code: the
server is only ever reached over HTTP or through the `tuneforge` command (the one exception, in the
bad-input tests, borrows the URL signer to mint a correctly signed URL that has already expired).
SDK clients get their key and base URL explicitly, and CLI runs get an environment built here, so a
developer's TOGETHER_* settings never point the tests elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pg_support
import pytest
from together import Together

HOST = "127.0.0.1"
FILE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TUNEFORGE_FILE_ID_RE = re.compile(r"file-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
UNFINISHED = (None, "PENDING", "QUEUED", "RUNNING")
# The CLI talks to together.ai for telemetry and version checks unless told not to (api-contract 7.2).
CLI_ENV = {"TOGETHER_TELEMETRY_DISABLED": "1", "TOGETHER_DISABLE_VERSION_CHECK": "1"}
# Line of the `invalid_jsonl` fixture that breaks the server's rules (a role the contract does not allow).
INVALID_LINE = 3
# Limits of the `small_server` fixture.
MAX_FILE_BYTES_SMALL = 1_000_000
MAX_LINE_BYTES_SMALL = 64 * 1024


def script_command(name: str) -> list[str]:
    """The console script installed next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return [str(local)]
    found = shutil.which(name)
    if found:
        return [found]
    if name == "tuneforge":
        return [sys.executable, "-m", "tuneforge.cli"]
    raise RuntimeError(f"the {name!r} command is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def unique() -> str:
    return uuid.uuid4().hex


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _server_env(extra: dict[str, str] | None, home: Path | None = None) -> dict[str, str]:
    # Start from the caller's environment minus any TUNEFORGE_* setting, so a developer's own
    # configuration cannot leak into the server under test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env["TUNEFORGE_HOSTED_CATALOG"] = "0"  # the tests' own models only (tests/conftest.py); `extra` may turn it on
    if home is not None:
        env.update(pg_support.env_for(home))  # PostgreSQL mode: the home's own database (pg_support.py)
    env.update(extra or {})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tuneforge_cli(*args: str, home: Path, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run `tuneforge ARGS --home HOME` as a subprocess; returns stdout."""
    proc = subprocess.run(
        [*script_command("tuneforge"), *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=60,
        env=_server_env(env, home),
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tuneforge {' '.join(args)} exited {proc.returncode}: {proc.stderr}\n{proc.stdout}")
    return proc.stdout


@dataclass
class LiveServer:
    """One `tuneforge serve` subprocess and what the tests need to talk to it."""

    home: Path
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    keys: dict[str, str] = field(default_factory=dict)
    stopped: bool = False

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.base}/v1"

    @property
    def blobs(self) -> Path:
        return self.home / "blobs"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def create_key(self, name: str, owner: str | None = None) -> str:
        """A new API key, made by the real `tuneforge keys create` (which prints only the key)."""
        args = ["keys", "create", "--name", name]
        if owner:
            args += ["--owner", owner]
        out = tuneforge_cli(*args, home=self.home, env=self.env).strip()
        assert out and len(out.splitlines()) == 1 and " " not in out, f"keys create printed more than a key: {out!r}"
        return out

    def create_keys(self, owners: Iterable[str], suffix: str = "e2e") -> dict[str, str]:
        """One key per owner (named OWNER-SUFFIX), made by concurrent `tuneforge keys create` runs."""
        owners = list(owners)
        with ThreadPoolExecutor(len(owners)) as pool:
            keys = list(pool.map(lambda o: self.create_key(f"{o}-{suffix}", o), owners))
        self.keys.update(zip(owners, keys, strict=True))
        return dict(zip(owners, keys, strict=True))

    def revoke_key(self, id_or_name: str) -> str:
        return tuneforge_cli("keys", "revoke", id_or_name, home=self.home, env=self.env)

    def client(self, key: str, **kwargs: Any) -> Together:
        kwargs.setdefault("timeout", 60)
        return Together(api_key=key, base_url=self.api, **kwargs)

    def http(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kwargs.setdefault("timeout", 60)
        return httpx.Client(base_url=self.base, headers=headers, **kwargs)

    def health(self, timeout: float = 5) -> bool:
        try:
            return httpx.get(f"{self.base}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def assert_serving(self) -> None:
        """The server process is alive and still answers /health."""
        assert self.alive(), f"server died (rc={self.proc.returncode}):\n{self.log_tail()}"
        assert self.health(), f"server stopped answering /health:\n{self.log_tail()}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Stop the server; raise if SIGTERM does not end it within `timeout` seconds."""
        self.stopped = True
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"server ignored signal {sig} for {timeout} s:\n{self.log_tail()}") from None

    def finish(self) -> None:
        """Teardown: fail loudly if the server died under the tests, otherwise stop it."""
        if self.stopped:
            return
        if not self.alive():
            self.stopped = True
            pytest.fail(
                f"the tuneforge server died during the tests (rc={self.proc.returncode}); log:\n{self.log_tail()}",
                pytrace=False,
            )
        rc = self.stop()
        if rc not in (0, -signal.SIGTERM):
            pytest.fail(f"the tuneforge server exited {rc} on SIGTERM; log:\n{self.log_tail()}", pytrace=False)


def start_server(home: Path, log_path: Path, env: dict[str, str] | None = None, timeout: float = 30) -> LiveServer:
    """Start `tuneforge serve` on a free port and wait until /health answers."""
    home.mkdir(parents=True, exist_ok=True)
    full_env = _server_env(env, home)
    last_log = ""
    for _attempt in range(3):  # a free port can be taken between the probe and the bind
        port = free_port()
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [*script_command("tuneforge"), "serve", "--host", HOST, "--port", str(port), "--home", str(home)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        server = LiveServer(home=home, port=port, proc=proc, log_path=log_path, env=env or {})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if server.health(timeout=1):
                return server
            time.sleep(0.1)
        if proc.poll() is None:
            server.stop(signal.SIGKILL)
            raise AssertionError(f"tuneforge serve did not answer /health within {timeout} s:\n{server.log_tail()}")
        last_log = server.log_tail()
        if "address already in use" not in last_log.lower():
            break
    raise AssertionError(f"tuneforge serve exited at start-up:\n{last_log}")


# --- datasets -----------------------------------------------------------------------------------------


def conversation(nonce: str, i: int = 0, *, pad: int = 0) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": f"You are a test assistant ({nonce})."},
            {"role": "user", "content": f"Question {i}: what is {i} + {i}?" + " x" * pad},
            {"role": "assistant", "content": f"{i} + {i} = {2 * i}."},
        ]
    }


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def jsonl_bytes(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def valid_records(n: int = 4, nonce: str | None = None) -> list[dict[str, Any]]:
    nonce = nonce or unique()
    return [conversation(nonce, i) for i in range(n)]


# --- waiting and asserting ----------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_processed_sdk(client: Together, file_id: str, timeout: float = 60) -> Any:
    """Retrieve the file until its server-side check leaves QUEUED/RUNNING; returns the file object."""
    last: list[Any] = [None]

    def done() -> Any:
        f = client.files.retrieve(file_id)
        last[0] = f
        return f if f.processing_status not in UNFINISHED else None

    try:
        return wait_until(done, timeout=timeout, what=f"processing of {file_id}", interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {last[0]}") from None


def wait_processed_http(http: httpx.Client, file_id: str, timeout: float = 60) -> dict[str, Any]:
    last: list[Any] = [None]

    def done() -> Any:
        r = http.get(f"/v1/files/{file_id}")
        assert r.status_code == 200, r.text
        last[0] = body = r.json()
        return body if body.get("processing_status") not in UNFINISHED else None

    try:
        return dict(wait_until(done, timeout=timeout, what=f"processing of {file_id}", interval=0.2))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {last[0]}") from None


def names_line(error: str | None, line: int) -> bool:
    """Whether a validation error text names this (1-based) line, e.g. 'line 3' or 'Line 3:'."""
    return bool(error) and re.search(rf"\bline\D{{0,3}}{line}\b", str(error), re.IGNORECASE) is not None


def assert_envelope(resp: httpx.Response, status: int, *fragments: str) -> dict[str, Any]:
    """A JSON answer with this status in Together's error envelope, whose message says each fragment."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers.get("content-type", "").split(";")[0].endswith("json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    err = body["error"]
    assert isinstance(err.get("message"), str) and err["message"].strip(), body
    assert isinstance(err.get("type"), str) and err["type"], body
    assert err.get("code") is None or isinstance(err.get("code"), str), body
    assert "detail" not in body, body
    message = err["message"].lower()
    for frag in fragments:
        assert frag.lower() in message, f"{frag!r} not in error message {err['message']!r}"
    return dict(body)


# --- raw uploads --------------------------------------------------------------------------------------


def form(**fields: str) -> dict[str, tuple[None, str]]:
    """multipart/form-data text fields with no file part, the way the SDK sends them (api-contract 1.3)."""
    return {k: (None, v) for k, v in fields.items()}


def open_upload(
    http: httpx.Client,
    *,
    data: bytes | None = None,
    checksum: str | None = None,
    file_name: str = "train.jsonl",
    purpose: str = "fine-tune",
    file_type: str = "jsonl",
) -> httpx.Response:
    """`POST /v1/files` with the SDK's four form fields; returns the raw answer (302 on success)."""
    if checksum is None:
        checksum = sha256_hex(data if data is not None else b"")
    return http.post(
        "/v1/files",
        files=form(purpose=purpose, file_name=file_name, file_type=file_type, checksum=checksum),
        follow_redirects=False,
    )


@dataclass
class OpenedUpload:
    file_id: str
    location: str

    @property
    def path_and_query(self) -> str:
        u = httpx.URL(self.location)
        return f"{u.raw_path.decode()}"


def opened(http: httpx.Client, **kwargs: Any) -> OpenedUpload:
    r = open_upload(http, **kwargs)
    assert r.status_code == 302, f"POST /v1/files: {r.status_code} {r.text}"
    file_id = r.headers["X-Together-File-Id"]
    assert FILE_ID_RE.match(file_id), file_id
    return OpenedUpload(file_id=file_id, location=r.headers["Location"])


def put_bytes(location: str, data: bytes, **kwargs: Any) -> httpx.Response:
    """The unauthenticated PUT of the single-part flow (no Authorization, no Content-Type)."""
    return httpx.put(location, content=data, timeout=60, **kwargs)


def upload_raw(http: httpx.Client, data: bytes, *, file_name: str = "train.jsonl", **kwargs: Any) -> str:
    """The whole single-part flow with raw HTTP (POST, PUT, preprocess); returns the file id."""
    up = opened(http, data=data, file_name=file_name, **kwargs)
    r = put_bytes(up.location, data)
    assert r.status_code == 200, f"PUT: {r.status_code} {r.text}"
    r = http.post(f"/v1/files/{up.file_id}/preprocess")
    assert r.status_code == 200, f"preprocess: {r.status_code} {r.text}"
    return up.file_id


def listed_ids(http: httpx.Client) -> set[str]:
    r = http.get("/v1/files")
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body.get("data"), list), body
    return {f["id"] for f in body["data"]}


def leftovers(server: LiveServer, file_id: str) -> list[str]:
    """Anything stored for an upload that never completed: its blob, its parts, temporary files."""
    found = []
    for p in (server.blobs / "files" / file_id, server.blobs / "uploads" / file_id):
        if p.exists():
            found.append(str(p))
    tmp = server.blobs / ".tmp"
    if tmp.exists():
        found += [str(p) for p in tmp.iterdir()]
    return found


def assert_nothing_stored(server: LiveServer, http: httpx.Client, file_id: str | None, timeout: float = 5) -> None:
    """After a failed upload: no blob, no temporary file, not listed, and the server still answers."""
    if file_id is not None:
        wait_until(
            lambda: not leftovers(server, file_id),
            timeout=timeout,
            what=f"the half-stored bytes of {file_id} to disappear: {leftovers(server, file_id)}",
        )
        assert file_id not in listed_ids(http)
        assert http.get(f"/v1/files/{file_id}").status_code == 404
    else:
        tmp = server.blobs / ".tmp"
        assert not (tmp.exists() and any(tmp.iterdir())), list(tmp.iterdir())
    server.assert_serving()


# --- a raw socket, for requests httpx will not send -----------------------------------------------------


def raw_exchange(
    port: int,
    head: str,
    chunks: Iterable[bytes] = (),
    *,
    close_after_send: str | None = None,
    timeout: float = 15,
) -> tuple[int, dict[str, str], bytes] | None:
    """Send a hand-written HTTP/1.1 request; returns (status, headers, body).

    With `close_after_send` ("close" or "reset") the socket is closed right after the last chunk and
    None is returned: the server sees the client vanish, possibly mid-body.
    """
    sock = socket.create_connection((HOST, port), timeout=timeout)
    try:
        sock.sendall(head.encode("latin-1"))
        for chunk in chunks:
            sock.sendall(chunk)
        if close_after_send:
            if close_after_send == "reset":  # abort with an RST instead of the orderly FIN of close()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return None
        return _read_response(sock)
    finally:
        sock.close()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed before a full response head: {buf!r}")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        body += data
    return status, headers, body


def run_together(
    server: LiveServer, key: str, *args: str, cwd: Path, check: bool = True, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run `together ARGS` with only this key and base URL, and a private HOME (no stored `tg login`)."""
    home = cwd / "cli-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOGETHER_")}
    env |= {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "TOGETHER_API_KEY": key,
        "TOGETHER_BASE_URL": server.api,
        "NO_COLOR": "1",
        "CI": "1",  # no shell-completion set-up on each run
        "COLUMNS": "250",
        **CLI_ENV,
    }
    proc = subprocess.run(
        [*script_command("together"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"together {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
