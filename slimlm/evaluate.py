"""Quality metrics: ranking AUC / log-loss / accuracy (with a bootstrap interval), perplexity, and exact
match of generated answers.

Ranking scores come from :func:`slimlm.runtime.scoring.score`, so evaluation and serving share one path.
Perplexity never materialises [tokens x vocab] logits for a whole batch: the LM head and the
cross-entropy run over slices of positions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
import torch

from slimlm import SlimlmError
from slimlm.placement import Placement
from slimlm.runtime import decoding, scoring
from slimlm.tasks.completion import CompletionExample, render
from slimlm.tasks.ranking import DEFAULT_LABELS, RankingExample, label_token_ids, tokenize_ranking


def _check_two_classes(y: np.ndarray) -> None:
    if len(y) == 0:
        raise SlimlmError("AUC needs scored examples; this set is empty (check the split and limit)")
    if y.min() == y.max():
        raise SlimlmError(f"AUC needs both positive and negative labels; these {len(y)} examples are all "
                          f"{'positive' if y.max() else 'negative'} (check the split and limit)")


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (scikit-learn); ties count half. Needs both classes present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    _check_two_classes(y)
    return float(roc_auc_score(y, np.asarray(scores)))


def _bootstrap_aucs(labels: Sequence[int], score_sets: Sequence[Sequence[float]], n: int, seed: int) -> np.ndarray:
    """AUCs of every score set on the same ``n`` resamples of the rows, [n, sets] (resamples with one
    class are dropped and redrawn). Vectorised over resamples: each AUC is the Mann-Whitney statistic
    from average ranks, (Σ ranks of positives − P(P+1)/2) / (P·N), which equals sklearn's
    roc_auc_score, ties included."""
    from scipy.stats import rankdata

    _check_two_classes(np.asarray(labels))  # else no resample has both classes and the loop never ends
    y = np.asarray(labels).astype(bool)
    sets = [np.asarray(s, dtype=np.float64) for s in score_sets]
    rows = len(y)
    rng = np.random.default_rng(seed)
    per_draw = max(1, min(n, 4_000_000 // max(rows, 1)))  # resamples per batch: bounded memory
    aucs: list[np.ndarray] = []
    got = 0
    while got < n:
        idx = rng.integers(0, rows, (per_draw, rows))
        yy = y[idx]
        pos = yy.sum(1)
        keep = (pos > 0) & (pos < rows)
        yy, pos, idx = yy[keep], pos[keep], idx[keep]
        aucs.append(np.stack([((rankdata(s[idx], axis=1) * yy).sum(1) - pos * (pos + 1) / 2) / (pos * (rows - pos))
                              for s in sets], axis=1))
        got += len(pos)
    return np.concatenate(aucs)[:n]


def bootstrap_auc(labels: Sequence[int], scores: Sequence[float], *, n: int = 1000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC over resampled rows."""
    lo, hi = np.quantile(_bootstrap_aucs(labels, [scores], n, seed)[:, 0], [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_auc_delta(labels: Sequence[int], scores: Sequence[float], reference: Sequence[float], *,
                     n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """AUC(scores) − AUC(reference) on the same rows, with a paired percentile bootstrap interval (both
    scored on each resample): far tighter than comparing two separate intervals, since the rows' own
    difficulty cancels."""
    return paired_group_auc_delta(labels, [scores], [reference], n=n, seed=seed, level=level)


def paired_group_auc_delta(labels: Sequence[int], group: Sequence[Sequence[float]],
                           reference_group: Sequence[Sequence[float]], *, n: int = 1000, seed: int = 0,
                           level: float = 0.95) -> tuple[float, float, float]:
    """mean AUC of ``group`` − mean AUC of ``reference_group`` (e.g. two seeds of KD against two of SFT), all
    on the same rows, with a paired percentile bootstrap interval: every model scored on each resample. The
    interval covers the rows' sampling, not the seeds' (a handful of seeds cannot estimate that)."""
    k = len(group)
    if not k or not reference_group:
        raise SlimlmError("a group comparison needs at least one model on each side")
    d = _bootstrap_aucs(labels, [*group, *reference_group], n, seed)
    lo, hi = np.quantile(d[:, :k].mean(1) - d[:, k:].mean(1), [(1 - level) / 2, (1 + level) / 2])
    point = np.mean([roc_auc(labels, s) for s in group]) - np.mean([roc_auc(labels, s) for s in reference_group])
    return float(point), float(lo), float(hi)


def paired_mean_delta(values: Sequence[float], reference: Sequence[float], *, n: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """mean(values) − mean(reference) over the same examples (e.g. 0/1 exact-match hits of two models on the
    same questions), with a paired percentile bootstrap interval: each resample draws examples, both
    models' outcomes together."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise SlimlmError(f"paired comparison needs two equally long, non-empty lists (got {a.shape} and {b.shape})")
    d = a - b
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def log_loss(labels: Sequence[int], p: Sequence[float], eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [eps, 1 - eps]."""
    y = np.asarray(labels, dtype=np.float64)
    q = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def ranking_metrics(labels: Sequence[int], p: Sequence[float]) -> dict[str, float]:
    y, q = np.asarray(labels), np.asarray(p)
    lo, hi = bootstrap_auc(y, q)
    return {
        "n": int(len(y)),
        "positive_rate": float(y.mean()),
        "auc": roc_auc(y, q),
        "auc_ci95": [lo, hi],
        "log_loss": log_loss(y, q),
        "accuracy": float(((q >= 0.5).astype(int) == y).mean()),
    }


def evaluate_ranking(model, tokenizer, examples: list[RankingExample], *, batch_size: int = 16,
                     labels: tuple[str, str] = DEFAULT_LABELS, progress=None) -> tuple[dict, np.ndarray]:
    """Score every example (P(pos) over the label pair) and compute ranking metrics."""
    label_ids = label_token_ids(tokenizer, labels)
    tokenized = tokenize_ranking(examples, tokenizer)
    p = scoring.score(model, tokenized, label_ids, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                      on_scored=progress)
    return ranking_metrics([ex.label for ex in examples], p), p


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (sound at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def normalize_text(text: str) -> str:
    """Whitespace runs -> one space, ends stripped."""
    return " ".join(text.split())


def first_number(text: str) -> Decimal | None:
    """The first number written in ``text`` (optional sign, digits, optional decimals), or None."""
    m = _NUMBER.search(text)
    return Decimal(m.group()) if m else None


def answer_matches(output: str, reference: str, rule: str = "exact") -> bool:
    """Whether a generated ``output`` answers ``reference``.

    * ``exact``: equal after :func:`normalize_text` (whitespace runs collapsed, ends stripped);
    * ``number``: the first number in the output equals the reference's number, compared as decimals
      ("-7", "+7.0" and "07" all read as numbers; "The answer is 12." -> 12; "1,234" -> 1). The
      reference must contain a number. Only the first number counts, so "12 or 13" answers 12, not 13.
    """
    if rule == "exact":
        return normalize_text(output) == normalize_text(reference)
    if rule == "number":
        ref = first_number(reference)
        if ref is None:
            raise SlimlmError(f"reference {reference!r} holds no number (rule 'number')")
        return first_number(output) == ref
    raise SlimlmError(f"unknown match rule {rule!r}; expected exact or number")


def evaluate_generation(model, tokenizer, examples: Sequence[CompletionExample], *, max_new_tokens: int = 16,
                        batch_size: int = 16, rule: str = "exact", samples: int = 5,
                        progress=None, per_example: bool = False) -> dict:
    """Exact-match accuracy of greedy answers: each example's prompt (chat template, as in training) is
    continued by up to ``max_new_tokens`` tokens (stopping at EOS) with the runtime's batched KV-cache
    decode, and the decoded text is compared to the reference response by :func:`answer_matches`.

    Returns ``exact_match`` (fraction correct) with its Wilson 95 % interval ``exact_match_ci95``, ``n``,
    ``correct``, ``rule``, ``max_new_tokens``, ``truncated`` (outputs that hit ``max_new_tokens`` without
    EOS) and the first ``samples`` (prompt, output, reference, correct) for a look at what the model
    writes; with ``per_example``, also ``hits`` (1/0 per example, in order: for paired comparisons). An
    output cut by ``max_new_tokens`` is judged as written, so choose it above the longest answer (the
    trainer uses the longest reference + 4 tokens, at least 16)."""
    if not examples:
        raise SlimlmError("generation evaluation needs at least one example")
    for ex in examples:  # a bad rule or a number-less reference fails before any generation
        answer_matches("", ex.response, rule)
    plain = not getattr(tokenizer, "chat_template", None)
    prompts = [tokenizer(render(ex, tokenizer)[0], add_special_tokens=plain).input_ids for ex in examples]
    params = decoding.SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    outputs: list[decoding.Generation] = []
    chunk = 4 * batch_size  # continuous batching inside a chunk; progress between chunks
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        outputs.extend(decoding.generate_text(model, tokenizer, part, params, max_batch=batch_size))
        if progress:
            progress(len(part))
    hits = [answer_matches(g.text, ex.response, rule) for g, ex in zip(outputs, examples, strict=True)]
    out = {
        "exact_match": sum(hits) / len(hits),
        "exact_match_ci95": list(wilson_interval(sum(hits), len(hits))),
        "n": len(hits),
        "correct": int(sum(hits)),
        "rule": rule,
        "max_new_tokens": max_new_tokens,
        "truncated": sum(g.finish_reason == "length" for g in outputs),
        "samples": [{"prompt": ex.prompt_messages[-1]["content"], "output": g.text, "reference": ex.response,
                     "correct": h} for ex, g, h in list(zip(examples, outputs, hits, strict=True))[:samples]],
    }
    if per_example:
        out["hits"] = [int(h) for h in hits]
    return out


@torch.inference_mode()
def perplexity(model, blocks: Sequence[Sequence[int]], *, batch_size: int = 4, chunk: int = 128,
               progress=None) -> dict[str, float]:
    """exp(mean next-token NLL) over ``blocks`` (each scored independently, first token unscored).

    Hidden states are computed per batch; the LM head and the log-softmax run over ``chunk`` positions
    at a time, so peak memory is O(batch x chunk x vocab), not O(batch x length x vocab).
    """
    device = next(model.parameters()).device
    base, head = model.get_decoder(), model.get_output_embeddings()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        ids, mask = scoring.right_pad(batch, 0, device)
        n = ids.shape[1]
        hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        for c in range(0, n - 1, chunk):
            logits = head(hidden[:, c:min(c + chunk, n - 1)]).float()
            tgt = targets[:, c:c + chunk]
            total_nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum").item()
        total_tokens += int((targets != -100).sum())
        if progress:
            progress(len(batch))
    if total_tokens == 0:
        raise SlimlmError("perplexity needs at least one block of two or more tokens")
    nll = total_nll / total_tokens
    return {"tokens": total_tokens, "nll": nll, "perplexity": math.exp(nll)}


def disk_bytes(path: str | Path) -> int:
    """Bytes of a model directory's weight files (*.safetensors)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


@torch.inference_mode()
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timings measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROBE_PREFIX, PROBE_SUFFIX = 192, 16  # the ranking probe: one user prefix, candidates of this many tokens


def _repeated(tokens: Sequence[int], n: int) -> list[int]:
    """The first ``n`` of ``tokens`` repeated as often as needed."""
    return (list(tokens) * (n // max(len(tokens), 1) + 1))[:n]


def ranking_probe(tokens: Sequence[int], candidates: int = 100) -> tuple[list[int], list[list[int]], tuple[int, int]]:
    """The ranking speed probe's inputs from real ``tokens`` (repeated if short): a :data:`PROBE_PREFIX`-token
    prefix, ``candidates`` suffixes of :data:`PROBE_SUFFIX` tokens, and two distinct label ids (only speed
    counts, so any two)."""
    need = PROBE_PREFIX + PROBE_SUFFIX * candidates
    flat = _repeated(tokens, need)
    suffixes = [flat[PROBE_PREFIX + PROBE_SUFFIX * i:PROBE_PREFIX + PROBE_SUFFIX * (i + 1)] for i in range(candidates)]
    distinct = list(dict.fromkeys(int(t) for t in flat))[:2]
    return flat[:PROBE_PREFIX], suffixes, (tuple(distinct) if len(distinct) == 2 else (0, 1))


def speed(model, tokens: Sequence[int], *, prefill_batch: int = 16, prefill_len: int = 128, decode_tokens: int = 32,
          candidates: int = 100, reps: int = 3) -> dict[str, float]:
    """Prefill tokens/s (``prefill_batch`` x ``prefill_len``, one forward without a cache), decode
    tokens/s (batch 1, greedy, KV cache, ``decode_tokens`` new tokens) and ranking candidates/s (one
    192-token prefix run once, ``candidates`` 16-token suffixes scored on its KV cache), median of
    ``reps``. ``tokens`` supplies real text (repeated if short).

    On a CPU also ``cpu_share``: the CPU time this process got during the timed calls over the wall time of
    its torch threads (the lowest of the three probes' medians). About 1 on an otherwise idle machine (0.8-1:
    a small model's decode leaves a thread idle between steps); about 0.5 when another job of as many
    threads shares the cores, which slows every probe 2-20x (oversubscribed OpenMP threads): the report
    flags such rows rather than compare them."""
    import time

    device = next(model.parameters()).device
    need = prefill_batch * prefill_len
    ids = torch.tensor(_repeated(tokens, need), device=device)
    ids = ids.view(prefill_batch, prefill_len)
    base = model.get_decoder()

    shares = []  # per probe: the median CPU share of its timed calls

    def timed(fn) -> float:
        fn()  # warm-up
        times, share = [], []
        for _ in range(reps):
            sync(device)
            t, cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)  # CUDA work is asynchronous: the clock stops when the GPU is done, not when queued
            times.append(time.perf_counter() - t)
            share.append((time.process_time() - cpu) / max(times[-1], 1e-9) / torch.get_num_threads())
        shares.append(float(np.median(share)))
        return float(np.median(times))

    prefill_s = timed(lambda: base(input_ids=ids, use_cache=False))
    prompt = ids[0, :64].tolist()
    decode_s = timed(lambda: decoding.generate(model, [prompt], max_new_tokens=decode_tokens, temperature=0.0))
    prefix, suffixes, label_ids = ranking_probe(tokens, candidates)  # the prefix computed once
    rank_s = timed(lambda: scoring.score_shared_prefix(model, prefix, suffixes, label_ids, batch_size=candidates))
    out = {"prefill_tokens_per_s": need / prefill_s, "decode_tokens_per_s": decode_tokens / decode_s,
           "candidates_per_s": candidates / rank_s}
    if device.type == "cpu":
        out["cpu_share"] = round(min(shares), 3)
    return out


EVAL_TASKS = ("movielens-ranking", "ranking", "text", "arithmetic")


@dataclass(frozen=True)
class TaskData:
    """One task's evaluation data, read and checked before any model is loaded: ranking examples,
    arithmetic questions, or the documents of a text corpus (cut into blocks with the model's tokenizer)."""

    name: str
    split: str
    limit: int | None
    items: list


def load_task_data(name: str, data: str | Path | None = None, *, split: str = "test", limit: int | None = None,
                   seed: int = 0) -> TaskData:
    """Read ``split`` of task ``name`` (``data``: its file, directory or spec; None = built-in)."""
    from slimlm.tasks import RANKING_TASKS, load_ranking_task

    if name in RANKING_TASKS:
        items = load_ranking_task(name, data, split, limit, seed)
    elif name == "text":
        from slimlm.tasks.text import read_texts

        items = read_texts(data)
    elif name == "arithmetic":
        from slimlm.tasks.arithmetic import arithmetic_examples

        items = arithmetic_examples(split, limit, None if data is None else str(data))
    else:
        raise SlimlmError(f"unknown task {name!r}; expected one of {', '.join(EVAL_TASKS)}")
    return TaskData(name, split, limit, items)


def run_task(model, tokenizer, td: TaskData, *, batch_size: int = 16, labels: tuple[str, str] = DEFAULT_LABELS,
             block_size: int = 512, progress=None) -> tuple[dict, dict | None, list[int]]:
    """Evaluate a loaded model on ``td``: ``(metrics, per-example scores or None, probe tokens)``.

    Metrics: ranking AUC / log-loss / accuracy, perplexity (text), exact match (arithmetic). Scores, the same
    examples in the same order for every model (paired comparisons): ranking ``{"labels", "p"}``, arithmetic
    ``{"correct": 1/0 per question}``. Probe tokens: a real input of the task for :func:`speed`.
    ``progress(what, total)`` returns the callback advanced by the examples done."""
    advance = progress or (lambda what, total: None)
    if td.name == "text":
        from slimlm.tasks.text import split_blocks

        blocks = split_blocks(tokenizer, td.items, block_size, td.split, td.limit)
        return perplexity(model, blocks, progress=advance("perplexity", len(blocks))), None, blocks[0]
    if td.name == "arithmetic":
        metrics = evaluate_generation(model, tokenizer, td.items, batch_size=batch_size, rule="number",
                                      progress=advance(f"generating {td.split}", len(td.items)), per_example=True)
        probe = tokenizer(td.items[0].prompt_messages[-1]["content"])["input_ids"]
        return metrics, {"correct": metrics.pop("hits")}, probe
    import time

    t0 = time.perf_counter()
    metrics, p = evaluate_ranking(model, tokenizer, td.items, batch_size=batch_size, labels=labels,
                                  progress=advance(f"scoring {td.split}", len(td.items)))
    metrics["candidates_per_s"] = len(td.items) / (time.perf_counter() - t0)
    scores = {"labels": [int(ex.label) for ex in td.items], "p": [round(float(x), 7) for x in p]}
    return metrics, scores, tokenizer(td.items[0].prefix + td.items[0].suffix)["input_ids"]


def evaluate_dir(path: str | Path, task, *, split: str = "test", limit: int | None = None, batch_size: int = 16,
                 seed: int = 0, speed_probe: bool = True, progress=None, placement: Placement | None = None) -> dict:
    """Everything the report shows for one model directory: parameters, bytes on disk, the task metric
    (:func:`run_task`), ranking candidates/s, and (optionally) prefill / decode speed; ``scores`` holds the
    per-example scores (:func:`run_task`). ``task`` is a :class:`slimlm.config.TaskConfig`; the model runs
    where ``placement`` says (default: :func:`slimlm.placement.choose`), recorded in the result."""
    import time

    from slimlm.loading import load_model, load_tokenizer, resolve_model
    from slimlm.models import param_counts
    from slimlm.placement import choose

    where = placement or choose()
    td = load_task_data(task.name, task.data, split=split, limit=limit, seed=seed)  # data errors before the model
    path = resolve_model(path)
    model = load_model(path, device=where.device, dtype=where.dtype)
    tokenizer = load_tokenizer(path)
    result: dict = {"model": str(path), "params": param_counts(model), "disk_bytes": disk_bytes(path),
                    "placement": where.to_dict()}
    t0 = time.perf_counter()
    metrics, scores, probe_tokens = run_task(model, tokenizer, td, batch_size=batch_size, progress=progress)
    if scores is not None:
        result["scores"] = scores
    result["metrics"] = metrics
    result["eval_seconds"] = round(time.perf_counter() - t0, 2)
    if speed_probe:
        result["speed"] = speed(model, probe_tokens)
    return result
