"""A small Hugging Face Hub stand-in for tests (stdlib HTTP server + pytest fixtures).

Tests drive it with the real ``huggingface_hub`` client (its httpx2 transport is not
interceptable by request-mocking libraries), so the endpoints and JSON fields below mirror
what huggingface_hub 2.4 sends and parses. Model, dataset and Space repos (``repo_type=``; Spaces
also keep their variables); every file is answered ``uploadMode: "regular"`` so content travels
base64 inside the commit and LFS/Xet never start.

Like the real Hub, ``create_repo`` makes an "initial commit" holding ``.gitattributes``.

IMPORTANT: ``HF_ENDPOINT`` must point at this server *before* ``huggingface_hub`` is imported:
the client copies it at import time (``constants.ENDPOINT`` and the module-level ``HfApi``
behind ``huggingface_hub.file_exists`` & co). Set it in ``conftest.py`` at import time, e.g.
``os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

USER = "user"  # namespace used for un-namespaced create_repo calls and whoami
DUMMY_TOKEN = "hf_localhubdummytoken0000000000000000"
GITATTRIBUTES = b"".join(
    b"*.%s filter=lfs diff=lfs merge=lfs -text\n" % ext
    for ext in (b"bin", b"h5", b"msgpack", b"onnx", b"pt", b"pth", b"safetensors", b"zip")
)


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port (to build HF_ENDPOINT before huggingface_hub is imported)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def git_blob_oid(data: bytes) -> str:
    """Git blob sha1: what the Hub reports as a regular file's oid/ETag (the client compares it)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An HTTP error answered the Hub's way: JSON ``error`` + ``X-Error-Code`` for the client's exception mapping."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra


@dataclass
class _Commit:
    sha: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    date: str


REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}  # URL segment -> repo_type


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    repo_type: str = "model"
    sdk: str | None = None  # Spaces only
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    variables: dict[str, dict] = field(default_factory=dict)  # Spaces only: key -> {"value", "description", ...}


