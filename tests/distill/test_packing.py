"""Multi-item packing: a packed row (one prefix, several candidates, block mask, restarted positions) gives
the same losses, hidden states and gradients as one sequence per candidate, on every family, with uneven
candidate lengths and padding; and packed training sequences from ranking examples."""

from __future__ import annotations

import pytest
import torch

from slimlm.distill.data import Seq, collate, ranking_sequences
from slimlm.distill.losses import LossConfig
from slimlm.distill.trainer import DistillModule
from slimlm.models import FAMILIES
from slimlm.runtime.packing import attention_inputs, block_mask, pack
from slimlm.tasks.completion import IGNORE_INDEX
from slimlm.tasks.ranking import TokenizedRanking
from slimlm.testing import tiny_model

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py

YES, NO = 7, 9


def groups(seed: int):
    """Two groups: (prefix, [candidate tokens ending in the label token]) with uneven lengths."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return [int(t) for t in torch.randint(20, 300, (n,), generator=g)]

    return [(toks(9), [toks(3) + [YES], toks(5) + [NO], toks(2) + [YES]]),
            (toks(4), [toks(6) + [NO], toks(1) + [YES]])]


def packed_seqs(gs) -> list[Seq]:
    out = []
    for prefix, cands in gs:
        ids, pos, seg = pack(prefix, cands)
        labels = [IGNORE_INDEX] * len(ids)
        end = len(prefix)
        for c in cands:
            end += len(c)
            labels[end - 1] = c[-1]
        out.append(Seq(tuple(ids), tuple(labels), len(prefix), tuple(pos), tuple(seg)))
    return out


def single_seqs(gs) -> list[Seq]:
    return [Seq(tuple(p + c), (IGNORE_INDEX,) * (len(p) + len(c) - 1) + (c[-1],), len(p) + len(c) - 1)
            for p, cands in gs for c in cands]


def test_block_mask_by_hand():
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    pad = torch.tensor([[1, 1, 1, 1, 1, 0]])
    m = block_mask(seg, pad)[0, 0].int()
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0],   # candidate 2 skips candidate 1
                         [1, 0, 0, 0, 0, 0]])  # padding query: key 0 only
    assert torch.equal(m, want)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_one_sequence_per_candidate(family, attn):
    student = tiny_model(family, seed=1, attn_implementation=attn).train()
    teacher = tiny_model(family, seed=2, attn_implementation=attn)
    vocab = student.config.vocab_size
    gs = groups(0)
    results = []
    for seqs in (packed_seqs(gs), single_seqs(gs)):
        student.zero_grad()
        b = collate(seqs, pad_id=0)
        module = DistillModule(student, teacher, LossConfig(divergence="forward_kl", ce_weight=0.5), vocab, 4)
        loss = module(b["input_ids"], b["attention_mask"], b["labels"], mode="kd",
                      position_ids=b.get("position_ids"), segments=b.get("segments"))
        loss.backward()
        hidden = student.get_decoder()(input_ids=b["input_ids"], **attention_inputs(
            student, b["attention_mask"], b.get("position_ids"), b.get("segments"))).last_hidden_state
        at_targets = hidden[:, :-1][b["labels"][:, 1:] != IGNORE_INDEX]  # the states that predict each label
        layer = student.get_decoder().layers[0].mlp.down_proj.weight
        results.append((loss.detach(), at_targets.detach(), student.get_output_embeddings().weight.grad.clone(),
                        layer.grad.clone()))
    (lp, hp, gp, wp), (ls, hs, gs_, ws) = results
    assert lp.shape == () and torch.isfinite(lp)
    torch.testing.assert_close(lp, ls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hp, hs, rtol=1e-5, atol=1e-5)  # same candidate order in both layouts
    torch.testing.assert_close(gp, gs_, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wp, ws, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family,window", [("mistral", {"sliding_window": 4}),
                                           ("qwen2", {"use_sliding_window": True, "sliding_window": 4,
                                                      "max_window_layers": 1})], ids=["all-sliding", "mixed"])
def test_packed_rows_keep_sliding_windows(family, window):
    """A window shorter than prefix + candidate: a packed row's sliding-window layers drop the same keys
    (by position, restarted per candidate) as the candidate's own sequence does."""
    student = tiny_model(family, seed=1, initializer_range=0.2, **window)
    outs = []
    for seqs in (packed_seqs(groups(3)), single_seqs(groups(3))):
        b = collate(seqs, pad_id=0)
        hidden = student.get_decoder()(input_ids=b["input_ids"], **attention_inputs(
            student, b["attention_mask"], b.get("position_ids"), b.get("segments"))).last_hidden_state
        outs.append(hidden[:, :-1][b["labels"][:, 1:] != IGNORE_INDEX].detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_sft_mode_and_a_mixed_batch_of_packed_and_plain_rows():
    student = tiny_model("llama", seed=3)
    vocab = student.config.vocab_size
    gs = groups(1)
    mixed = packed_seqs(gs[:1]) + single_seqs(gs[1:])  # a packed row beside plain ones, padded together
    plain = single_seqs(gs)
    module = DistillModule(student, None, LossConfig(), vocab, 8)
    losses = []
    for seqs in (mixed, plain):
        b = collate(seqs, pad_id=0)
        losses.append(module(b["input_ids"], b["attention_mask"], b["labels"], mode="sft",
                             position_ids=b.get("position_ids"), segments=b.get("segments")))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def tok(i, group, prefix, suffix, label):
    return TokenizedRanking(str(i), group, tuple(prefix), tuple(suffix), label)


def test_ranking_sequences_pack_consecutive_candidates_of_a_group():
    ex = [tok(0, "a", [1, 2, 3], [10, 11], 1), tok(1, "a", [1, 2, 3], [12], 0), tok(2, "a", [1, 2, 3], [13, 14], 1),
          tok(3, "b", [4, 5], [15], 0)]
    seqs = ranking_sequences(ex, (YES, NO), k=2, max_length=64)
    assert len(seqs) == 3  # a: 2 + 1 (k = 2), b: 1
    first = seqs[0]
    assert first.input_ids == (1, 2, 3, 10, 11, YES, 12, NO)
    assert first.positions == (0, 1, 2, 3, 4, 5, 3, 4) and first.segments == (0, 0, 0, 1, 1, 1, 2, 2)
    assert [y for y in first.labels if y != IGNORE_INDEX] == [YES, NO]
    assert seqs[1].segments is None and seqs[1].input_ids == (1, 2, 3, 13, 14, YES)  # a group of one: plain
    # unpacked, a packed row is exactly the k = 1 sequences
    assert [s for p in seqs for s in p.unpacked()] == ranking_sequences(ex, (YES, NO), k=1, max_length=64)
    # max_length bounds each candidate's own sequence: the prefix is cut from the left
    short = ranking_sequences(ex[:2], (YES, NO), k=2, max_length=5)[0]
    assert short.input_ids[:short.prompt_len] == (2, 3) and short.positions[-2:] == (2, 3)
