"""Scoring: prefix reuse and batched whole prompts against a naive full-logits reference; label sets of
any size against the full-vocabulary softmax."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from slimlm import SlimlmError
from slimlm.models import FAMILIES
from slimlm.runtime.scoring import (
    label_probs_full,
    label_probs_packed,
    label_probs_shared_prefix,
    score,
    score_full,
    score_shared_prefix,
)
from slimlm.tasks.ranking import TokenizedRanking
from slimlm.testing import tiny_model

VOCAB = 384
LABELS = (305, 304)  # any two ids work; these are " Yes" / " No" in the tiny tokenizer
ATOL = {torch.float32: 1e-5}


def _examples(seed: int = 0) -> list[TokenizedRanking]:
    """Shared-prefix groups with suffixes of different lengths, singletons, and one group name that
    reappears with another prefix; shuffled so groups interleave."""
    rng = random.Random(seed)

    def ids(n):
        return tuple(rng.randrange(VOCAB) for _ in range(n))

    out = []
    spec = [("g1", 17, [1, 3, 7, 2, 9]), ("g2", 9, [4, 4, 1, 6]), ("g3", 30, [2, 5, 1, 8, 3, 3, 11]),
            ("s1", 12, [4]), ("s2", 3, [1]), ("s3", 25, [6]), ("g1", 6, [5])]  # last: same name, new prefix
    for group, plen, suffix_lens in spec:
        prefix = ids(plen)
        for k, n in enumerate(suffix_lens):
            out.append(TokenizedRanking(f"{group}-{plen}-{k}", group, prefix, ids(n), k % 2))
    rng.shuffle(out)
    return out


def _reference(model, examples) -> np.ndarray:
    """P(pos) from the full-vocabulary logits of each whole prompt, one at a time, no cache, no padding."""
    out = []
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex.input_ids])).logits[0, -1]
            out.append(torch.softmax(logits[list(LABELS)].double(), dim=0)[0].item())
    return np.array(out)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    # A wider init than the default 0.02 so that scores spread well away from 0.5 and a wrong position
    # or a wrong prefix would move them by much more than the tolerance.
    return tiny_model(request.param, seed=3, initializer_range=0.2)


@pytest.fixture(scope="module")
def reference(model):
    examples = _examples()
    ref = _reference(model, examples)
    assert ref.max() - ref.min() > 0.05, "scores too flat to tell a right answer from a wrong one"
    return examples, ref


@pytest.mark.parametrize("strategy", ["auto", "packed", "broadcast"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_score_with_prefix_reuse_matches_reference(model, reference, batch_size, strategy):
    examples, ref = reference
    done = []
    got = score(model, examples, LABELS, batch_size=batch_size, strategy=strategy, on_scored=done.append)
    np.testing.assert_allclose(got, ref, atol=ATOL[torch.float32], rtol=0)
    assert sum(done) == len(examples)


def test_packed_groups_match_reference(model, reference):
    """One packed row per group (uneven suffixes, groups of one, rows padded together in a batch)."""
    examples, ref = reference
    by_group: dict = {}
    for i, ex in enumerate(examples):
        by_group.setdefault((ex.group, ex.prefix_ids), []).append(i)
    groups = [(prefix, [examples[i].suffix_ids for i in idx]) for (_, prefix), idx in by_group.items()]
    got = label_probs_packed(model, groups, LABELS, batch_size=4, pad_id=13)
    for (_, idx), probs in zip(by_group.items(), got, strict=True):
        np.testing.assert_allclose(probs[:, 0], ref[idx], atol=ATOL[torch.float32], rtol=0)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-9)


def test_score_without_reuse_and_score_full_match_reference(model, reference):
    examples, ref = reference
    np.testing.assert_allclose(score(model, examples, LABELS, batch_size=3, reuse_prefix=False), ref,
                               atol=ATOL[torch.float32], rtol=0)
    full = score_full(model, [ex.input_ids for ex in examples], LABELS, batch_size=3, pad_id=7)
    np.testing.assert_allclose(full, ref, atol=ATOL[torch.float32], rtol=0)


def test_score_shared_prefix_matches_reference(model, reference):
    examples, ref = reference
    idx = [i for i, ex in enumerate(examples) if ex.group == "g3"]
    got = score_shared_prefix(model, examples[idx[0]].prefix_ids, [examples[i].suffix_ids for i in idx], LABELS,
                              batch_size=2, pad_id=11)
    np.testing.assert_allclose(got, ref[idx], atol=ATOL[torch.float32], rtol=0)


def test_output_follows_input_order(model, reference):
    examples, ref = reference
    perm = np.random.default_rng(0).permutation(len(examples))
    got = score(model, [examples[i] for i in perm], LABELS, batch_size=3)
    np.testing.assert_allclose(got, ref[perm], atol=ATOL[torch.float32], rtol=0)
    assert len(score(model, [], LABELS)) == 0


def _prompts(seed, lengths):
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lengths]


def test_label_probs_over_a_label_set_match_full_vocab_softmax(model):
    labels = (5, 17, 300)
    prefix, suffixes = _prompts(9, (10,))[0], _prompts(10, (4, 1, 7))
    ref = []
    with torch.no_grad():
        for s in suffixes:
            z = model(torch.tensor([prefix + s])).logits[0, -1].double()
            ref.append(torch.softmax(z[list(labels)], 0).numpy())
    ref = np.array(ref)
    np.testing.assert_allclose(label_probs_shared_prefix(model, prefix, suffixes, labels, batch_size=2), ref,
                               atol=1e-5)
    np.testing.assert_allclose(label_probs_full(model, [prefix + s for s in suffixes], labels), ref, atol=1e-5)
    np.testing.assert_allclose(label_probs_shared_prefix(model, prefix, suffixes, labels).sum(1), 1, atol=1e-9)
    with pytest.raises(SlimlmError, match="distinct"):
        label_probs_full(model, [prefix], (5, 5))
    with pytest.raises(SlimlmError, match="vocabulary"):
        label_probs_full(model, [prefix], (5, VOCAB))


# --------------------------------------------------------------------------- sliding windows


SLIDING = {"mistral": {"sliding_window": 8},  # every layer slides
           "qwen2": {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}}  # one of each


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_layers_keep_their_window_in_shared_prefix_scoring(family):
    """Layers with a sliding window shorter than prefix + candidate: the packed row (with the prefix, and
    after its cached KV) and the broadcast batches drop the keys beyond the window as the unpacked prompt
    does."""
    from slimlm.runtime.prefix_cache import PrefixCache

    m = tiny_model(family, seed=4, initializer_range=0.2, **SLIDING[family])
    prefix = list(range(3, 23))
    rounds = [[[30, 31, 32], [40], [50, 51, 52, 53, 54]], [[60, 61], [70, 71, 72, 73]]]
    cache = PrefixCache(1 << 24)
    for suffixes in rounds:  # cold (packed with the prefix), then after the cached prefix
        want = _reference(m, [TokenizedRanking(str(i), "g", tuple(prefix), tuple(x), 0) for i, x in enumerate(suffixes)])
        for kw in ({"cache": cache}, {"pack_max": 0}):
            got = label_probs_shared_prefix(m, prefix, suffixes, LABELS, **kw)[:, 0]
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    examples = _examples()  # evaluation: many groups packed into rows, and broadcast
    for strategy in ("packed", "broadcast"):
        np.testing.assert_allclose(score(m, examples, LABELS, strategy=strategy), _reference(m, examples), atol=1e-5, rtol=0)


def _spy_shared(monkeypatch) -> list[int]:
    """Count the candidate batches :mod:`slimlm.runtime.shared_prefix` runs."""
    from slimlm.runtime import shared_prefix

    calls: list[int] = []
    real = shared_prefix.candidates_forward

    def spy(base, kv, ids, mask):
        calls.append(ids.shape[0])
        return real(base, kv, ids, mask)

    monkeypatch.setattr(shared_prefix, "candidates_forward", spy)
    return calls


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prefix attention", "kv broadcast"])
def test_candidates_on_a_shared_prefix_match_the_reference_either_way(model, reference, shared, monkeypatch):
    """More candidates than are packed: on a CPU they attend to the prefix KV in place (one product over the
    prefix for the whole batch, no copy per candidate); the KV broadcast (CUDA, windows that cut the prefix)
    is the other way. Both equal one whole prompt per candidate, uneven lengths and padding included."""
    from slimlm.runtime import shared_prefix

    calls = _spy_shared(monkeypatch)
    if not shared:
        monkeypatch.setattr(shared_prefix, "DEVICES", ())
    examples, ref = reference
    idx = [i for i, ex in enumerate(examples) if ex.group == "g3"]  # 7 candidates of 1-11 tokens after 30
    got = label_probs_shared_prefix(model, examples[idx[0]].prefix_ids, [examples[i].suffix_ids for i in idx],
                                    LABELS, batch_size=3, pad_id=11, pack_max=0)
    np.testing.assert_allclose(got[:, 0], ref[idx], atol=ATOL[torch.float32], rtol=0)
    assert sorted(calls) == ([2, 2, 3] if shared else [])  # even batches of at most 3; none when broadcast


@pytest.mark.parametrize("overrides", [{"num_key_value_heads": 4}, {"num_key_value_heads": 1}],
                         ids=["one KV head per query head", "one KV head for all"])
def test_shared_prefix_attention_for_every_grouping_of_heads(overrides, monkeypatch):
    calls = _spy_shared(monkeypatch)
    m = tiny_model("llama", seed=5, initializer_range=0.2, **overrides)
    prefix, suffixes = list(range(3, 40)), [[50, 51, 52], [60], [70, 71, 72, 73, 74, 75]]
    want = _reference(m, [TokenizedRanking(str(i), "g", tuple(prefix), tuple(s), 0) for i, s in enumerate(suffixes)])
    got = label_probs_shared_prefix(m, prefix, suffixes, LABELS, pack_max=0)[:, 0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert calls == [3]


def test_shared_prefix_attention_in_bf16_and_eager_models_broadcast(monkeypatch):
    """In bf16 the shared-prefix attention's logits and softmax run in float32, so scores stay within bf16's
    rounding of fp32's; a model loaded with eager attention keeps the broadcast (its own attention function)."""
    calls = _spy_shared(monkeypatch)
    prefix, suffixes = list(range(3, 40)), [[50, 51, 52], [60], [70, 71, 72, 73, 74, 75]]
    m = tiny_model("qwen3", seed=5, initializer_range=0.2)
    want = _reference(m, [TokenizedRanking(str(i), "g", tuple(prefix), tuple(s), 0) for i, s in enumerate(suffixes)])
    got = label_probs_shared_prefix(m.to(torch.bfloat16), prefix, suffixes, LABELS, pack_max=0)[:, 0]
    np.testing.assert_allclose(got, want, atol=0.03, rtol=0)
    assert calls == [3]
    m = tiny_model("qwen3", seed=5, initializer_range=0.2, attn_implementation="eager")
    np.testing.assert_allclose(label_probs_shared_prefix(m, prefix, suffixes, LABELS, pack_max=0)[:, 0], want,
                               atol=1e-5, rtol=0)
    assert calls == [3]  # not taken


