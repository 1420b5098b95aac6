"""Quality metrics: ranking AUC / log-loss / accuracy (with a bootstrap interval) and perplexity.

Ranking scores come from :func:`slimlm.serve.engine.score`, so evaluation and serving share one path.
Perplexity never materialises [tokens x vocab] logits for a whole batch: the LM head and the
cross-entropy run over slices of positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from slimlm import SlimlmError
from slimlm.serve import engine
from slimlm.tasks.ranking import DEFAULT_LABELS, RankingExample, label_token_ids, tokenize_ranking


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve (scikit-learn); ties count half. Needs both classes present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    if y.min() == y.max():
        raise SlimlmError("AUC needs both positive and negative labels; this set has only one class")
    return float(roc_auc_score(y, np.asarray(scores)))


def bootstrap_auc(labels: Sequence[int], scores: Sequence[float], *, n: int = 1000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC over resampled rows (resamples with one class are redrawn)."""
    from sklearn.metrics import roc_auc_score

    y, s = np.asarray(labels), np.asarray(scores)
    rng = np.random.default_rng(seed)
    aucs = []
    while len(aucs) < n:
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() != y[idx].max():
            aucs.append(roc_auc_score(y[idx], s[idx]))
    lo, hi = np.quantile(aucs, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


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
    p = engine.score(model, tokenized, label_ids, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                     progress=progress)
    return ranking_metrics([ex.label for ex in examples], p), p


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
        ids, mask = engine.right_pad(batch, 0, device)
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
def speed(model, tokens: Sequence[int], *, prefill_batch: int = 16, prefill_len: int = 128, decode_tokens: int = 32,
          reps: int = 3) -> dict[str, float]:
    """Prefill tokens/s (``prefill_batch`` x ``prefill_len``, one forward without a cache) and decode
    tokens/s (batch 1, greedy, KV cache, ``decode_tokens`` new tokens), median of ``reps``. ``tokens``
    supplies real text (repeated if short)."""
    import time

    device = next(model.parameters()).device
    need = prefill_batch * prefill_len
    ids = torch.tensor((list(tokens) * (need // max(len(tokens), 1) + 1))[:need], device=device)
    ids = ids.view(prefill_batch, prefill_len)
    base = model.get_decoder()

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    prefill_s = timed(lambda: base(input_ids=ids, use_cache=False))
    prompt = ids[0, :64].tolist()
    decode_s = timed(lambda: engine.generate(model, [prompt], max_new_tokens=decode_tokens, temperature=0.0))
    return {"prefill_tokens_per_s": need / prefill_s, "decode_tokens_per_s": decode_tokens / decode_s}


def evaluate_dir(path: str | Path, task, *, split: str = "test", limit: int | None = None, batch_size: int = 16,
                 seed: int = 0, speed_probe: bool = True, progress=None) -> dict:
    """Everything the report shows for one model directory: parameters, bytes on disk, the task metric
    (ranking AUC / log-loss, or perplexity for the text task), ranking candidates/s, and (optionally)
    prefill / decode speed. ``task`` is a :class:`slimlm.config.TaskConfig`."""
    import time

    from slimlm.models import load_model, load_tokenizer, param_counts, resolve_model
    from slimlm.tasks import RANKING_TASKS, load_ranking_task

    path = resolve_model(path)
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    result: dict = {"model": str(path), "params": param_counts(model), "disk_bytes": disk_bytes(path)}
    probe_tokens: list[int] = []
    t0 = time.perf_counter()
    if task.name in RANKING_TASKS:
        examples = load_ranking_task(task.name, task.data, split, limit, seed)
        metrics, _ = evaluate_ranking(model, tokenizer, examples, batch_size=batch_size, progress=progress)
        metrics["candidates_per_s"] = len(examples) / (time.perf_counter() - t0)
        probe_tokens = tokenizer(examples[0].prefix + examples[0].suffix)["input_ids"]
    elif task.name == "text":
        from slimlm.tasks.text import read_texts, text_blocks

        blocks = text_blocks(tokenizer, read_texts(task.data), 512, max_blocks=limit)
        metrics = perplexity(model, blocks, progress=progress)
        probe_tokens = blocks[0]
    else:
        raise SlimlmError(f"evaluating task {task.name!r} in a pipeline is not supported yet (ranking and text are)")
    result["metrics"] = metrics
    result["eval_seconds"] = round(time.perf_counter() - t0, 2)
    if speed_probe:
        result["speed"] = speed(model, probe_tokens)
    return result
