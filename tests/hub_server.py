"""A small Hub-compatible HTTP server for tests, on 127.0.0.1, in a thread (stdlib only).

It implements just enough of the Hugging Face Hub API for the real ``huggingface_hub`` client (repo creation,
preupload, the LFS batch protocol with basic transfers, NDJSON commits, branches, tags, refs, commits, tree,
paths-info, revision info, whoami, YAML validation) and for ``datasets.load_dataset`` (revision info, tree,
paths-info, ``resolve`` with the headers ``huggingface_hub`` reads and HTTP ranges) to run end to end.

Failure injection for tests: ``HubState.commit_failures`` is a list of HTTP statuses answered by the next
commit attempts; with ``apply_failed_commits=True`` the server applies such a commit and THEN answers the error
(the "response lost" case a blind retry would duplicate).

Example:
    >>> server = LocalHub(tokens={"hf_TESTSECRET": "tester"})   # doctest: +SKIP
    >>> server.start(); server.endpoint                          # doctest: +SKIP
    'http://127.0.0.1:54321'
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
LFS_SUFFIXES = (".parquet", ".arrow", ".png", ".jpg", ".bin", ".safetensors", ".gguf", ".zip", ".gz")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class Blob:
    """A file in a commit: its bytes, and the sha256 when it is stored through LFS."""

    data: bytes
    lfs_sha256: str | None = None

    @property
    def git_oid(self) -> str:
        if self.lfs_sha256:
            return git_blob_oid(lfs_pointer(self.lfs_sha256, len(self.data)))
        return git_blob_oid(self.data)

    def entry(self, path: str) -> dict:
        out = {"type": "file", "oid": self.git_oid, "size": len(self.data), "path": path}
        if self.lfs_sha256:
            out["lfs"] = {
                "oid": self.lfs_sha256,
                "size": len(self.data),
                "pointerSize": len(lfs_pointer(self.lfs_sha256, len(self.data))),
            }
        return out


@dataclasses.dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, Blob]
    date: str
    author: str


@dataclasses.dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        revision = unquote(revision)
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if revision.startswith(prefix):
                sha = table.get(revision[len(prefix):])
                return self.commits.get(sha) if sha else None
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha:
            return self.commits[sha]
        matches = [c for s, c in self.commits.items() if len(revision) >= 7 and s.startswith(revision)]
        return matches[0] if len(matches) == 1 else None

    def history(self, sha: str) -> list[Commit]:
        out = []
        while sha:
            commit = self.commits[sha]
            out.append(commit)
            sha = commit.parent
        return out


@dataclasses.dataclass
class HubState:
    """Everything the server holds; tests read and tweak it directly."""

    tokens: dict[str, str]  # token -> user name
    repos: dict[tuple[str, str], Repo] = dataclasses.field(default_factory=dict)
    lfs_objects: dict[str, bytes] = dataclasses.field(default_factory=dict)
    upload_slots: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)  # id -> (sha256, size)
    requests: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)  # (method, path, status)
    commit_failures: list[int] = dataclasses.field(default_factory=list)
    apply_failed_commits: bool = False
    commit_attempts: int = 0
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)

    def stored_bytes(self) -> list[bytes]:
        """Every byte string the server stores (files of every commit, LFS objects, commit messages)."""
        out = list(self.lfs_objects.values())
        for repo in self.repos.values():
            for commit in repo.commits.values():
                out.append(f"{commit.title}\n{commit.message}".encode())
                out.extend(blob.data for blob in commit.files.values())
        return out


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.error_code, self.body = status, message, error_code, body


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    # ------------------------------------------------------------------ plumbing
    def log_message(self, format, *args):  # noqa: A002 - silence stderr access logs
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _user(self, required: bool) -> str | None:
        auth = self.headers.get("Authorization")
        if auth is None:
            if required:
                raise HubError(401, "You must be authenticated to access this resource")
            return None
        token = auth.removeprefix("Bearer ").strip()
        user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json", log=True):
        if log:  # logged before the reply leaves, so a client that has its answer always finds the request logged
            with self.state.lock:
                self.state.requests.append((self.command, urlsplit(self.path).path, status))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None, log: bool = True):
        self._send(status, json.dumps(obj).encode(), headers, log=log)

    def _error(self, err: HubError):
        headers = {"X-Error-Message": err.message}
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        self._json({"error": err.message, **err.body}, err.status, headers)

    def _dispatch(self):
        try:
            split = urlsplit(self.path)
            parts = [unquote(p) for p in split.path.strip("/").split("/")]
            query = parse_qs(split.query)
            with self.state.lock:
                self.route(parts, query)
        except HubError as err:
            self._error(err)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch

    # ------------------------------------------------------------------ routing
    def _repo(self, repo_type: str, repo_id: str, write: bool = False) -> tuple[Repo, str | None]:
        user = self._user(required=write)
        repo = self.state.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo_id.split("/")[0]):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if write and user != repo_id.split("/")[0]:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo, user

    @staticmethod
    def _commit_of(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def route(self, parts: list[str], query: dict):
        method = self.command
        if parts[:2] == ["api", "agent-harnesses"]:  # client telemetry registry: empty, and not logged
            return self._json({"standardEnvVars": [], "harnesses": {}}, log=False)
        if parts[:2] == ["api", "whoami-v2"]:
            user = self._user(required=True)
            return self._json({"type": "user", "name": user, "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if parts[:2] == ["api", "validate-yaml"] and method == "POST":
            return self.validate_yaml(json.loads(self._body()))
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self.create_repo(json.loads(self._body()))
        if len(parts) >= 4 and parts[0] == "api" and parts[1] in REPO_TYPES:
            repo_type, repo_id, rest = REPO_TYPES[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:]
            return self.api(method, repo_type, repo_id, rest, query)
        # LFS protocol: /{prefix}{ns}/{name}.git/info/lfs/objects/batch and our upload/verify slots
        if parts[:2] == ["lfs", "upload"] and method == "PUT":
            return self.lfs_put(parts[2])
        if parts[:2] == ["lfs", "verify"] and method == "POST":
            return self.lfs_verify(json.loads(self._body()))
        repo_type = "model"
        if parts and parts[0] in ("datasets", "spaces"):
            repo_type, parts = REPO_TYPES[parts[0]], parts[1:]
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self.lfs_batch(repo_type, f"{parts[0]}/{parts[1][:-4]}", json.loads(self._body()))
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve_file(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        raise HubError(404, f"Not implemented by the test Hub: {method} {self.path}")

    def api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict):
        head = rest[0] if rest else None
        if head is None and method == "GET" or head == "revision" and method == "GET":
            repo, _ = self._repo(repo_type, repo_id)
            return self.repo_info(repo, rest[1] if rest else "main")
        if head == "refs" and method == "GET":
            repo, _ = self._repo(repo_type, repo_id)
            return self._json(
                {
                    "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo.branches.items()],
                    "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.tags.items()],
                    "converts": [],
                    "pullRequests": [],
                }
            )
        if head == "commits" and method == "GET":
            repo, _ = self._repo(repo_type, repo_id)
            commits = repo.history(self._commit_of(repo, rest[1]).sha)
            return self._json(
                [{"id": c.sha, "title": c.title, "message": c.message, "authors": [{"user": c.author}], "date": c.date} for c in commits]
            )
        if head == "tree" and method == "GET":
            repo, _ = self._repo(repo_type, repo_id)
            commit = self._commit_of(repo, rest[1])
            recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
            return self._json(self.tree(commit, "/".join(rest[2:]), recursive, query.get("expand", ["False"])[0].lower() in ("1", "true")))
        if head == "paths-info" and method == "POST":
            repo, _ = self._repo(repo_type, repo_id)
            commit = self._commit_of(repo, rest[1])
            form = parse_qs(self._body().decode())
            return self._json(self.paths_info(commit, form.get("paths", [])))
        if head == "preupload" and method == "POST":
            repo, _ = self._repo(repo_type, repo_id, write=True)
            return self.preupload(repo, rest[1], json.loads(self._body()))
        if head == "commit" and method == "POST":
            repo, user = self._repo(repo_type, repo_id, write=True)
            return self.commit(repo, user, rest[1], self._body())
        if head == "branch" and method == "POST":
            repo, _ = self._repo(repo_type, repo_id, write=True)
            body = json.loads(self._body() or b"{}")
            if rest[1] in repo.branches:
                raise HubError(409, f"Branch {rest[1]} already exists")
            start = self._commit_of(repo, body.get("startingPoint") or "main")
            repo.branches[rest[1]] = start.sha
            return self._json({})
        if head == "tag" and method == "POST":
            repo, _ = self._repo(repo_type, repo_id, write=True)
            body = json.loads(self._body())
            if body["tag"] in repo.tags:
                raise HubError(409, f"Tag {body['tag']} already exists")
            repo.tags[body["tag"]] = self._commit_of(repo, rest[1]).sha
            return self._json({})
        if head == "tag" and method == "DELETE":
            repo, _ = self._repo(repo_type, repo_id, write=True)
            if repo.tags.pop(rest[1], None) is None:
                raise HubError(404, f"Tag {rest[1]} not found", "RevisionNotFound")
            return self._json({})
        raise HubError(404, f"Not implemented by the test Hub: {method} {self.path}")

    # ------------------------------------------------------------------ endpoints
    def validate_yaml(self, body: dict):
        match = re.match(r"^---\n(.*?)\n---", body.get("content", ""), re.S)
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return self._json({"errors": [{"message": str(err)}], "warnings": []}, 400)
        if data is not None and not isinstance(data, dict):
            return self._json({"errors": [{"message": "metadata must be a mapping"}], "warnings": []}, 400)
        return self._json({"errors": [], "warnings": []})

    def create_repo(self, body: dict):
        user = self._user(required=True)
        namespace = body.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        repo_type = body.get("type") or "model"
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.base}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.state.repos:
            raise HubError(409, "You already created this repo", url=url)  # the Hub answers the url with a 409 too
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo = Repo(repo_type, repo_id, private, now_iso())
        self._new_commit(repo, None, "initial commit", "", {".gitattributes": Blob(GITATTRIBUTES)}, user)
        self.state.repos[(repo_type, repo_id)] = repo
        return self._json({"url": url, "name": repo_id, "id": uuid.uuid4().hex})

    def _new_commit(self, repo: Repo, branch: str | None, title: str, message: str, files: dict, user: str) -> Commit:
        parent = repo.branches.get(branch or "main")
        sha = hashlib.sha1(f"{parent}{title}{uuid.uuid4()}".encode()).hexdigest()
        commit = Commit(sha, parent, title, message, files, now_iso(), user)
        repo.commits[sha] = commit
        repo.branches[branch or "main"] = sha
        return commit

    def repo_info(self, repo: Repo, revision: str):
        commit = self._commit_of(repo, revision)
        card_data = None
        readme = commit.files.get("README.md")
        if readme is not None:
            match = re.match(r"^---\n(.*?)\n---", readme.data.decode(), re.S)
            card_data = yaml.safe_load(match.group(1)) if match else None
        return self._json(
            {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created_at,
                "lastModified": commit.date,
                "cardData": card_data,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            }
        )

    @staticmethod
    def _dirs(commit: Commit) -> set[str]:
        dirs = set()
        for path in commit.files:
            pieces = path.split("/")[:-1]
            dirs.update("/".join(pieces[: i + 1]) for i in range(len(pieces)))
        return dirs

    def _entry(self, commit: Commit, path: str, expand: bool) -> dict:
        if path in commit.files:
            entry = commit.files[path].entry(path)
        else:
            entry = {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
        return entry

    def tree(self, commit: Commit, path: str, recursive: bool, expand: bool) -> list[dict]:
        path = path.strip("/")
        dirs = self._dirs(commit)
        if path and path not in dirs:
            raise HubError(404, f"Path {path} not found", "EntryNotFound")
        prefix = f"{path}/" if path else ""
        out = []
        for candidate in sorted(dirs | set(commit.files)):
            if not candidate.startswith(prefix) or candidate == path:
                continue
            if not recursive and "/" in candidate[len(prefix):]:
                continue
            out.append(self._entry(commit, candidate, expand))
        return out

    def paths_info(self, commit: Commit, paths: list[str]) -> list[dict]:
        dirs = self._dirs(commit)
        return [self._entry(commit, p.strip("/"), False) for p in paths if p.strip("/") in commit.files or p.strip("/") in dirs]

    def preupload(self, repo: Repo, revision: str, body: dict):
        commit = repo.resolve(revision)
        files = []
        for item in body["files"]:
            path = item["path"]
            lfs = path.endswith(LFS_SUFFIXES) or b"\0" in base64.b64decode(item["sample"])
            blob = commit.files.get(path) if commit else None
            oid = (blob.lfs_sha256 if lfs else blob.git_oid) if blob else None
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return self._json({"files": files, "commitOid": commit.sha if commit else None})

    def lfs_batch(self, repo_type: str, repo_id: str, body: dict):
        self._repo(repo_type, repo_id, write=True)
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.state.lfs_objects:
                slot = uuid.uuid4().hex
                self.state.upload_slots[slot] = (oid, size)
                entry["actions"] = {
                    "upload": {"href": f"{self.base}/lfs/upload/{slot}"},
                    "verify": {"href": f"{self.base}/lfs/verify/{quote(repo_id)}"},
                }
            objects.append(entry)
        return self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_put(self, slot: str):
        if slot not in self.state.upload_slots:
            raise HubError(404, "Unknown upload slot")
        oid, size = self.state.upload_slots.pop(slot)
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid or len(data) != size:
            raise HubError(400, "Uploaded content does not match its oid/size")
        self.state.lfs_objects[oid] = data
        return self._send(200)

    def lfs_verify(self, body: dict):
        self._user(required=True)
        if body["oid"] not in self.state.lfs_objects:
            raise HubError(404, f"LFS object {body['oid']} was not uploaded")
        return self._json({})

    def commit(self, repo: Repo, user: str, revision: str, body: bytes):
        self.state.commit_attempts += 1
        fail_with = self.state.commit_failures.pop(0) if self.state.commit_failures else None
        if fail_with is not None and not self.state.apply_failed_commits:
            raise HubError(fail_with, "Service temporarily unavailable (injected by the test Hub)")
        branch = unquote(revision)
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        head = repo.commits[repo.branches[branch]]
        parent = header.get("parentCommit")
        if parent and not head.sha.startswith(parent):
            raise HubError(412, f"A commit has happened since {parent}: the branch head is now {head.sha}")
        files = dict(head.files)
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]))
            elif key == "lfsFile":
                data = self.state.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(400, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = Blob(data, value["oid"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                for path in [p for p in files if p.startswith(value["path"].rstrip("/") + "/")]:
                    files.pop(path)
        commit = self._new_commit(repo, branch, header["summary"], header.get("description", ""), files, user)
        if fail_with is not None:  # applied, then the answer is "lost"
            raise HubError(fail_with, "Service temporarily unavailable (injected by the test Hub)")
        url = f"{self.base}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.sha}"
        return self._json({"success": True, "commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None})

    def resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str):
        repo, _ = self._repo(repo_type, repo_id)
        commit = self._commit_of(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, f"Entry {path} not found", "EntryNotFound")
        etag = f'"{blob.lfs_sha256 or blob.git_oid}"'
        headers = {"X-Repo-Commit": commit.sha, "ETag": etag, "Accept-Ranges": "bytes"}
        if blob.lfs_sha256:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(blob.data))})
        data, status = blob.data, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match and self.command == "GET":
            start = int(match.group(1)) if match.group(1) else max(0, len(data) - int(match.group(2)))
            end = int(match.group(2)) if match.group(1) and match.group(2) else len(data) - 1
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        content_type = "text/plain; charset=utf-8" if path.endswith(".md") else "application/octet-stream"
        return self._send(status, data, headers, content_type=content_type)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


class LocalHub:
    """The test Hub: ``start()`` serves on a free port of 127.0.0.1 in a daemon thread, ``stop()`` shuts it down."""

    def __init__(self, tokens: dict[str, str]):
        self.state = HubState(tokens=dict(tokens))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "call start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def repo(self, repo_id: str, repo_type: str = "dataset") -> Repo:
        return self.state.repos[(repo_type, repo_id)]

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # run standalone: python tests/hub_server.py  (token hf_local -> user "local")
    hub = LocalHub({"hf_local": "local"}).start()
    print(f"Test Hub at {hub.endpoint} (token hf_local, user 'local'); Ctrl-C to stop")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()
