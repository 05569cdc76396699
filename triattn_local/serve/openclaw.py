"""`triattn openclaw`: the provider entry OpenClaw needs for a running `triattn serve`, read from the server itself
(GET /v1/models and /props), so the model id, context window and output cap are exactly what the server reports.

The server is found at --url, else on the default port, else at the URL a running `triattn serve` records
(running.py). The entry has an apiKey only when the server wants one (OpenClaw's doctor warns about plaintext keys),
and for reasoning models (Qwen3 family) compat.thinkingFormat "qwen-chat-template", so that OpenClaw's thinking
levels reach the chat template as chat_template_kwargs.enable_thinking. --write merges into an existing entry:
fields triattn does not own (the user's compat options, other models, names …) are kept."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError
from ..files import resolve_target, unique_backup, write_atomic

DEFAULT_MAX_TOKENS = 8192  # OpenClaw's own default output cap
DEFAULT_URL = "http://127.0.0.1:8000"
THINKING_FORMAT = "qwen-chat-template"  # OpenClaw sends chat_template_kwargs: {enable_thinking, preserve_thinking}


def _get(url: str, api_key: str | None) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise UserError(f"{url}: the server wants an API key (--api-key)") from None
        if e.code == 503:
            raise UserError(f"{url}: the server is still loading the model; try again shortly") from None
        raise UserError(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"{url}: no triattn server answers ({reason}); start one with `triattn serve`") from None
    except ValueError:
        raise UserError(f"{url}: the answer is not JSON; is this a triattn server?") from None


def find_server(url: str | None, api_key: str | None) -> str:
    """The base URL of the server to describe: --url, else the default port, else a running `triattn serve`'s."""
    if url:
        return url
    from .running import running_servers

    candidates = [DEFAULT_URL] + [r["url"] for r in running_servers()]
    for candidate in candidates:
        base = candidate.rstrip("/").removesuffix("/v1")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=3):
                return base
        except urllib.error.HTTPError:  # it answers (503 while loading, 401 …): a server is there
            return base
        except (urllib.error.URLError, OSError, ValueError):
            continue
    raise UserError(f"no triattn server answers at {DEFAULT_URL} and none is recorded as running; start one with "
                    "`triattn serve` or name it with --url")


def provider_entry(base: str, api_key: str | None) -> dict:
    """The models.providers.<id> value: baseUrl, api, an apiKey if the server wants one, and the one model as
    /v1/models names it."""
    base = base.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    models = _get(f"{base}/v1/models", api_key)
    props = _get(f"{base}/props", api_key)
    try:
        model = models["data"][0]
        context = int(model["context_length"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise UserError(f"{base}/v1/models: no model with a context_length; is this a triattn server?") from None
    extra = props.get("triattn", {}) if isinstance(props, dict) else {}
    cap = extra.get("max_tokens") or min(DEFAULT_MAX_TOKENS, context // 2)
    reasoning = bool(extra.get("reasoning", False))
    entry = {"baseUrl": f"{base}/v1", "api": "openai-completions"}
    wants_key = extra.get("api_key", api_key is not None)  # what the server says (older ones do not)
    if wants_key and api_key:
        entry["apiKey"] = api_key
    card = {
        "id": model["id"],
        "name": f"{model['id']} (triattn)",
        "reasoning": reasoning,
        "input": ["text"],
        "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
        "contextWindow": context,
        "maxTokens": int(cap),
    }
    if reasoning:
        card["compat"] = {"thinkingFormat": THINKING_FORMAT}
    entry["models"] = [card]
    return entry


def merge_entry(old, new: dict) -> dict:
    """The provider entry after --write: the new one's fields over the old one's, the old entry's other models kept,
    and within our model (same id) its fields and compat options we do not set kept. A server without a key
    takes the apiKey out (nothing to send; OpenClaw warns about plaintext keys)."""
    if not isinstance(old, dict):
        return new
    merged = {k: v for k, v in old.items() if k != "apiKey"}
    merged.update({k: v for k, v in new.items() if k != "models"})
    old_models = old.get("models")
    models = [m for m in old_models if isinstance(m, dict)] if isinstance(old_models, list) else []
    for card in new["models"]:
        mine = next((m for m in models if m.get("id") == card["id"]), None)
        if mine is None:
            models.append(card)
            continue
        compat = dict(mine.get("compat") or {}) if isinstance(mine.get("compat"), dict) else {}
        compat.update(card.get("compat", {}))
        mine.update({k: v for k, v in card.items() if k != "compat"})
        if compat:
            mine["compat"] = compat
    merged["models"] = models
    return merged


def merge(config_path: Path, provider: str, entry: dict) -> Path | None:
    """Put the entry at models.providers.<provider> of the config file, keeping everything else; returns the
    backup made of the old file (None when there was no file).

    The file may hold other providers' keys: a new one is created 0600 (folder 0700), an existing one keeps its
    mode, a symlinked one (dotfiles) stays a link, and the write goes through a temporary file and a rename."""
    target = resolve_target(config_path)
    config: dict = {}
    backup = None
    if target.is_dir():
        raise UserError(f"{config_path} is a directory, not OpenClaw's config file")
    if target.exists():
        try:
            text = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {config_path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            config = json.loads(text, parse_constant=_refuse_constant) if text.strip() else {}
        except ValueError:
            raise UserError(f"{config_path} is not plain JSON (comments or JSON5?): add the entry printed by "
                            "`triattn openclaw` by hand") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: expected a JSON object at the top")
    models = config.setdefault("models", {})
    if not isinstance(models, dict) or not isinstance(models.setdefault("providers", {}), dict):
        raise UserError(f"{config_path}: 'models.providers' is not an object")
    models["providers"][provider] = merge_entry(models["providers"].get(provider), entry)
    try:  # 1e400 reads as inf, which JSON cannot write back (it would come out as the invalid `Infinity`)
        data = json.dumps(config, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        raise UserError(f"{config_path} holds a number too large for a double (such as 1e400): it cannot be "
                        "rewritten without changing it; add the entry printed by `triattn openclaw` by hand") from None
    if target.exists():
        backup = unique_backup(target)
    write_atomic(target, data, private=True)
    return backup


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def openclaw_command(url: str | None, api_key: str | None, provider: str, write: bool, config: str) -> None:
    entry = provider_entry(find_server(url, api_key), api_key)
    model_ref = f"{provider}/{entry['models'][0]['id']}"
    if not write:
        print(json.dumps({"models": {"providers": {provider: entry}}}, indent=2, ensure_ascii=False))
        print(f"merge it into ~/.openclaw/openclaw.json (or run with --write); agents name the model {model_ref}",
              file=sys.stderr)
        return
    path = Path(config).expanduser()
    backup = merge(path, provider, entry)
    saved = f" (backup: {backup})" if backup else ""
    print(f"wrote provider '{provider}' to {path}{saved}; agents name the model {model_ref}", file=sys.stderr)
