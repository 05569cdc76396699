"""The `triattn` command line. Heavy libraries (torch, transformers, backends) are imported inside commands only,
so that `triattn --help` answers at once."""

from __future__ import annotations

import sys
from typing import Optional

import typer

app = typer.Typer(
    name="triattn",
    help="Run reasoning models locally with TriAttention KV-cache compression.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rich's help formatter costs ~100 ms of start-up
)
stats_app = typer.Typer(help="Inspect, import and export TriAttention stats files.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(stats_app, name="stats")

POLICY_HELP = "Compression policy"
SAMPLING_HELP = "Sampling"


def _err(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


@app.command()
def run(
    model: str = typer.Argument(..., help="Model: `demo` or a directory (Hugging Face format)."),
    prompt: Optional[str] = typer.Argument(None, help="Prompt, UTF-8 text (other bytes are refused, not guessed); "
                                           "read from stdin when omitted."),
    no_compress: bool = typer.Option(False, "--no-compress", help="Full attention: no KV compression."),
    method: str = typer.Option("triattention", help="triattention | snapkv | rkv | streaming | h2o (the baselines need no stats).", rich_help_panel=POLICY_HELP),
    budget: int = typer.Option(2048, help="KV tokens kept per layer and head after each round.", rich_help_panel=POLICY_HELP),
    divide_length: int = typer.Option(128, help="Compress every N tokens (the cache peaks at budget + N).", rich_help_panel=POLICY_HELP),
    window: int = typer.Option(128, help="Most recent tokens always kept.", rich_help_panel=POLICY_HELP),
    sink: int = typer.Option(0, "--sink", help="First tokens always kept (attention sinks; an extension, the reference has none).", rich_help_panel=POLICY_HELP),
    protect_prefill: bool = typer.Option(False, "--protect-prefill/--no-protect-prefill", help="Keep the whole prompt while it fits the budget.", rich_help_panel=POLICY_HELP),
    pruning_mode: str = typer.Option("auto", help="auto (per_head; global on llama.cpp) | per_layer_head | per_head | global.", rich_help_panel=POLICY_HELP),
    stats: Optional[str] = typer.Option(None, help="Stats file (default: next to the model, in the cache, or calibrated now).", rich_help_panel=POLICY_HELP),
    max_tokens: int = typer.Option(4096, help="Most tokens to generate.", rich_help_panel=SAMPLING_HELP),
    temperature: float = typer.Option(0.6, help="0 is greedy.", rich_help_panel=SAMPLING_HELP),
    top_p: float = typer.Option(0.95, help="Nucleus sampling mass.", rich_help_panel=SAMPLING_HELP),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling.", rich_help_panel=SAMPLING_HELP),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, without the chat template."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("auto", help="auto | float32 | float16 | bfloat16 (llamacpp: the KV cache type, also q8_0)."),
    backend: str = typer.Option("auto", help="auto | torch | mlx | llamacpp."),
    kv_trace: Optional[str] = typer.Option(None, "--kv-trace", help="Write kept positions of every round as JSON lines."),
):
    """Stream a completion for PROMPT, with the KV cache held to the budget.

    PROMPT (or stdin when it is omitted) must be UTF-8 text that is not empty: other bytes are refused with the
    offset of the first bad one, never guessed. Ctrl-C stops the generation and keeps what it wrote."""
    options = dict(locals())
    from .run import run_command

    run_command(**options)


@app.command()
def chat(
    model: Optional[str] = typer.Argument(None, help="Model: `demo` (the default) or a directory (Hugging Face format)."),
    resume: bool = typer.Option(False, "--resume", help="Reopen the most recent conversation."),
    system: Optional[str] = typer.Option(None, help="System prompt."),
    no_compress: bool = typer.Option(False, "--no-compress", help="Full attention: no KV compression."),
    method: str = typer.Option("triattention", help="triattention | snapkv | rkv | streaming | h2o.", rich_help_panel=POLICY_HELP),
    budget: Optional[int] = typer.Option(None, help="KV tokens kept per layer and head [default: 2048, or what the resumed conversation used].", rich_help_panel=POLICY_HELP),
    divide_length: int = typer.Option(128, help="Compress every N tokens (the cache peaks at budget + N).", rich_help_panel=POLICY_HELP),
    window: int = typer.Option(128, help="Most recent tokens always kept.", rich_help_panel=POLICY_HELP),
    sink: int = typer.Option(0, "--sink", help="First tokens always kept (attention sinks; an extension, the reference has none).", rich_help_panel=POLICY_HELP),
    protect_prefill: bool = typer.Option(False, "--protect-prefill/--no-protect-prefill", help="Keep the whole prompt while it fits the budget.", rich_help_panel=POLICY_HELP),
    pruning_mode: str = typer.Option("auto", help="auto (per_head; global on llama.cpp) | per_layer_head | per_head | global.", rich_help_panel=POLICY_HELP),
    stats: Optional[str] = typer.Option(None, help="Stats file (default: next to the model, in the cache, or calibrated now).", rich_help_panel=POLICY_HELP),
    max_tokens: int = typer.Option(4096, help="Most tokens per reply.", rich_help_panel=SAMPLING_HELP),
    temperature: float = typer.Option(0.6, help="0 is greedy.", rich_help_panel=SAMPLING_HELP),
    top_p: float = typer.Option(0.95, help="Nucleus sampling mass.", rich_help_panel=SAMPLING_HELP),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling.", rich_help_panel=SAMPLING_HELP),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("auto", help="auto | float32 | float16 | bfloat16."),
    backend: str = typer.Option("auto", help="auto | torch | mlx | llamacpp."),
):
    """Chat in the terminal and watch what the KV cache keeps (conversations are saved; --resume reopens)."""
    options = dict(locals())
    from .run import check_run_options

    check_run_options(model, method, budget, divide_length, window, sink, protect_prefill, pruning_mode, stats,
                      max_tokens, temperature, top_p, seed, device, dtype, backend, no_compress=no_compress)
    from .tui.main import run_chat

    run_chat(**options)


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="Model: `demo` or a directory (Hugging Face format)."),
    output: str = typer.Option(..., "--output", "-o", help="Stats file to write (.safetensors)."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Calibration text (default: the text shipped with triattn)."),
    max_tokens: Optional[int] = typer.Option(None, help="Use at most this many tokens of the text."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("auto", help="auto | float32 | float16 | bfloat16."),
    backend: str = typer.Option("auto", help="auto | torch | mlx | llamacpp."),
):
    """Measure a model's pre-RoPE query statistics and write them in triattn's stats format."""
    from . import checks

    checks.choice("--device", device, checks.DEVICES)
    checks.choice("--dtype", dtype, checks.DTYPES)
    checks.integer("--max-tokens", max_tokens, 1)
    checks.model(model, backend)
    checks.output_file(output, "stats file")
    from .files import check_writable

    check_writable(output)  # a read-only folder is found before the calibration, not after
    if input is not None:
        checks.input_file(input, "calibration text")
    from .backends import load_engine
    from .calibration_text import load_calibration_text

    text = load_calibration_text(input)
    engine = load_engine(model, backend=backend, device=device, dtype=dtype)
    result = engine.calibrate(text, progress=True, max_tokens=max_tokens)
    result.save(output)
    print(f"wrote {output}: {result.meta.calibration_tokens} tokens, "
          f"{result.meta.num_layers} layers x {result.meta.num_heads} heads", file=sys.stderr)


@app.command()
def convert(
    model: str = typer.Argument(..., help="Model: `demo` or a directory (Hugging Face format)."),
    to: str = typer.Option("gguf", "--to", help="Target format: gguf (for --backend llamacpp)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output directory [default: ./NAME-gguf]."),
    outtype: str = typer.Option("auto", help="Weights: auto | f32 | f16 | bf16 | q8_0."),
    converter: Optional[str] = typer.Option(None, help="A llama.cpp checkout to take convert_hf_to_gguf.py from [default: $TRIATTN_LLAMA_CPP, else the installed llama-cpp-python's source]."),
):
    """Convert a Hugging Face model to GGUF (model.gguf + its stats) for the llamacpp backend."""
    from . import checks

    checks.choice("--to", to, ("gguf",))
    checks.choice("--outtype", outtype, ("auto", "f32", "f16", "bf16", "q8_0"))
    from .registry import resolve_model

    checks.model_path(resolve_model(checks.nonempty("the model name", model)))
    if output is not None:
        checks.output_dir(output, "output")
    from .convert import convert_to_gguf

    convert_to_gguf(model, output, outtype=outtype, converter=converter)


@stats_app.command("show")
def stats_show(file: str = typer.Argument(..., help="Stats file.")):
    """Summarise a stats file, with how concentrated each head's queries are."""
    from . import checks

    checks.input_file(file, "stats file")
    from rich.console import Console

    from .stats.format import QueryStats
    from .stats.reference import stats_summary

    Console().print(stats_summary(QueryStats.load(file)))


@stats_app.command("import")
def stats_import(
    ref: str = typer.Argument(..., help="Reference TriAttention stats (.pt)."),
    model: str = typer.Option(..., "--model", help="The model directory the stats belong to (config.json is enough)."),
    output: str = typer.Option(..., "--output", "-o", help="Stats file to write (.safetensors)."),
):
    """Convert reference TriAttention stats (.pt) to triattn's format, checked against the model."""
    from . import checks

    checks.input_file(ref, "reference stats file")
    checks.model(model, "auto")
    checks.output_file(output, "stats file")
    from .stats.reference import import_reference

    result = import_reference(ref, model)
    result.save(output)
    print(f"wrote {output}", file=sys.stderr)


@stats_app.command("export")
def stats_export(
    file: str = typer.Argument(..., help="triattn stats file."),
    format: str = typer.Option("reference", "--format", help="Only 'reference' (the TriAttention vLLM/SGLang .pt)."),
    output: str = typer.Option(..., "--output", "-o", help="File to write."),
):
    """Write stats in the reference TriAttention format, for its vLLM/SGLang plugins."""
    from . import checks
    from .stats.format import QueryStats
    from .stats.reference import export_reference

    if format != "reference":
        checks.fail(f"unknown export format {checks.printable(format)} (only 'reference')")
    checks.stats_file(file)
    checks.output_file(output, "exported stats file")
    export_reference(QueryStats.load(file), output)
    print(f"wrote {output}", file=sys.stderr)


@app.command("eval")
def eval_command(
    model: str = typer.Option("demo", help="Model: `demo` (the task's problems need the demo model)."),
    methods: str = typer.Option("full,triattention,snapkv,rkv,h2o,streaming", help="Comma-separated methods."),
    budgets: str = typer.Option("128,192,256,512,1280", help="Comma-separated KV budgets."),
    problems: int = typer.Option(200, help="Held-out problems per cell."),
    limit: Optional[int] = typer.Option(None, help="Only this many problems (a quick CPU smoke run)."),
    window: int = typer.Option(32, help="Recent window kept by every method."),
    divide_length: int = typer.Option(32, help="Compress every N tokens."),
    sink: int = typer.Option(0, "--sink", help="Sink tokens kept by every method (StreamingLLM keeps its own 4)."),
    pruning_mode: str = typer.Option("per_head", help="per_layer_head | per_head | global."),
    protect_prefill: bool = typer.Option(False, "--protect-prefill/--no-protect-prefill"),
    max_offset: int = typer.Option(65536, help="TriAttention scores keys for queries up to this many tokens ahead."),
    batch: int = typer.Option(256, help="Problems generated at once."),
    jobs: int = typer.Option(1, help="Cells run in parallel processes."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("auto", help="auto | float32 | float16 | bfloat16."),
    out: Optional[str] = typer.Option(None, help="Folder for fidelity.json, fidelity.md, fidelity.png [default: a new "
                                      "./triattn-eval-DATE-TIME; the shipped results change only with --out "
                                      "results/fidelity]."),
    plot_only: bool = typer.Option(False, "--plot-only", help="Only redraw the plot from OUT/fidelity.json."),
    task: str = typer.Option("auto", help="lagsum | ledger: the held-out problems [default: the lagged sum; "
                             "ledger for a model named `ledger`]."),
    teacher_forcing: bool = typer.Option(False, "--teacher-forcing", help="Also feed each reference response and "
                                         "report the per-token error under each method's compression (a second "
                                         "pass per cell)."),
):
    """Accuracy under a KV budget on held-out demo problems: TriAttention vs SnapKV, R-KV, H2O, StreamingLLM, full."""
    from . import checks
    from .errors import UserError
    from .eval import EvalConfig, describe, fresh_folder, plot, run_eval, write_results
    from .methods import check_method
    from .policy import BudgetPolicy

    if plot_only and out is None:
        raise UserError("--plot-only needs --out FOLDER (the folder holding fidelity.json)")
    folder = checks.output_dir(out, "--out folder") if out is not None else fresh_folder()
    if not plot_only:
        names = [m.strip() for m in checks.text("--methods", methods).split(",") if m.strip()]
        if not names:
            raise UserError("--methods names no method")
        for m in names:
            if m != "full":
                check_method(m)
        sizes = sorted(set(checks.integer_list("--budgets", budgets)))
        for flag, value, low in (("--problems", problems, 1), ("--limit", limit, 1), ("--window", window, 0),
                                 ("--divide-length", divide_length, 1), ("--sink", sink, 0),
                                 ("--max-offset", max_offset, 1), ("--batch", batch, 1)):
            checks.integer(flag, value, low)
        checks.integer("--jobs", jobs, 1, 256)
        checks.choice("--device", device, checks.DEVICES[:3])
        checks.choice("--dtype", dtype, checks.DTYPES[:4])
        checks.choice("--task", task, ("auto", "lagsum", "ledger"))
        for b in sizes:
            BudgetPolicy(b, divide_length, window, sink, protect_prefill, pruning_mode)  # validates
        checks.model(model, "auto")
        cfg = EvalConfig(model=model, problems=limit or problems, window=window, divide_length=divide_length,
                         sinks=sink, pruning_mode=pruning_mode, protect_prefill=protect_prefill, device=device,
                         dtype=dtype, batch=batch, max_offset=max_offset, task=task, teacher_forcing=teacher_forcing)
        command = " ".join(["triattn eval", *sys.argv[2:]]).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        def on_cell(cell, cells):  # results so far are on disk after every cell
            print(describe(cell), file=sys.stderr, flush=True)
            write_results(cells, cfg, folder, command)

        print(f"writing results to {folder}/", file=sys.stderr)
        run_eval(cfg, names, sizes, jobs=jobs, on_cell=on_cell)
        print((folder / "fidelity.md").read_text())
    if not (folder / "fidelity.json").is_file():
        raise UserError(f"{folder / 'fidelity.json'}: no results to plot")
    try:
        plot(folder / "fidelity.json", folder / "fidelity.png")
        print(f"wrote {folder / 'fidelity.png'}", file=sys.stderr)
    except UserError as e:
        if plot_only:
            raise
        print(f"note: {e}", file=sys.stderr)  # the results are written; only the plot is missing


@app.command()
def serve(
    model: str = typer.Argument("demo", help="Model: `demo` (the default) or a directory (Hugging Face format)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TRIATTN_API_KEY", help="Require `Authorization: Bearer KEY` on every route but /health."),
    served_model_name: Optional[str] = typer.Option(None, help="Model id in /v1/models [default: the alias or the directory name]."),
    no_compress: bool = typer.Option(False, "--no-compress", help="Full attention: no KV compression."),
    method: str = typer.Option("triattention", help="triattention | snapkv | rkv | streaming | h2o (the baselines need no stats).", rich_help_panel=POLICY_HELP),
    budget: int = typer.Option(2048, help="KV tokens kept per layer and head after each round.", rich_help_panel=POLICY_HELP),
    divide_length: int = typer.Option(128, help="Compress every N tokens (the cache peaks at budget + N).", rich_help_panel=POLICY_HELP),
    window: int = typer.Option(128, help="Most recent tokens always kept.", rich_help_panel=POLICY_HELP),
    sink: int = typer.Option(0, "--sink", help="First tokens always kept (attention sinks; an extension, the reference has none).", rich_help_panel=POLICY_HELP),
    protect_prefill: bool = typer.Option(False, "--protect-prefill/--no-protect-prefill", help="Keep the whole prompt while it fits the budget.", rich_help_panel=POLICY_HELP),
    pruning_mode: str = typer.Option("auto", help="auto (per_head; global on llama.cpp) | per_layer_head | per_head | global.", rich_help_panel=POLICY_HELP),
    stats: Optional[str] = typer.Option(None, help="Stats file (default: next to the model, in the cache, or calibrated now).", rich_help_panel=POLICY_HELP),
    max_tokens: Optional[int] = typer.Option(None, help="Cap on every request's output tokens [default: the room left in the context].", rich_help_panel=SAMPLING_HELP),
    temperature: float = typer.Option(0.6, help="Default when a request sets none (0 is greedy).", rich_help_panel=SAMPLING_HELP),
    top_p: float = typer.Option(0.95, help="Default when a request sets none.", rich_help_panel=SAMPLING_HELP),
    parallel: int = typer.Option(8, help="Requests generating at once (the others wait in line); on CUDA they decode in one batched step, at most as many as the KV memory holds."),
    kv_memory: Optional[float] = typer.Option(None, help="GiB for the batched KV cache on CUDA (each request holds B + N tokens of K/V) [default: 85 % of the GPU memory free after loading, less --conversation-memory]."),
    max_waiting: int = typer.Option(16, help="Requests that may wait for a slot; more get 429 (retry later)."),
    allowed_hosts: Optional[str] = typer.Option(None, "--allowed-hosts", help="Comma-separated Host header names to answer besides localhost, 127.0.0.1 and [::1] ('*': any) [default without --api-key: those only, against DNS rebinding; with a key: any]."),
    max_conversations: int = typer.Option(64, help="Cache snapshots kept for prefix reuse, taken at message boundaries (0: none)."),
    conversation_memory: int = typer.Option(4096, help="MiB the kept cache snapshots may hold (least recently used go first; one is at most B + N tokens of K/V: 306 MiB for Qwen3-8B at the default budget)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    dtype: str = typer.Option("auto", help="auto | float32 | float16 | bfloat16."),
    backend: str = typer.Option("auto", help="auto | torch | mlx | llamacpp."),
    log_level: str = typer.Option("warning", help="uvicorn log level (info shows every request)."),
):
    """Serve MODEL over the OpenAI API (chat and text completions), the KV cache of every request held to the budget."""
    options = dict(locals())
    from . import checks

    checks.text("--host", host)
    checks.choice("--log-level", log_level, checks.LOG_LEVELS)
    checks.choice("--device", device, checks.DEVICES)
    checks.choice("--dtype", dtype, checks.DTYPES)
    for flag, value, low in (("--budget", budget, 1), ("--divide-length", divide_length, 1), ("--window", window, 0),
                             ("--sink", sink, 0), ("--max-tokens", max_tokens, 1), ("--parallel", parallel, 1),
                             ("--max-waiting", max_waiting, 0),
                             ("--max-conversations", max_conversations, 0),
                             ("--conversation-memory", conversation_memory, 0)):
        checks.integer(flag, value, low)
    checks.integer("--port", port, 0, 65535)
    checks.number("--temperature", temperature, 0, 2)
    checks.number("--top-p", top_p, 0, 1, low_open=True)
    if kv_memory is not None:
        checks.number("--kv-memory", kv_memory, 0, 1 << 20, low_open=True)
    if served_model_name is not None:
        checks.text("--served-model-name", served_model_name)
    if api_key is not None:
        checks.text("--api-key", api_key)
    checks.model(model, backend)
    if stats is not None:
        checks.stats_file(stats)
    from .serve.server import serve_command

    serve_command(**options)


@app.command()
def openclaw(
    url: Optional[str] = typer.Option(None, help="The running `triattn serve` [default: port 8000, else the one a running `triattn serve` records]."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TRIATTN_API_KEY", help="The server's --api-key, if it has one."),
    provider: str = typer.Option("triattn", help="Provider id in OpenClaw (agents name the model PROVIDER/MODEL)."),
    write: bool = typer.Option(False, "--write", help="Merge the entry into the config file (after a backup)."),
    config: str = typer.Option("~/.openclaw/openclaw.json", help="OpenClaw's config file."),
):
    """Print the OpenClaw provider entry for a running `triattn serve` (or merge it into OpenClaw's config)."""
    from . import checks

    if url is not None:
        checks.url("--url", url)
    checks.text("--provider", provider)
    if "/" in provider or any(c.isspace() for c in provider):
        checks.fail(f"--provider {checks.printable(provider)}: no slashes or spaces (agents name PROVIDER/MODEL)")
    if api_key is not None:
        checks.text("--api-key", api_key)
    if write:
        checks.output_file(config, "OpenClaw config")
    from .serve.openclaw import openclaw_command

    openclaw_command(url=url, api_key=api_key, provider=provider, write=write, config=config)


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="A model (name or directory) whose shape to bench instead of "
                                          "--shape; only its config.json is read."),
    shape: str = typer.Option("qwen3-8b", help="Model shape on random weights: qwen3-0.6b | qwen3-8b | qwen3-32b | "
                              "qwen3-32b-int4."),
    context: str = typer.Option("4096,32768", help="Comma-separated context lengths."),
    budget: int = typer.Option(2048, help="TriAttention KV budget."),
    divide_length: int = typer.Option(128, help="Compress every N tokens."),
    batch: str = typer.Option("1,8,16", help="Comma-separated batch sizes."),
    steps: int = typer.Option(257, help="Decode steps timed per configuration (rounds included)."),
    hf_steps: int = typer.Option(12, help="Steps for the transformers baseline (0 skips it)."),
    memory_gib: Optional[float] = typer.Option(None, help="Cap GPU memory (e.g. 24 to emulate an RTX 4090)."),
    out: Optional[str] = typer.Option(None, help="Folder for bench.json and bench.png [default: a new "
                                      "./triattn-bench-DATE-TIME; the shipped results change only with --out "
                                      "results/bench]."),
    plot_only: bool = typer.Option(False, "--plot-only", help="Only redraw OUT/bench.png from OUT/bench.json."),
):
    """Decode tok/s, step time, memory and roofline share on a CUDA GPU: full KV vs TriAttention vs transformers."""
    from . import checks
    from .errors import UserError

    if plot_only and out is None:
        raise UserError("--plot-only needs --out FOLDER (the folder holding bench.json)")
    if out is not None:
        folder = checks.output_dir(out, "--out folder")
    else:
        from .eval import fresh_folder

        folder = fresh_folder("triattn-bench")
    if not plot_only:
        contexts = checks.integer_list("--context", context)
        batches = checks.integer_list("--batch", batch)
        for flag, value, low in (("--budget", budget, 1), ("--divide-length", divide_length, 1),
                                 ("--steps", steps, 2), ("--hf-steps", hf_steps, 0)):
            checks.integer(flag, value, low)
        checks.number("--memory-gib", memory_gib, 0, 1e6, low_open=True)
        if model is not None:
            checks.model(model, "torch")
        from .backends.torch.bench import SHAPES, add_model_shape

        if model is not None:
            from .registry import resolve_model

            shape = add_model_shape(model, resolve_model(model, backend="torch"))
        if shape not in SHAPES:
            raise UserError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
        if min(contexts + batches) < 1 or steps < 2 or budget < 1:
            raise UserError("--context, --batch and --budget must be positive and --steps at least 2")
        import torch

        if not torch.cuda.is_available():
            raise UserError("triattn bench measures a CUDA GPU, and torch sees none here")
        from .backends.torch.bench import run_bench

        run_bench(shape, contexts, batches, budget, divide_length, steps, hf_steps, memory_gib, folder,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    if not (folder / "bench.json").is_file():
        raise UserError(f"{folder / 'bench.json'}: no results to plot")
    try:
        from .backends.torch.bench import plot

        plot(folder / "bench.json", folder / "bench.png")
        print(f"wrote {folder / 'bench.png'}", file=sys.stderr)
    except ImportError:
        print("note: the plot needs matplotlib", file=sys.stderr)


@app.command()
def doctor():
    """Hardware, installed backends, and which backend --backend auto picks."""
    from rich.console import Console
    from rich.table import Table

    from .backends import BACKENDS, IMPLEMENTED, choose_backend, installed, torch_gpu_usable
    from .doctor import PRUNING_MODES_BY_BACKEND, hardware, package_versions
    from .errors import UserError

    console = Console()
    table = Table(title="hardware", show_header=False)
    for what, finding in hardware():
        table.add_row(what, finding)
    console.print(table)
    versions = package_versions()
    table = Table(title="packages")
    table.add_column("package")
    table.add_column("version")
    for name, version in versions.items():
        table.add_row(name, version or "[dim]not installed[/dim]")
    console.print(table)
    for name in BACKENDS:
        state = "installed" if installed(name) else "not installed"
        state += "" if name in IMPLEMENTED else " · not implemented yet in triattn"
        console.print(f"backend {name}: {state} · pruning modes: {PRUNING_MODES_BY_BACKEND[name]}")
    try:
        chosen, why = choose_backend("auto")
        console.print(f"--backend auto picks [bold]{chosen}[/bold]: {why}")
        if chosen == "torch" and installed("llamacpp") and not torch_gpu_usable():
            console.print("  except for `run`, `chat` and `serve` of a model with a GGUF build (the demo ships one): "
                          "[bold]llamacpp[/bold], several times faster on a CPU, when the settings are ones it runs "
                          "(TriAttention in global mode, its only one, or full attention); --backend torch for the rest")
    except UserError as e:
        console.print(f"--backend auto: {e}")


@app.command()
def pull(
    model: str = typer.Argument(..., help="A name (qwen3-8b, qwen3-8b:q4; see `triattn list --available`), a Hugging Face repo org/name, or a local directory."),
    backend: str = typer.Option("auto", help="auto | torch | mlx | llamacpp: whose build to fetch."),
    force: bool = typer.Option(False, "--force", help="Download every file again (repairs a damaged cache)."),
    budget: int = typer.Option(2048, help="KV budget the memory estimate assumes."),
    divide_length: int = typer.Option(128, help="Compression interval the memory estimate assumes."),
    calibration_tokens: Optional[int] = typer.Option(None, help="Calibrate on at most this many tokens of the shipped text (default: all of it)."),
):
    """Download a model into the Hugging Face cache, check it, and make its TriAttention stats: ready to run."""
    from . import checks
    from .backends import choose_backend

    checks.local_model(model)
    choose_backend(backend)
    checks.integer("--budget", budget, 1)
    checks.integer("--divide-length", divide_length, 1)
    checks.integer("--calibration-tokens", calibration_tokens, 1)
    from .pull import pull_model

    pull_model(model, backend=backend, force=force, budget=budget, divide_length=divide_length,
               calibration_tokens=calibration_tokens)


@app.command("list")
def list_command(
    available: bool = typer.Option(False, "--available", help="Every name triattn knows, with the repo each backend pulls."),
):
    """Pulled models: name, backend, size, whether stats are ready, and where the files are."""
    from .models import list_models

    list_models(available=available)


@app.command()
def show(
    model: str = typer.Argument(..., help="A pulled name or repo, `demo`, or a model directory."),
    backend: str = typer.Option("auto", help="auto | torch | mlx | llamacpp: whose build to describe."),
    budget: int = typer.Option(2048, help="KV budget for the memory line."),
):
    """Architecture, context length, quantization, KV memory and a stats summary of a model."""
    from . import checks
    from .backends import choose_backend

    checks.integer("--budget", budget, 1)
    checks.model(model, backend)
    from .models import show_model

    show_model(model, choose_backend(backend)[0], budget=budget)


@app.command()
def rm(
    model: str = typer.Argument(..., help="A pulled name or repo (see `triattn list`)."),
    backend: str = typer.Option("auto", help="auto | torch | mlx | llamacpp: whose build to remove."),
):
    """Remove a pulled model: its record, its files in the Hugging Face cache (unless another name uses them) and
    its cached stats."""
    from . import checks
    from .backends import choose_backend
    from .models import remove_model

    checks.nonempty("the model name", model)
    print(remove_model(model, choose_backend(backend)[0]), file=sys.stderr)


def main() -> None:
    """Entry point: bad input ends in one line on stderr and exit code 2, never a traceback."""
    import os

    try:  # typer ≥ 0.25 vendors click
        from typer._click.exceptions import ClickException, NoArgsIsHelpError
    except ImportError:
        from click.exceptions import ClickException, NoArgsIsHelpError

    from .errors import UserError

    import codecs

    from .checks import escape_errors

    codecs.register_error("triattn-escape", escape_errors)
    for stream in (sys.stdout, sys.stderr):  # undecodable argv bytes in a message come out as \xNN
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="triattn-escape")
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx else str(e))
        code = 0
    except ClickException as e:
        print(f"error: {_one_line(e.format_message())}", file=sys.stderr)
        code = 2
    except UserError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # stdout closed early (`| head -c1`): what was read is all that was wanted
        _silence_stdout()
        code = 0
    except SystemExit as e:  # click turns a closed stdout (EPIPE) into exit 1 after wrapping the streams
        if not type(sys.stdout).__name__.endswith("PacifyFlushWrapper"):
            raise
        _silence_stdout()
        code = 0 if e.code == 1 else e.code
    except Exception as e:  # an internal error: one line, with a way to see the traceback
        if os.environ.get("TRIATTN_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {_one_line(str(e))} (set TRIATTN_DEBUG=1 for the traceback)",
              file=sys.stderr)
        code = 1
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _silence_stdout()
    sys.exit(code if isinstance(code, int) else 0)


def _one_line(message: str) -> str:
    """A message as one line: a multi-line one (a converter's output) is joined with ' / '."""
    return " / ".join(line.strip() for line in message.splitlines() if line.strip())


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not fail again on a closed pipe."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    main()