class LocalHub:
    """In-memory Hub: commits are full snapshots (path -> bytes) with a parent pointer."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.requests: list[tuple[str, str]] = []  # (method, raw URL path without query), never headers
        self._repos: dict[tuple[str, str], _Repo] = {}  # (repo_type, repo_id) -> repo
        self.revoked: set[str] = set()  # tokens refused on every request, public repos too, as the Hub does
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle / assertions
    def start(self) -> "LocalHub":
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer((self.host, self.port), handler)
        self._server.daemon_threads, self._server.block_on_close = True, False
        self.port = self._server.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget every repo and recorded request (the ``hub_online`` fixture calls this)."""
        with self._lock:
            self._repos.clear()
            self.requests.clear()
            self.revoked.clear()

    def refs(self, repo_id: str, repo_type: str = "model") -> dict:
        with self._lock:
            repo = self._repo(repo_id, authorized=True, repo_type=repo_type)
            return {"branches": dict(repo.branches), "tags": dict(repo.tags)}

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            return dict(self._resolve(self._repo(repo_id, authorized=True, repo_type=repo_type), revision).files)

    def space(self, repo_id: str) -> dict:
        """A Space's SDK and variables (key -> value)."""
        with self._lock:
            repo = self._repo(repo_id, authorized=True, repo_type="space")
            return {"sdk": repo.sdk, "variables": {k: v["value"] for k, v in repo.variables.items()}}

    # ------------------------------------------------------------------ state helpers
    def _repo(self, repo_id: str, authorized: bool, repo_type: str = "model") -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):  # the Hub hides private repos: 401 + RepoNotFound
            raise HubError(404 if repo is None else 401, "Repository not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        """Branch, then tag, then full 40-hex commit id (the three forms the client sends)."""
        sha = repo.branches.get(revision) or repo.tags.get(revision)
        if sha is None and revision in repo.commits:
            sha = revision
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def _commit(self, repo: _Repo, parent: _Commit | None, files: dict, title: str, message: str = "") -> _Commit:
        seed = f"{repo.repo_id}\0{parent.sha if parent else ''}\0{title}\0{uuid.uuid4()}".encode()
        commit = _Commit(hashlib.sha1(seed).hexdigest(), parent.sha if parent else None, files, title, message, _now())
        repo.commits[commit.sha] = commit
        return commit

    def _info(self, repo: _Repo, commit: _Commit, blobs: bool) -> dict:
        siblings = [
            {"rfilename": p, **({"size": len(b), "blobId": git_blob_oid(b)} if blobs else {})}
            for p, b in sorted(commit.files.items())
        ]
        return {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.sha,
            "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            **({"sdk": repo.sdk} if repo.repo_type == "space" else {}),
        }

    # ------------------------------------------------------------------ routing
    def _route(self, method: str, segs: list[str], query: dict, body: bytes, authed: bool):
        """Returns (status, json-or-bytes, headers). Called under the lock."""
        if segs[:1] != ["api"]:
            repo_type = REPO_TYPES.get(segs[0], "model") if segs[0] in ("datasets", "spaces") else "model"
            parts = segs[1:] if repo_type != "model" else segs  # /spaces/{ns}/{name}/resolve/...
            if "resolve" in parts[2:] and method in ("GET", "HEAD"):  # /{ns}/{name}/resolve/{rev}/{path}
                i = parts.index("resolve", 2)
                return self._resolve_file("/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2 :]), authed,
                                          repo_type)
            raise HubError(404, "Not found")
        route = (method, *segs[1:3])
        if route == ("GET", "whoami-v2"):
            return 200, {"type": "user", "name": USER, "fullname": "Local Hub", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}}, {}
        if route == ("GET", "agent-harnesses"):  # user-agent agent detection (skipped when telemetry is off)
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}
        if route == ("POST", "validate-yaml"):  # called before README.md uploads; the client reads both keys
            return 200, {"errors": [], "warnings": []}, {}
        if not authed and method != "GET" and method != "HEAD":
            raise HubError(401, "Invalid credentials in Authorization header")
        if route == ("POST", "repos", "create"):
            return self._create_repo(json.loads(body or b"{}"))
        if route == ("DELETE", "repos", "delete"):
            payload = json.loads(body or b"{}")
            repo_type = payload.get("type") or "model"
            repo = self._repo(f"{payload.get('organization') or USER}/{payload['name']}", True, repo_type)
            del self._repos[(repo_type, repo.repo_id)]
            return 200, {}, {}
        if len(segs) < 4 or segs[1] not in REPO_TYPES:
            raise HubError(404, f"Unknown endpoint: {method} /{'/'.join(segs)}")
        repo = self._repo(f"{segs[2]}/{segs[3]}", authed, REPO_TYPES[segs[1]])
        action, args = (segs[4] if len(segs) > 4 else ""), segs[5:]
        if repo.repo_type == "space" and action == "variables":
            return self._variables(method, repo, json.loads(body or b"{}"))
        return self._repo_action(method, repo, action, args, query, body)

    def _variables(self, method: str, repo: _Repo, payload: dict):
        """GET lists a Space's variables; POST adds or updates one; DELETE removes one (by "key")."""
        if method == "POST":
            repo.variables[payload["key"]] = {"value": payload["value"], "description": payload.get("description"),
                                              "updatedAt": _now()}
        elif method == "DELETE":
            repo.variables.pop(payload["key"], None)
        return 200, dict(repo.variables), {}

    def _create_repo(self, payload: dict):
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES.values():
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        if repo_type == "space" and not payload.get("sdk"):
            raise HubError(400, "No sdk provided: a Space needs space_sdk (gradio, docker or static)")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
        url = f"{self.url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self._repos:  # create_repo(exist_ok=True) reads `url` from this 409 body
            raise HubError(409, f"You already created this {repo_type} repo", url=url)
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = self._repos[(repo_type, repo_id)] = _Repo(repo_id, private, _now(), repo_type, payload.get("sdk"))
        repo.branches["main"] = self._commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit").sha
        return 200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex}, {}

    def _repo_action(self, method: str, repo: _Repo, action: str, args: list[str], query: dict, body: bytes):
        rev = args[0] if args else "main"
        if method == "GET" and action in ("", "revision"):  # repo_info / model_info(revision=)
            return 200, self._info(repo, self._resolve(repo, rev), blobs=_flag(query, "blobs")), {}
        if method == "GET" and action == "tree":  # list_repo_tree / list_repo_files (one page, no Link header)
            return 200, _tree(self._resolve(repo, rev), "/".join(args[1:]).strip("/"), _flag(query, "recursive")), {}
        if method == "GET" and action == "refs":
            return 200, {"branches": _refs("heads", repo.branches), "tags": _refs("tags", repo.tags),
                         "converts": [], "pullRequests": []}, {}
        if method == "GET" and action == "commits":  # newest first, following parent pointers
            commit, out = self._resolve(repo, rev), []
            while commit is not None:
                out.append({"id": commit.sha, "title": commit.title, "message": commit.message,
                            "date": commit.date, "authors": [{"user": USER, "avatar": None}]})
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return 200, out, {}
        if method == "POST" and action == "preupload":
            head = self._branch_head(repo, rev)
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": git_blob_oid(head.files[f["path"]]) if f["path"] in head.files else None}
                     for f in json.loads(body)["files"]]
            return 200, {"files": files, "commitOid": head.sha}, {}
        if method == "POST" and action == "commit":
            if _flag(query, "create_pr"):
                raise HubError(400, "LocalHub does not support create_pr")
            return self._apply_commit(repo, rev, body)
        if action in ("tag", "branch") and method in ("POST", "DELETE"):
            refs_dict = repo.tags if action == "tag" else repo.branches
            if method == "DELETE":
                if refs_dict.pop(rev, None) is None:
                    raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
                return 200, {}, {}
            payload = json.loads(body or b"{}")
            # create_tag posts to /tag/{revision} with {"tag": name}; create_branch to /branch/{name}.
            name, start = (payload["tag"], rev) if action == "tag" else (rev, payload.get("startingPoint") or "main")
            target = self._resolve(repo, start)
            if name in refs_dict:
                raise HubError(409, f"{action.capitalize()} {name} already exists")
            refs_dict[name] = target.sha
            return 200, {}, {}
        raise HubError(404, f"Unknown endpoint: {method} {action}")

    def _branch_head(self, repo: _Repo, branch: str) -> _Commit:
        if branch not in repo.branches:  # commits go to branches only, as on the Hub
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return repo.commits[repo.branches[branch]]

    def _apply_commit(self, repo: _Repo, branch: str, body: bytes):
        """The ndjson commit: a header line, then file / deletedFile / deletedFolder lines."""
        head = self._branch_head(repo, branch)
        files, header = dict(head.files), {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = value["content"]
                is_b64 = value.get("encoding") == "base64"
                files[value["path"]] = base64.b64decode(content) if is_b64 else content.encode()
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(404, "A folder with this name doesn't exist", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:  # lfsFile: never happens, since preupload answers "regular" for every file
                raise HubError(400, f"LocalHub does not support '{key}' commit operations")
        if header.get("parentCommit") and header["parentCommit"] != head.sha:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self._commit(repo, head, files, header.get("summary") or "commit", header.get("description", ""))
        repo.branches[branch] = commit.sha
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo.repo_type]
        commit_url = f"{self.url}/{prefix}{repo.repo_id}/commit/{commit.sha}"
        return 200, {"success": True, "commitOid": commit.sha, "commitUrl": commit_url,
                     "hookOutput": "", "pullRequestUrl": None}, {}

    def _resolve_file(self, repo_id: str, revision: str, path: str, authed: bool, repo_type: str = "model"):
        """HEAD/GET /{repo_id}/resolve/{rev}/{path}: hf_hub_download needs X-Repo-Commit, ETag, Content-Length."""
        commit = self._resolve(self._repo(repo_id, authed, repo_type), revision)
        if path not in commit.files:  # X-Repo-Commit lets the client cache the non-existence (.no_exist)
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_oid(data)}"'}
        return 200, data, {**headers, "Content-Type": "application/octet-stream"}


