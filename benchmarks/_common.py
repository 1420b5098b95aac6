"""Helpers shared by the benchmark scripts: memory probes (Linux /proc) and logged subprocess runs.

Scripts import it as ``from _common import ...``: benchmarks/ is on sys.path when a script runs."""

from __future__ import annotations

import statistics
import subprocess
import time


def run_logged(cmd: list[str], log: list) -> float:
    """Run ``cmd`` (echoed, checked) and append {cmd, seconds} to ``log``; returns the wall seconds."""
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    took = time.perf_counter() - t
    log.append({"cmd": " ".join(cmd), "seconds": round(took, 1)})
    return took


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def call_seconds(fn, reps: int) -> list[float]:
    """The wall seconds of ``reps`` timed calls of ``fn``, after one untimed call (warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def best_of(fn, reps: int = 5) -> float:
    """The fastest of ``reps`` timed calls of ``fn`` in seconds, after one untimed call (warm-up)."""
    return min(call_seconds(fn, reps))


def median_of(fn, reps: int = 3) -> float:
    """The median of ``reps`` timed calls of ``fn`` in seconds, after one untimed call (warm-up)."""
    return statistics.median(call_seconds(fn, reps))


def ranking_probe_calls(paths: list[str], candidates: int = 100) -> list[tuple]:
    """(model, call) per model directory: ``call()`` scores the evaluation's ranking speed probe
    (slimlm.evaluate.ranking_probe on the README's tokens, one prefix, ``candidates`` suffixes on its KV cache)."""
    from slimlm.evaluate import ranking_probe
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.runtime import scoring

    with open("README.md", encoding="utf-8") as f:
        tokens = load_tokenizer(paths[0])(f.read())["input_ids"]
    prefix, suffixes, labels = ranking_probe(tokens, candidates)
    models = [load_model(p) for p in paths]
    return [(m, lambda m=m: scoring.score_shared_prefix(m, prefix, suffixes, labels, batch_size=candidates))
            for m in models]


def write_json(path, result) -> None:
    """A benchmark's results as indented JSON at ``path`` (parent directories made), and say where."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def markdown_table(head, rows) -> str:
    """A markdown table with padded columns (``head``: the column names; ``rows``: tuples of cells)."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]

    def line(cells) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def ranking_model(name: str):
    """(tokenizer, model, label token ids) of ``name`` (a directory or ``teacher``) for a ranking benchmark."""
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.tasks.ranking import label_token_ids

    tok = load_tokenizer(name)
    return tok, load_model(name), label_token_ids(tok)
