"""A loopback stand-in for the Weights & Biases server: enough of it for the wandb client to log a whole run.

Tests point a job's `wandb_base_url` at `WandbStub().base_url` and then read back what W&B would have received: the
API key each request carried, the run's config, every history row (the logged metrics, by step), the summary, the
uploaded run files, and whether the run finished and with which exit code. Standard library only; no network.

The surface, as the wandb 0.31 client (its Go core, `wandb-core`) uses it for a plain run:
- `POST /graphql`, operations by name: `Viewer` (who owns the key), `UpsertBucket` (create or update the run:
  name, project, entity, display name, config as a JSON string of `{key: {"value": v}}`), `RunResumeStatus` (asked
  with `resume="allow"`; answered "no such run", so the run is created, or updated when it exists here),
  `ServerFeaturesQuery`, `CreateRunFiles` (upload URLs for the run's files, here on the stub). Any other operation
  gets an empty `data` object, which the client treats as "nothing there".
- `POST /files/{entity}/{project}/{run}/file_stream`: JSON `{"files": {name: {"offset": n, "content": [line, ...]}}}`
  with `wandb-history.jsonl` (one JSON row per logged step, with `_step`), `wandb-summary.json`, `output.log`; the
  last one carries `"complete": true` and `"exitcode"`.
- `PUT` to the upload URLs (config.yaml, wandb-metadata.json, wandb-summary.json, requirements.txt, output.log).
- The SDK's telemetry (`/sdk/otel/v1/...`), answered and ignored.
Every request authenticates with HTTP basic auth, user `api`, password the API key.

`outage_once_run_exists=True` makes the stub fail (HTTP 500 to everything) as soon as it has created a run: a W&B
outage in the middle of a run (the client sends history in batches, every 15 s and at the end, so an outage that
waited for rows would come too late for a short run). `down = True` starts an outage at any time.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["StubRun", "WandbStub"]

VIEWER_ENTITY = "stub-entity"


@dataclass
class StubRun:
    """What the stub received for one run (W&B calls the run a bucket, its project a model)."""

    run_id: str
    project: str
    entity: str
    display_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    history_lines: dict[int, dict[str, Any]] = field(default_factory=dict)  # by line number in wandb-history.jsonl
    summary: dict[str, Any] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    complete: bool = False
    exitcode: int | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The logged rows in the order they were logged (each has `_step` and the logged values)."""
        return [self.history_lines[i] for i in sorted(self.history_lines)]


