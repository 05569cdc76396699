"""`triattn serve`: check the options, bind the port, load the model in the background (GET /health answers 503
meanwhile) and run uvicorn until Ctrl-C."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

from ..errors import UserError


def served_name(model: str) -> str:
    """The id /v1/models gives (what OpenClaw's config names): a model directory by its folder name, a Hugging Face
    repo by its name without the organisation (agents write PROVIDER/MODEL), a registry name or alias as typed."""
    from ..registry import ALIASES, is_repo_id, looks_like_path

    if model in ALIASES:
        return model
    if looks_like_path(model):
        return Path(model).expanduser().resolve().name or model
    if is_repo_id(model.partition(":")[0]) and "/" in model:
        return model.split("/", 1)[1]
    return model


def serve_command(model, host, port, api_key, served_model_name, no_compress, method, budget, divide_length, window,
                  sink, protect_prefill, pruning_mode, stats, max_tokens, temperature, top_p, parallel,
                  max_conversations, conversation_memory, device, dtype, backend, log_level,
                  allowed_hosts=None, max_waiting=16, kv_memory=None, engine_factory=None) -> None:
    """Run the server until interrupted. engine_factory() → Engine replaces the usual loader (tests serve a
    scripted engine through it)."""
    from ..backends import choose_backend
    from ..methods import check_method
    from ..policy import BudgetPolicy
    from ..registry import resolve_model

    # Everything cheap is checked before the model loads.
    chosen, _ = choose_backend(backend)
    check_method(method)
    policy = None if no_compress else BudgetPolicy(budget, divide_length, window, sink, protect_prefill, pruning_mode)
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535 (got {port})")
    if parallel < 1:
        raise UserError(f"--parallel must be at least 1 (got {parallel})")
    if max_conversations < 0 or conversation_memory < 0:
        raise UserError("--max-conversations and --conversation-memory cannot be negative")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
        raise UserError("--temperature must be in [0, 2] and --top-p in (0, 1]")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key is empty (so is TRIATTN_API_KEY if set): give a key, or leave it out for a "
                        "server that only this machine can use")
    if max_waiting < 0:
        raise UserError(f"--max-waiting cannot be negative (got {max_waiting})")
    hosts = _allowed_hosts(allowed_hosts, host, api_key)
    if stats and not Path(stats).expanduser().is_file():
        raise UserError(f"{stats}: stats file not found")
    if engine_factory is None and not resolve_model(model, backend=chosen).exists():  # unknown names, unpulled
        raise UserError(f"{model}: no such model directory")  # models and missing paths fail now, not after a bind
    sock = _bind(host, port)

    import uvicorn

    from .app import ServeOptions, ServerState, create_app

    options = ServeOptions(served_name=served_model_name or served_name(model), api_key=api_key,
                           allowed_hosts=hosts, max_waiting=max_waiting,
                           max_tokens=max_tokens, temperature=temperature, top_p=top_p, parallel=parallel,
                           kv_memory=None if kv_memory is None else int(kv_memory * (1 << 30)),
                           max_conversations=max_conversations, conversation_bytes=conversation_memory << 20)
    state = ServerState(options)
    app = create_app(state)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    failure: list[BaseException] = []
    url = f"http://{_display_host(host)}:{sock.getsockname()[1]}/v1"

    def load():
        try:
            from ..backends import llamacpp_runs, load_engine
            from ..engine import CompressionSettings
            from ..stats_cache import resolve_stats

            if engine_factory is not None:
                engine = engine_factory()
            else:
                engine = load_engine(model, backend=backend, device=device, dtype=dtype,
                                     llamacpp_ok=llamacpp_runs(policy is not None, method, pruning_mode, dtype))
            needs_stats = policy is not None and method == "triattention"
            settings = CompressionSettings(policy=policy, method=method,
                                           stats=resolve_stats(engine, stats) if needs_stats else None)
            state.attach(engine, settings)
            kv = f"KV budget {policy.budget} tokens ({method})" if policy else "full attention (no compression)"
            print(f"triattn serve: {options.served_name} ready at {url} · {engine.backend} · context "
                  f"{engine.context_length} · {kv}",
                  file=sys.stderr, flush=True)
        except BaseException as e:  # reported by the main thread, which stops the server
            failure.append(e)
            server.should_exit = True

    print(f"triattn serve: loading {model} (GET /health answers 503 until it is ready) …", file=sys.stderr,
          flush=True)
    threading.Thread(target=load, name="triattn-load", daemon=True).start()
    from .running import recorded

    try:
        with recorded(url, options.served_name, options.api_key is not None):  # `triattn openclaw` finds it
            server.run(sockets=[sock])
    finally:
        if state.scheduler is not None:
            state.scheduler.stop()
    if failure:
        raise failure[0]


def _allowed_hosts(value: str | None, host: str, api_key: str | None) -> tuple[str, ...] | None:
    """Host header names to answer (None: any). Without a key only loopback names and the bound address, so a web
    page cannot reach the model through DNS rebinding; with a key any, unless --allowed-hosts narrows it."""
    from .limits import is_loopback, parse_allowed_hosts

    if value is None and api_key is not None:
        hosts = None
    else:
        hosts = parse_allowed_hosts(value, host)
    bound = host.strip("[]")
    if api_key is None and not is_loopback(bound):
        served = "any Host header" if hosts is None else ", ".join(hosts)
        print(f"triattn serve: warning: --host {host} without --api-key: anyone who can reach this machine can use "
              f"the model (Host headers answered: {served}); set --api-key KEY", file=sys.stderr, flush=True)
    return hosts


def _bind(host: str, port: int) -> socket.socket:
    """Bind now, so a busy port is a one-line error before minutes of loading."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
