"""Metrics against hand-computed values; perplexity against a naive full-logits reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimlm import SlimlmError
from slimlm.evaluate import (
    bootstrap_auc,
    evaluate_ranking,
    log_loss,
    paired_auc_delta,
    paired_mean_delta,
    perplexity,
    ranking_metrics,
    roc_auc,
)
from slimlm.runtime import scoring
from slimlm.tasks.ranking import RankingExample, label_token_ids, tokenize_ranking
from slimlm.testing import tiny_model


@pytest.mark.parametrize("labels, scores, want", [
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: pairs won 1 + 2 of 4
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
    # positives {0.9, 0.7, 0.2} vs negatives {0.8, 0.3}: won 2 + 1 + 0 of 6
    ([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.3, 0.2], 0.5),
    # a tie counts half: (1 + 0.5) / 2
    ([1, 1, 0], [0.6, 0.5, 0.5], 0.75),
    ([1, 0], [0.2, 0.9], 0.0),
])
def test_auc_hand_computed(labels, scores, want):
    assert roc_auc(labels, scores) == pytest.approx(want)


def test_auc_needs_both_classes():
    with pytest.raises(SlimlmError, match="all positive"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    # the bootstrap (which ranking_metrics runs first) refuses too, rather than redrawing forever
    with pytest.raises(SlimlmError, match="all negative"):
        ranking_metrics([0, 0], [0.1, 0.2])
    with pytest.raises(SlimlmError, match="empty"):
        ranking_metrics([], [])
    assert bootstrap_auc([1, 0], [0.9, 0.1], n=50) == (1.0, 1.0)  # two rows, both classes: fine


def test_log_loss_hand_computed():
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))  # clipped, not infinite


def test_bootstrap_resample_aucs_equal_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    s = np.round(y * 0.3 + rng.random(200), 1)  # coarse scores: many ties
    # the same resamples the function draws (one batch of n rows), each scored by sklearn
    idx = np.random.default_rng(5).integers(0, 200, (40, 200))
    ref = [roc_auc_score(y[i], s[i]) for i in idx if 0 < y[i].sum() < 200]
    want = np.quantile(ref, [0.025, 0.975])
    assert bootstrap_auc(y, s, n=40, seed=5) == pytest.approx(tuple(want), abs=1e-12)


def test_paired_auc_delta_equals_sklearn_on_the_same_resamples():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 150)
    a = np.round(y * 0.4 + rng.random(150), 2)
    b = np.round(y * 0.3 + rng.random(150), 2)
    idx = np.random.default_rng(7).integers(0, 150, (50, 150))
    diffs = [roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]) for i in idx if 0 < y[i].sum() < 150]
    delta, lo, hi = paired_auc_delta(y, a, b, n=50, seed=7)
    assert delta == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    # a model against itself: exactly zero; pairing makes the interval much narrower than the marginal one
    assert paired_auc_delta(y, a, a, n=200) == (0.0, 0.0, 0.0)
    lo_a, hi_a = bootstrap_auc(y, a, n=200)
    _, lo_d, hi_d = paired_auc_delta(y, a, a + 0.05 * rng.random(150), n=200)
    assert hi_d - lo_d < (hi_a - lo_a) / 2


def test_group_auc_delta_is_the_mean_of_each_sides_aucs_on_the_same_resamples():
    """Two seeds against two: mean AUC of one group minus the other's, every model scored on each resample
    (sklearn on the resamples the function draws as the oracle)."""
    from sklearn.metrics import roc_auc_score

    from slimlm.evaluate import paired_group_auc_delta

    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 120)
    a1, a2, b1, b2 = (np.round(y * w + rng.random(120), 2) for w in (0.5, 0.45, 0.3, 0.35))
    idx = np.random.default_rng(3).integers(0, 120, (60, 120))
    diffs = [(roc_auc_score(y[i], a1[i]) + roc_auc_score(y[i], a2[i])) / 2
             - (roc_auc_score(y[i], b1[i]) + roc_auc_score(y[i], b2[i])) / 2 for i in idx if 0 < y[i].sum() < 120]
    delta, lo, hi = paired_group_auc_delta(y, [a1, a2], [b1, b2], n=60, seed=3)
    want = (roc_auc_score(y, a1) + roc_auc_score(y, a2)) / 2 - (roc_auc_score(y, b1) + roc_auc_score(y, b2)) / 2
    assert delta == pytest.approx(want, abs=1e-12) and delta > 0
    assert (lo, hi) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    assert paired_group_auc_delta(y, [a1], [b1], n=60, seed=3) == paired_auc_delta(y, a1, b1, n=60, seed=3)
    with pytest.raises(SlimlmError, match="at least one model on each side"):
        paired_group_auc_delta(y, [], [b1])


def test_paired_mean_delta_matches_the_normal_approximation_and_refuses_unpaired_lists():
    rng = np.random.default_rng(5)
    a = (rng.random(2000) < 0.45).astype(int)  # two models' 0/1 hits on the same questions, correlated
    b = np.where(rng.random(2000) < 0.8, a, (rng.random(2000) < 0.35).astype(int))
    delta, lo, hi = paired_mean_delta(a, b, n=2000, seed=1)
    d = a - b
    assert delta == pytest.approx(d.mean(), abs=1e-12)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(len(d))  # large n: the bootstrap interval ~ the normal one
    assert lo == pytest.approx(d.mean() - half, abs=0.004) and hi == pytest.approx(d.mean() + half, abs=0.004)
    assert paired_mean_delta(a, a) == (0.0, 0.0, 0.0)
    assert paired_mean_delta([1, 1, 1], [0, 0, 0]) == (1.0, 1.0, 1.0)
    with pytest.raises(SlimlmError, match="equally long"):
        paired_mean_delta([1, 0], [1])


def test_bootstrap_interval_brackets_auc_and_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s = y * 0.5 + rng.random(300)
    auc = roc_auc(y, s)
    lo, hi = bootstrap_auc(y, s, n=300, seed=3)
    assert 0 <= lo < auc < hi <= 1
    assert (lo, hi) == bootstrap_auc(y, s, n=300, seed=3)
    m = ranking_metrics(y, s / s.max())
    assert m["n"] == 300 and m["auc"] == pytest.approx(auc)
    assert m["accuracy"] == pytest.approx(float(((s / s.max() >= 0.5) == y).mean()))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [3, 1000])
def test_perplexity_matches_full_logits(family, chunk):
    model = tiny_model(family, seed=1)
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (17, 9, 2, 13)]
    got = perplexity(model, blocks, batch_size=3, chunk=chunk)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logits = model(torch.tensor([b])).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(b[1:]), reduction="sum").item()
            count += len(b) - 1
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(nll / count, abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_rejects_empty():
    with pytest.raises(SlimlmError):
        perplexity(tiny_model("llama"), [[5]])


def test_evaluate_ranking_uses_engine_scores(tiny_tok):
    model = tiny_model("llama", seed=2, vocab_size=len(tiny_tok))
    prefix = "User: 24-year-old male technician.\n"
    examples = [RankingExample(f"e{i}", "g", prefix, f"Candidate movie: Toy Story {i}. Answer:", i % 2)
                for i in range(6)]
    metrics, p = evaluate_ranking(model, tiny_tok, examples, batch_size=4)
    ref = scoring.score_full(model, [t.input_ids for t in tokenize_ranking(examples, tiny_tok)],
                             label_token_ids(tiny_tok), pad_id=tiny_tok.pad_token_id)
    np.testing.assert_allclose(p, ref, atol=1e-5)
    assert metrics["auc"] == pytest.approx(roc_auc([e.label for e in examples], p))


@pytest.mark.parametrize("tokens", [list(range(5, 300)), [7] * 50])  # real-ish text, and one repeated token
def test_speed_probe_measures_prefill_decode_and_ranking(tokens):
    from slimlm.evaluate import speed
    from slimlm.testing import tiny_model

    got = speed(tiny_model("llama"), tokens, prefill_batch=2, prefill_len=16, decode_tokens=2, candidates=3, reps=1)
    assert set(got) == {"prefill_tokens_per_s", "decode_tokens_per_s", "candidates_per_s", "cpu_share"}
    assert all(math.isfinite(v) and v > 0 for v in got.values())


def test_the_speed_probe_records_how_much_cpu_it_got(monkeypatch):
    """cpu_share = process CPU time / (wall time x torch threads): with a CPU clock that runs at a third of
    the threads' wall time (another job holding the cores), the probe reports a third."""
    import time

    from slimlm.evaluate import speed
    from slimlm.testing import tiny_model

    threads = torch.get_num_threads()
    monkeypatch.setattr(time, "process_time", lambda: time.perf_counter() * threads / 3)
    got = speed(tiny_model("llama"), list(range(5, 300)), prefill_batch=2, prefill_len=16, decode_tokens=2,
                candidates=3, reps=2)
    assert got["cpu_share"] == pytest.approx(1 / 3, abs=0.02)
