"""Where running `triattn serve` processes listen: each records its URL in a small file while it runs, so that
`triattn openclaw` finds a server on another port than the default without being told."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from ..files import write_atomic
from ..stats_cache import triattn_cache


def servers_dir() -> Path:
    return triattn_cache() / "servers"


@contextlib.contextmanager
def recorded(url: str, model: str, api_key: bool) -> Iterator[None]:
    """Record this server (url, model, whether it wants a key; never the key) while the block runs."""
    path = servers_dir() / f"{os.getpid()}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"url": url, "model": model, "api_key": api_key, "pid": os.getpid(),
                                       "started": time.time()}) + "\n")
    except Exception:  # a read-only cache costs discovery only, never the server
        path = None
    try:
        yield
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


def running_servers() -> list[dict]:
    """Recorded servers whose process is alive, most recent first (records of dead processes are removed)."""
    out = []
    for path in servers_dir().glob("*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            pid, url = int(record["pid"]), str(record["url"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not _alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        out.append(dict(record, url=url, pid=pid))
    return sorted(out, key=lambda r: r.get("started", 0), reverse=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
