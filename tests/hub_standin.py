"""A loopback stand-in for the Hugging Face hub: real HTTP on 127.0.0.1, repos made from local folders.

It answers what `huggingface_hub.snapshot_download` (2.x) asks, the way the hub answers it:

- `GET /api/models/{repo}` and `GET /api/models/{repo}/revision/{rev}`: the repo info (`sha` is the commit, `siblings`
  the files);
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=…`: the file listing (git `oid`, `size`, `lfs` for weights),
  paged with a `Link: <…>; rel="next"` header as the hub does;
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: a small file is served directly with `X-Repo-Commit` and its git blob id
  as `ETag`; an LFS file (`*.safetensors`, `*.bin`, `*.gguf`) answers `302` to a second listener standing in for the
  CDN (another origin, so the client must drop its `Authorization` header there), with `X-Linked-Etag` (the sha256)
  and `X-Linked-Size`. No `X-Xet-*` header is ever sent, so the client downloads over plain HTTP.

Errors carry the hub's `X-Error-Code` / `X-Error-Message` headers, which the client maps to its exceptions: an unknown
repo is `404 RepoNotFound`; a private repo asked without a token is `401 RepoNotFound`, with a known token that has no
access `404 RepoNotFound`; a gated repo lists for anyone but its files answer `401 GatedRepo` without a token and
`403 GatedRepo` with one not granted; a token nobody issued is `401` "Invalid credentials in Authorization header"; an
unknown revision `404 RevisionNotFound`; an unknown file `404 EntryNotFound`. Anything else is a plain 404.

Uploads (what `huggingface_hub.upload_folder` asks, with a token in `write_tokens`): `POST /api/repos/create`
(409 when it exists), `POST /api/models/{repo}/preupload/{rev}` (every file "regular": its bytes travel base64 in
the commit, which the client accepts; no LFS upload is offered) and `POST /api/models/{repo}/commit/{rev}` (the
NDJSON commit: a new commit on the branch with the files added). A token without write access gets `403`.

Every request is logged (`HubStandin.requests`) with its method, path, listener and Authorization header, so tests can
say what was fetched and with which credentials. Use it as a context manager; `url` is the value for `HF_ENDPOINT`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

HOST = "127.0.0.1"
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    path: str
    data: bytes
    lfs: bool
    listed_size: int | None = None  # the size the tree listing claims (a huge model's metadata, without its bytes)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """The git blob id: of the LFS pointer for an LFS file, as on the hub."""
        return git_blob_id(self.pointer if self.lfs else self.data)

    def tree_entry(self) -> dict[str, Any]:
        size = self.listed_size if self.listed_size is not None else len(self.data)
        entry: dict[str, Any] = {"type": "file", "oid": self.oid, "size": size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": size, "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    sha: str
    files: dict[str, RepoFile]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    tokens: set[str] = field(default_factory=set)
    branches: dict[str, Commit] = field(default_factory=dict)

    def commit(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.branches[revision]
        return next((c for c in self.branches.values() if c.sha == revision), None)


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted, without the query
    query: dict[str, list[str]]
    authorization: str | None
    listener: str  # "hub" or "cdn"
    status: int = 0


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class HubStandin:
    """Serves repos from local folders; `add_repo` may be called before or after `start`."""

    def __init__(self, *, tree_page_size: int = 1000) -> None:
        self.repos: dict[str, Repo] = {}
        self.issued_tokens: set[str] = set()
        self.write_tokens: set[str] = set()
        self.tree_page_size = tree_page_size
        self._log: list[Request] = []
        self._lock = threading.Lock()
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self._threads: list[threading.Thread] = []

    # -- repos -----------------------------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        revision: str = "main",
        private: bool = False,
        gated: bool = False,
        token: str | None = None,
        skip: tuple[str, ...] = (),
        listed_sizes: dict[str, int] | None = None,
    ) -> str:
        """Publish every file under `folder` (but `skip`) as branch `revision` of `repo_id`; returns the commit sha.

        A private repo is visible only with `token`; a gated one lists publicly but serves its files only with `token`
        (an account that accepted its conditions). Another revision of the same repo adds a branch. Files are read now.
        `listed_sizes`: sizes the tree listing claims for some files (a model too large to host, by its metadata).
        """
        root = Path(folder)
        files = {}
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel not in skip:
                files[rel] = RepoFile(rel, p.read_bytes(), lfs=p.name.endswith(LFS_SUFFIXES),
                                      listed_size=(listed_sizes or {}).get(rel))  # fmt: skip
        digest = hashlib.sha1(repo_id.encode() + revision.encode())
        for f in files.values():
            digest.update(f.path.encode() + b"\0" + f.oid.encode())
        commit = Commit(sha=digest.hexdigest(), files=files)
        with self._lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id))
            repo.private = repo.private or private
            repo.gated = repo.gated or gated
            if token:
                repo.tokens.add(token)
                self.issued_tokens.add(token)
            repo.branches[revision] = commit
        return commit.sha

    def issue_token(self, token: str, *, write: bool = False) -> str:
        """A valid token that grants no repo (a real account without access); `write`: it may create repos and push
        to them."""
        self.issued_tokens.add(token)
        if write:
            self.write_tokens.add(token)
        return token

    # -- uploads -----------------------------------------------------------------------------------------------------
    def _writer(self, authorization: str | None) -> str:
        token = self._token(authorization)
        if token is None:
            raise HubError(401, "Authorization header is required to write", "RepoNotFound")
        if token not in self.write_tokens:
            raise HubError(403, "You don't have the rights to write to this namespace (read-only token)")
        return token

    def create_repo(self, body: dict[str, Any], authorization: str | None) -> tuple[int, dict[str, Any]]:
        token = self._writer(authorization)
        name, org = str(body.get("name") or ""), body.get("organization")
        repo_id = f"{org}/{name}" if org else name
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            repo = Repo(repo_id, private=bool(body.get("private")), tokens={token})
            repo.branches["main"] = Commit(sha=hashlib.sha1(repo_id.encode()).hexdigest(), files={})
            self.repos[repo_id] = repo
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def preupload(self, repo_id: str, body: dict[str, Any], authorization: str | None) -> dict[str, Any]:
        self._writer(authorization)
        self._repo(repo_id, authorization)
        files = body.get("files") or []
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def commit(self, repo_id: str, revision: str, lines: list[dict[str, Any]], authorization: str | None) -> str:
        self._writer(authorization)
        repo = self._repo(repo_id, authorization)
        with self._lock:
            parent = repo.branches.get(revision) or Commit(sha="", files={})
            files = dict(parent.files)
            for line in lines:
                value = line.get("value") or {}
                if line.get("key") == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else b""
                    files[value["path"]] = RepoFile(value["path"], data, lfs=value["path"].endswith(LFS_SUFFIXES))
                elif line.get("key") == "deletedFile":
                    files.pop(value["path"], None)
                elif line.get("key") == "lfsFile":
                    raise HubError(400, "this stand-in takes regular uploads only")
            digest = hashlib.sha1(parent.sha.encode() + repr(sorted((p, f.oid) for p, f in files.items())).encode())
            commit = Commit(sha=digest.hexdigest(), files=files)
            repo.branches[revision] = commit
        return commit.sha

    # -- the request log -------------------------------------------------------------------------------------------
    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def file_downloads(self, repo_id: str | None = None) -> list[str]:
        """Paths of the files whose bytes were sent (GET on the hub, or on the CDN for LFS files), in order."""
        out = []
        for r in self.requests:
            if r.method != "GET" or r.status not in (200, 206):
                continue
            if r.listener == "cdn":
                sha256 = r.path.rsplit("/", 1)[-1]
                served = self.cdn_file(sha256, repo_id)
                if served is not None:
                    out.append(served.path)
            elif "/resolve/" in r.path and (repo_id is None or r.path.startswith(f"/{repo_id}/resolve/")):
                out.append(r.path.split("/resolve/", 1)[1].split("/", 1)[1])
        return out

    # -- the servers -----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._base("hub")

    def _base(self, listener: str) -> str:
        port = self._servers[listener].server_address[1]
        return f"http://{HOST}:{port}"

    def start(self) -> HubStandin:
        for listener in ("hub", "cdn"):
            server = ThreadingHTTPServer((HOST, 0), _Handler)
            server.daemon_threads = True
            server.standin = self  # type: ignore[attr-defined]
            server.listener = listener  # type: ignore[attr-defined]
            self._servers[listener] = server
            thread = threading.Thread(target=server.serve_forever, name=f"hub-standin-{listener}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answering -------------------------------------------------------------------------------------------------
    def _record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)

    def _token(self, authorization: str | None) -> str | None:
        token = authorization[len("Bearer ") :] if authorization and authorization.startswith("Bearer ") else None
        if authorization is not None and token not in self.issued_tokens:
            raise HubError(401, INVALID_CREDENTIALS)
        return token

    def _repo(self, repo_id: str, authorization: str | None) -> Repo:
        token = self._token(authorization)
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.private and token not in repo.tokens:
            raise HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit(repo: Repo, revision: str) -> Commit:
        commit = repo.commit(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def repo_info(self, repo_id: str, revision: str, authorization: str | None) -> dict[str, Any]:
        repo = self._repo(repo_id, authorization)
        commit = self._commit(repo, revision)
        return {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/", 1)[0],
            "sha": commit.sha,
            "lastModified": "2026-01-01T00:00:00.000Z",
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "library_name": "transformers",
            "tags": ["transformers", "safetensors"],
            "siblings": [{"rfilename": name} for name in commit.files],
        }

    def tree(self, repo_id: str, revision: str, path: str, recursive: bool, authorization: str | None) -> list[Any]:
        commit = self._commit(self._repo(repo_id, authorization), revision)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, f in commit.files.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if depth > 1 and not recursive:
                    break
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "oid": git_blob_id(folder.encode()), "size": 0,
                                            "path": folder})  # fmt: skip
            if recursive or len(parts) == 1:
                entries[name] = f.tree_entry()
        if prefix and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        return list(entries.values())

    def resolve(self, repo_id: str, revision: str, filename: str, authorization: str | None) -> tuple[Commit, RepoFile]:
        repo = self._repo(repo_id, authorization)
        commit = self._commit(repo, revision)
        token = self._token(authorization)
        if repo.gated and token not in repo.tokens:
            if token is None:
                message = f"Access to model {repo_id} is restricted. You must be authenticated to access it."
            else:
                message = f"Access to model {repo_id} is restricted and you are not in the authorized list."
            raise HubError(401 if token is None else 403, message, "GatedRepo", {"X-Repo-Commit": commit.sha})
        f = commit.files.get(filename)
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        return commit, f

    def cdn_file(self, sha256: str, repo_id: str | None = None) -> RepoFile | None:
        with self._lock:
            repos = [r for r in self.repos.values() if repo_id is None or r.repo_id == repo_id]
        for repo in repos:
            for commit in repo.branches.values():
                for f in commit.files.values():
                    if f.lfs and f.sha256 == sha256:
                        return f
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-standin/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the request log is the record
        pass

    @property
    def standin(self) -> HubStandin:
        return self.server.standin  # type: ignore[attr-defined, no-any-return]

    @property
    def listener(self) -> str:
        return self.server.listener  # type: ignore[attr-defined, no-any-return]

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_POST(self) -> None:
        self._answer(head=False)

    def _answer(self, *, head: bool) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        auth = self.headers.get("Authorization")
        status = 500
        self._logged = False
        self._asked = (path, query, auth)
        try:
            status = self._route(parts.path, query, auth, head=head)
        except HubError as exc:
            status = exc.status
            headers = {"X-Error-Message": exc.message, **exc.headers}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            self._send(status, json.dumps({"error": exc.message}).encode(), "application/json", headers, head=head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self._log(status)  # what was not answered (a dropped connection, a bug here) is logged too

    def _log(self, status: int) -> None:
        """Log this request once, with the status it got."""
        if not self._logged:
            self._logged = True
            path, query, auth = self._asked
            self.standin._record(Request(self.command, path, query, auth, self.listener, status))

    def _route(self, raw_path: str, query: dict[str, list[str]], auth: str | None, *, head: bool) -> int:
        hub = self.standin
        segments = [unquote(s) for s in raw_path.strip("/").split("/")]
        if self.listener == "cdn":
            f = hub.cdn_file(segments[-1]) if len(segments) == 2 and segments[0] == "cdn" else None
            if f is None:
                raise HubError(404, "Not found")
            return self._send_file(f.data, {"ETag": f'"{f.sha256}"'}, head=head)
        if self.command == "POST":
            return self._post(segments, auth)
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo_id = "/".join(segments[2:4])
            rest = segments[4:]
            if not rest or (rest[0] == "revision" and len(rest) == 2):
                info = hub.repo_info(repo_id, rest[1] if rest else "main", auth)
                return self._send(200, json.dumps(info).encode(), "application/json", {}, head=head)
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                entries = hub.tree(repo_id, rest[1], "/".join(rest[2:]), recursive, auth)
                return self._send_page(raw_path, query, entries, head=head)
        if len(segments) >= 5 and segments[2] == "resolve":
            repo_id, revision, filename = "/".join(segments[:2]), segments[3], "/".join(segments[4:])
            commit, f = hub.resolve(repo_id, revision, filename, auth)
            headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
            if f.lfs:
                location = f"{hub._base('cdn')}/cdn/{f.sha256}?expires={int(time.time()) + 3600}"
                headers.update({"ETag": f'"{f.oid}"', "X-Linked-Etag": f'"{f.sha256}"',
                                "X-Linked-Size": str(len(f.data)), "Location": location})  # fmt: skip
                return self._send(302, b"", "text/plain", headers, head=head)
            headers["ETag"] = f'"{f.oid}"'
            return self._send_file(f.data, headers, head=head)
        raise HubError(404, "Not found")

    def _post(self, segments: list[str], auth: str | None) -> int:
        hub = self.standin
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if segments == ["api", "validate-yaml"]:  # a README's metadata block, checked before a commit: accepted
            return self._send(200, b'{"errors": [], "warnings": []}', "application/json", {}, head=False)
        if segments == ["api", "repos", "create"]:
            status, answer = hub.create_repo(json.loads(body or b"{}"), auth)
            return self._send(status, json.dumps(answer).encode(), "application/json", {}, head=False)
        if segments[:2] == ["api", "models"] and len(segments) == 6 and segments[4] in ("preupload", "commit"):
            repo_id, revision = "/".join(segments[2:4]), segments[5]
            if segments[4] == "preupload":
                answer = hub.preupload(repo_id, json.loads(body or b"{}"), auth)
            else:
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                sha = hub.commit(repo_id, revision, lines, auth)
                answer = {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}
            return self._send(200, json.dumps(answer).encode(), "application/json", {}, head=False)
        raise HubError(404, "Not found")

    def _send_page(self, raw_path: str, query: dict[str, list[str]], entries: list[Any], *, head: bool) -> int:
        size = self.standin.tree_page_size
        start = int(query.get("cursor", ["0"])[0])
        page = entries[start : start + size]
        headers = {}
        if start + size < len(entries):
            params = "&".join(f"{k}={quote(v[0])}" for k, v in query.items() if k != "cursor")
            headers["Link"] = f'<{self.standin.url}{raw_path}?{params}&cursor={start + size}>; rel="next"'
        return self._send(200, json.dumps(page).encode(), "application/json", headers, head=head)

    def _send_file(self, data: bytes, headers: dict[str, str], *, head: bool) -> int:
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes="):
            first, _, last = rng[len("bytes=") :].partition("-")
            begin, end = int(first or 0), int(last) if last else len(data) - 1
            headers = {**headers, "Content-Range": f"bytes {begin}-{end}/{len(data)}"}
            return self._send(206, data[begin : end + 1], "application/octet-stream", headers, head=head)
        return self._send(200, data, "application/octet-stream", headers, head=head)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str], *, head: bool) -> int:
        self._log(status)  # before the answer goes out: a client that got it finds the request in the log
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)
        return status
