"""Start a real `triattn serve` process for tests and wait until it answers; raw HTTP and Prometheus helpers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "triattn_local.cli"]
SCRIPTED = [sys.executable, str(ROOT / "tests" / "serve_scripted.py")]


class Server:
    """A server process on a free port (--port 0; the port is read from its ready line)."""

    def __init__(self, argv: list[str], log_path: Path, api_key: str | None = None):
        self.log_path = log_path
        self.api_key = api_key
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        # one torch thread: on a small shared CPU, more threads contend and decode several times slower
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.pop("TRIATTN_API_KEY", None)
        self.proc = subprocess.Popen(argv + ["--port", "0"], stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=ROOT)
        self.base = None
        self.health_seen: list[int] = []  # /health statuses while starting

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return self.base + "/v1"

    def wait_ready(self, timeout: float = 240) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if self.base is None:
                m = re.search(r"ready at (http://[^ ]+)/v1|loading", self.output())
                port = _listening_port(self.proc.pid)
                if port:
                    self.base = f"http://127.0.0.1:{port}"
                elif m and m.group(1):
                    self.base = m.group(1)
            if self.base is not None:
                status, _ = http("GET", self.base + "/health")
                self.health_seen.append(status)
                if status == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str):
        return http("GET", self.base + path, headers=self.headers())

    def post(self, path: str, body, headers: dict | None = None):
        return http("POST", self.base + path, body, headers={**self.headers(), **(headers or {})})

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return parse_prometheus(text)

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=self.api_key or "none", max_retries=0, timeout=120, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def _listening_port(pid: int) -> int | None:
    """The TCP port the process listens on (it was started with --port 0)."""
    import psutil

    try:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                return conn.laddr.port
    except psutil.Error:
        return None
    return None


def http(method: str, url: str, body=None, headers: dict | None = None, timeout: float = 120):
    """(status, parsed JSON or text). body: dict/list (sent as JSON), bytes or str (sent as is)."""
    data = None
    headers = dict(headers or {})
    if body is not None:
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        else:
            data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, _decode(r.read(), r.headers.get("content-type", ""))
    except urllib.error.HTTPError as e:
        return e.code, _decode(e.read(), e.headers.get("content-type", ""))
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def _decode(raw: bytes, content_type: str):
    if "json" in content_type:
        return json.loads(raw)
    return raw.decode(errors="replace")


def parse_prometheus(text: str) -> dict[str, float]:
    """{'name{labels}': value} of every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def assert_openai_error(status: int, body, expected_status: int | None = None) -> dict:
    """The body is {"error": {"message", "type", "param", "code"}} with a 4xx status; returns the error."""
    assert 400 <= status < 500, (status, body)
    if expected_status is not None:
        assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str), error
    assert "Traceback" not in error["message"]
    return error


def demo_problem(steps: int, seed: int):
    """A held-out demo problem (.prompt, .answer): the demo model thinks `steps` lines, then answers."""
    import random

    from triattn_local.demo.task import make_problem

    return make_problem(random.Random(10**9 + seed), steps)


def start(argv: list[str], tmp_path_factory, name: str, api_key: str | None = None) -> Server:
    log = tmp_path_factory.mktemp(name) / "server.log"
    return Server(argv, log, api_key=api_key).wait_ready()