def test_other_threads_keep_plain_attention_while_candidates_use_the_shared_prefix(model):
    """The shared-prefix path changes no model state: a thread scoring candidates on it and threads running
    whole prompts on the same model at the same time all get the reference scores."""
    import threading

    examples, ref = _examples(), _reference(model, _examples())
    idx = [i for i, ex in enumerate(examples) if ex.group == "g3"]
    results: dict = {}
    gate = threading.Barrier(3)

    def shared():
        gate.wait()
        for _ in range(5):
            results.setdefault("shared", []).append(label_probs_shared_prefix(
                model, examples[idx[0]].prefix_ids, [examples[i].suffix_ids for i in idx], LABELS, pack_max=0)[:, 0])

    def whole(name):
        gate.wait()
        for _ in range(5):
            results.setdefault(name, []).append(score_full(model, [ex.input_ids for ex in examples], LABELS))

    threads = [threading.Thread(target=shared), threading.Thread(target=whole, args=("a",)),
               threading.Thread(target=whole, args=("b",))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for got in results["shared"]:
        np.testing.assert_allclose(got, ref[idx], atol=ATOL[torch.float32], rtol=0)
    for got in results["a"] + results["b"]:
        np.testing.assert_allclose(got, ref, atol=ATOL[torch.float32], rtol=0)
