"""A local HTTP server that answers like the Hugging Face Hub, for the endpoints huggingface_hub uses to download a
model (checked against huggingface_hub 2.4):

- GET  /api/models/{repo}[/revision/{rev}][?blobs=true]  repo info: sha, gated, siblings (with size, blobId, lfs)
- GET  /api/models/{repo}/tree/{rev}[?recursive=true]      the file listing snapshot_download reads
- HEAD /{repo}/resolve/{rev}/{path}                        ETag (sha256 for LFS files, git blob sha1 otherwise),
                                                           X-Repo-Commit, X-Linked-Size, Content-Length
- GET  /{repo}/resolve/{rev}/{path}                        the bytes, with Range support (206)
- errors as the Hub sends them: 404 + X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound,
  401 + GatedRepo for files of a gated repo.

Faults for tests: drop the connection after N bytes (once), stall after N bytes until released, or serve corrupted
bytes for the next K downloads of a file. Every request is logged.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = ""

    def __post_init__(self):
        h = hashlib.sha1()
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        self.sha = h.hexdigest()

    def etag(self, path: str) -> str:
        data = self.files[path]
        if path.endswith(LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def entry(self, path: str, blobs: bool = True) -> dict:
        data = self.files[path]
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        out = {"rfilename": path}
        if blobs:
            out.update(size=len(data), blobId=git_oid)
            if path.endswith(LFS_SUFFIXES):
                out["lfs"] = {"size": len(data), "sha256": self.etag(path), "pointerSize": 134}
        return out


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int
    sent: int  # body bytes written


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before the connection drops (once)
    stall_after: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before waiting for `release`
    corrupt: dict[str, int] = field(default_factory=dict)  # file -> how many more GETs serve flipped bytes
    release: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.faults = Faults()
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path, gated: bool = False) -> Repo:
        if isinstance(files, Path):
            files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
        repo = Repo(dict(files), gated=gated)
        self.repos[repo_id] = repo
        return repo

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.faults.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def requests(self, method: str | None = None, file: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.log if (method is None or r.method == method)
                    and (file is None or r.path.endswith("/" + file))]

    def record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._serve(head=True)

        def do_GET(self):
            self._serve(head=False)

        # -- routing --

        def _serve(self, head: bool):
            url = urlparse(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/"):], query)
            if "/resolve/" in path:
                repo_id, _, rest = path.lstrip("/").partition("/resolve/")
                rev, _, file = rest.partition("/")
                return self._resolve(repo_id, rev, file, head)
            self._error(404, "RepoNotFound", "not found")

        def _repo(self, repo_id: str, rev: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if rev not in ("main", repo.sha):
                self._error(404, "RevisionNotFound", "Invalid rev id")
                return None
            return repo

        def _api(self, rest: str, query: dict):
            parts = rest.split("/")
            repo_id = "/".join(parts[:2])
            tail = parts[2:]
            if tail[:1] == ["tree"]:
                repo = self._repo(repo_id, tail[1] if len(tail) > 1 else "main")
                if repo is None:
                    return
                listing = []
                for p in sorted(repo.files):
                    e = repo.entry(p)
                    item = {"type": "file", "oid": e["blobId"], "size": e["size"], "path": p}
                    if "lfs" in e:
                        item["lfs"] = {"oid": e["lfs"]["sha256"], "size": e["size"], "pointerSize": 134}
                    listing.append(item)
                return self._json(listing)
            rev = tail[1] if tail[:1] == ["revision"] and len(tail) > 1 else "main"
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            self._json({
                "_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                "siblings": [repo.entry(p, blobs) for p in sorted(repo.files)],
            })

        def _resolve(self, repo_id: str, rev: str, file: str, head: bool):
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if repo.gated:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
            if file not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found", commit=repo.sha)
            data = repo.files[file]
            faults = hub.faults
            if not head and faults.corrupt.get(file, 0) > 0:
                faults.corrupt[file] -= 1
                data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng and not head and rng.startswith("bytes="):
                start = int(rng[len("bytes="):].split("-")[0])
                status = 206
            body = data[start:]
            self.send_response(status)
            self.send_header("ETag", f'"{repo.etag(file)}"')
            self.send_header("X-Repo-Commit", repo.sha)
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                hub.record(Request("HEAD", self.path, None, status, 0))
                return
            cut = faults.drop_after.pop(file, None)
            stall = faults.stall_after.pop(file, None)
            limit = cut if cut is not None else stall
            if limit is not None and limit < len(body):
                self.wfile.write(body[:limit])
                self.wfile.flush()
                hub.record(Request("GET", self.path, rng, status, limit))
                if stall is not None:
                    faults.stalled.set()
                    faults.release.wait(timeout=60)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            self.wfile.write(body)
            hub.record(Request("GET", self.path, rng, status, len(body)))

        # -- responses --

        def _json(self, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            hub.record(Request("GET", self.path, None, 200, len(body)))

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            hub.record(Request(self.command, self.path, None, status, 0))

    return Handler