def _flag(query: dict, name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("1", "true")


def _refs(kind: str, refs: dict[str, str]) -> list[dict]:
    return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": sha} for n, sha in refs.items()]


def _tree(commit: _Commit, path: str, recursive: bool) -> list[dict]:
    """Tree entries under `path` (directories included, as the Hub lists them)."""
    prefix = f"{path}/" if path else ""
    entries: dict[str, dict] = {}
    for p, data in commit.files.items():
        if not p.startswith(prefix):
            continue
        parts = p[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            d = prefix + "/".join(parts[:depth])
            oid = hashlib.sha1(f"{commit.sha}:{d}".encode()).hexdigest()
            entries[d] = {"type": "directory", "oid": oid, "size": 0, "path": d}
        if recursive or len(parts) == 1:
            entries[p] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": p}
    if path and not entries:
        raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
    return [entries[k] for k in sorted(entries)]


class _Handler(BaseHTTPRequestHandler):
    """Parses requests, records (method, path), serialises answers. Never logs (headers hold the token)."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses one pooled connection
    timeout = 60  # idle keep-alive sockets are dropped after this

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.hub.requests.append((method, parts.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # the client always sends it
        segs = [unquote(s) for s in parts.path.strip("/").split("/")]  # split first: revisions arrive %2F-quoted
        authed = self.headers.get("Authorization", "").startswith("Bearer ")
        try:
            if authed and self.headers["Authorization"].removeprefix("Bearer ") in self.hub.revoked:
                raise HubError(401, "Invalid credentials in Authorization header")  # what the Hub says, any URL
            with self.hub._lock:
                status, payload, headers = self.hub._route(method, segs, parse_qs(parts.query), body, authed)
        except HubError as e:
            status, payload = e.status, {"error": e.message, **e.extra}
            message = e.message.encode("ascii", "replace").decode()  # header values must be latin-1
            headers = {**e.headers, **({"X-Error-Code": e.code} if e.code else {}), "X-Error-Message": message}
        except Exception as e:  # a bug here should surface as a 500, not a hung client
            status, payload, headers = 500, {"error": f"LocalHub error: {e!r}"}, {}
        if not isinstance(payload, bytes):
            payload, headers = json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)


# ---------------------------------------------------------------------- pytest fixtures
@pytest.fixture(scope="session")
def local_hub():
    """One LocalHub per session, on the port of ``HF_ENDPOINT`` (``http://127.0.0.1:PORT``).

    If HF_ENDPOINT is unset or not such a URL, a free port is chosen and HF_ENDPOINT set here,
    which only helps if huggingface_hub has not been imported yet (see module docstring).
    """
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", ""))
    if endpoint.scheme == "http" and endpoint.hostname == "127.0.0.1" and endpoint.port:
        port = endpoint.port
    else:
        port = free_port()
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    hub = LocalHub(port=port).start()
    try:
        _check_endpoint(hub)
        yield hub
    finally:
        hub.stop()


def _check_endpoint(hub: LocalHub) -> None:
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and constants.ENDPOINT != hub.url:
        raise RuntimeError(
            f"huggingface_hub was imported with ENDPOINT={constants.ENDPOINT!r}, not the local hub {hub.url!r}: "
            "set HF_ENDPOINT (conftest.py, at import time) before anything imports huggingface_hub."
        )


@pytest.fixture
def hub_online(local_hub, tmp_path, monkeypatch):
    """The session's LocalHub, emptied, with offline mode off, a fresh HF_HOME/cache and a dummy HF_TOKEN.

    huggingface_hub 2.4 reads HF_HUB_OFFLINE once at import (``constants.HF_HUB_OFFLINE``, returned by
    ``is_offline_mode()`` and checked on every request), while peft re-reads ``os.environ`` and
    ``constants.HF_HUB_OFFLINE`` directly: both are flipped. Cache paths are also frozen at import,
    so they are patched on ``constants`` too. Telemetry stays off, so the only requests are the test's.
    monkeypatch restores everything afterwards.
    """
    from huggingface_hub import constants

    _check_endpoint(local_hub)
    home = tmp_path / "hf_home"
    paths = {
        "HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HUGGINGFACE_HUB_CACHE": home / "hub",
        "HF_ASSETS_CACHE": home / "assets", "HUGGINGFACE_ASSETS_CACHE": home / "assets",
        "HF_TOKEN_PATH": home / "token", "HF_STORED_TOKENS_PATH": home / "stored_tokens",
        "HF_XET_CACHE": home / "xet", "AGENT_HARNESSES_PATH": home / ".agent_harnesses.json",
    }
    for name, value in {**paths, "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True}.items():
        monkeypatch.setattr(constants, name, str(value) if name in paths else value)
    for name in ("HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.setenv(name, str(paths[name]))
    for name, value in {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_TOKEN": DUMMY_TOKEN,
                        "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    local_hub.reset()
    yield local_hub
