"""How far oversized prompts grow a running `triattn serve`: RSS of the server process while N clients at once send
prompts of S MiB (far past the context, so all must be refused with 400), sampled every 10 ms from outside.

    python benchmarks/serve_memory.py [--clients 16 --mib 7 --endpoint completions|chat|both] [--count-only]
                                      [-- serve options]

The server serves the demo model (8192-token context) on a free port; its RSS is read after one ordinary request
(the baseline), then the peak while the big requests run. Prints one JSON line per endpoint: statuses, baseline,
peak and growth in MiB. The README's memory bound is what this measures.

The demo's longest token is 12 bytes, so any prompt over 96 KiB is refused by its size alone. A model with a large
vocabulary (longest token ~100+ bytes, 32k+ context) lets a 7 MiB prompt past that check, to the chunked count:
--count-only turns the byte check off in the server to measure that path.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil


def post(url: str, body: bytes, timeout: float = 600) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
    except (urllib.error.URLError, ConnectionError):
        return 0


def start_server(extra: list[str], log, count_only: bool = False) -> tuple[subprocess.Popen, str]:
    argv = ["serve", "demo", "--port", "0", *extra]
    patch = "import triattn_local.serve.limits as m; m.longest_token_bytes = lambda t: None; " if count_only else ""
    code = f"import sys; {patch}from triattn_local.cli import main; sys.argv = ['triattn'] + {argv!r}; main()"
    proc = subprocess.Popen([sys.executable, "-c", code],
                            stdout=log, stderr=subprocess.STDOUT, env={**__import__("os").environ,
                                                                      "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        text = Path(log.name).read_text(errors="replace")
        m = re.search(r"ready at (http://[^ ]+)/v1", text)
        if m:
            port = next(c.laddr.port for c in psutil.Process(proc.pid).net_connections("tcp")
                        if c.status == psutil.CONN_LISTEN)
            return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{text}")
        time.sleep(0.2)
    raise SystemExit("server not ready")


def body_for(endpoint: str, mib: float) -> bytes:
    words = ("lorem ipsum dolor sit amet " * (int(mib * 2**20) // 27 + 1))[: int(mib * 2**20)]
    if endpoint == "completions":
        return json.dumps({"prompt": words, "max_tokens": 8}).encode()
    return json.dumps({"messages": [{"role": "user", "content": words}], "max_tokens": 8}).encode()


def measure(base: str, pid: int, endpoint: str, clients: int, mib: float) -> dict:
    process = psutil.Process(pid)
    small = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
    assert post(f"{base}/v1/completions", small) == 200
    baseline = process.memory_info().rss
    peak, stop = baseline, threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    body = body_for(endpoint, mib)
    url = f"{base}/v1/{'completions' if endpoint == 'completions' else 'chat/completions'}"
    started = time.time()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(lambda _: post(url, body), range(clients)))
    seconds = time.time() - started
    time.sleep(0.5)
    stop.set()
    sampler.join()
    after = process.memory_info().rss
    return {"endpoint": endpoint, "clients": clients, "mib_each": mib,
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "baseline_mib": round(baseline / 2**20), "peak_mib": round(peak / 2**20),
            "growth_mib": round((peak - baseline) / 2**20), "after_mib": round(after / 2**20),
            "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--mib", type=float, default=7)
    parser.add_argument("--endpoint", choices=("completions", "chat", "both"), default="both")
    parser.add_argument("--count-only", action="store_true", help="no byte check: measure the chunked count")
    parser.add_argument("serve_options", nargs="*")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".log") as log:
        proc, base = start_server(args.serve_options, log, args.count_only)
        try:
            for endpoint in (["completions", "chat"] if args.endpoint == "both" else [args.endpoint]):
                row = measure(base, proc.pid, endpoint, args.clients, args.mib)
                print(json.dumps({**row, "byte_check": not args.count_only}), flush=True)
        finally:
            proc.terminate()
            proc.wait(15)


if __name__ == "__main__":
    main()