class WandbStub:
    """The stub server on 127.0.0.1 (a free port), serving from a thread; use as a context manager."""

    def __init__(self, *, outage_once_run_exists: bool = False) -> None:
        self.outage_once_run_exists = outage_once_run_exists
        self.down = False
        self.runs: dict[str, StubRun] = {}
        self.api_keys: set[str] = set()
        self.requests: list[str] = []  # "METHOD path" (GraphQL requests: "POST /graphql Operation")
        self.bodies: list[bytes] = []  # every request body, as received
        self.failed_requests = 0
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="wandb-stub", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> WandbStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WandbStub:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def run(self) -> StubRun:
        """The one run the stub received (fails unless there is exactly one)."""
        with self._lock:
            runs = list(self.runs.values())
        if len(runs) != 1:
            raise AssertionError(f"expected one W&B run, the stub has {[r.run_id for r in runs]}")
        return runs[0]

    def run_url(self, run: StubRun) -> str:
        """The run's page, as the client builds it (the app URL is the base URL)."""
        return f"{self.base_url}/{run.entity}/{run.project}/runs/{run.run_id}"

    # -- requests -----------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, Any]:
        with self._lock:
            self.bodies.append(body)
            key = _basic_auth_password(headers.get("Authorization", ""))
            if key is not None:
                self.api_keys.add(key)
            if self.down:
                self.failed_requests += 1
                self.requests.append(f"{method} {path} (failed)")
                return 500, {"error": "the W&B stub is failing on purpose"}
            if method == "POST" and path == "/graphql":
                query = json.loads(body or b"{}")
                op = str(query.get("operationName") or "")
                self.requests.append(f"{method} {path} {op}")
                return 200, {"data": self._graphql(op, query.get("variables") or {})}
            self.requests.append(f"{method} {path}")
            parts = path.strip("/").split("/")
            if method == "POST" and len(parts) == 5 and parts[0] == "files" and parts[4] == "file_stream":
                self._file_stream(parts[3], json.loads(body or b"{}"))
                return 200, {"exitcode": None, "limits": {}}
            if method == "PUT" and len(parts) == 3 and parts[0] == "stub-files" and parts[1] in self.runs:
                self.runs[parts[1]].files[parts[2]] = body
                return 200, {}
            return 200, {}  # telemetry and anything else

    def _graphql(self, op: str, v: dict[str, Any]) -> dict[str, Any]:
        if op == "Viewer":
            return {"viewer": {"id": "stub-user", "entity": VIEWER_ENTITY, "username": "stub", "email": "",
                               "flags": "{}", "teams": {"edges": []}}}  # fmt: skip
        if op == "UpsertBucket":
            name = str(v.get("name"))
            run = self.runs.get(name)
            if run is None:
                run = StubRun(run_id=name, project=v.get("project") or "uncategorized",
                              entity=v.get("entity") or VIEWER_ENTITY)  # fmt: skip
                self.runs[name] = run
                self.down = self.down or self.outage_once_run_exists
            if v.get("displayName"):
                run.display_name = v["displayName"]
            if v.get("config"):
                for k, wrapped in json.loads(v["config"]).items():
                    run.config[k] = wrapped.get("value") if isinstance(wrapped, dict) else wrapped
            bucket = {"id": f"bucket-{name}", "name": name, "displayName": run.display_name, "description": None,
                      "config": "{}", "sweepName": None, "historyLineCount": len(run.history_lines),
                      "project": {"id": f"project-{run.project}", "name": run.project,
                                  "entity": {"id": f"entity-{run.entity}", "name": run.entity}}}  # fmt: skip
            return {"upsertBucket": {"bucket": bucket, "inserted": True}}
        if op == "RunResumeStatus":
            project, entity = v.get("project") or "uncategorized", v.get("entity") or VIEWER_ENTITY
            return {"model": {"id": f"project-{project}", "name": project,
                              "entity": {"id": f"entity-{entity}", "name": entity}, "bucket": None}}  # fmt: skip
        if op == "ServerFeaturesQuery":
            return {"serverInfo": {"features": []}}
        if op == "CreateRunFiles":
            run_name = str(v.get("run"))
            files = [{"name": f, "uploadUrl": f"{self.base_url}/stub-files/{run_name}/{f}"} for f in v.get("files", [])]
            return {"createRunFiles": {"runID": f"bucket-{run_name}", "uploadHeaders": [], "files": files}}
        return {}

    def _file_stream(self, run_name: str, payload: dict[str, Any]) -> None:
        run = self.runs.get(run_name)
        if run is None:
            return
        for name, chunk in (payload.get("files") or {}).items():
            offset, lines = int(chunk.get("offset", 0)), list(chunk.get("content") or [])
            if name == "wandb-history.jsonl":
                for i, line in enumerate(lines):
                    run.history_lines[offset + i] = json.loads(line)
            elif name == "wandb-summary.json" and lines:
                run.summary = json.loads(lines[-1])
            elif name == "output.log":
                run.console.extend(lines)
        if payload.get("complete"):
            run.complete = True
            run.exitcode = payload.get("exitcode")


def _basic_auth_password(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(value).decode().partition(":")[2]
    except ValueError:
        return None


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that drops its keep-alive connection is no news


def _handler(stub: WandbStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            try:
                status, answer = stub.handle(self.command, self.path.split("?")[0], self.headers, body)
            except Exception as exc:  # a request the stub cannot read: say so, as a server would
                status, answer = 400, {"error": f"{type(exc).__name__}: {exc}"}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
