"""Multi-item training benchmark: MovieLens training examples (candidates) per second with k candidates packed
under one user prefix, against k = 1, same model, same machine, one run; and the quality check at equal
examples seen.

    python benchmarks/multi_item.py speed [--ks 1,4,8,16] [--candidates 16] [--steps 4] [--rounds 2]
                                          [--student-layers 10] [--out runs/bench/multi_item_speed.json]
    python benchmarks/multi_item.py quality [--examples 1600] [--k 8] [--runs 1,8] [--layers 6]
                                            [--out runs/bench/multi_item_quality.json]
    python benchmarks/multi_item.py paired FILE      (the paired ΔAUCs of a quality file cut short)
    python benchmarks/multi_item.py carry [--k 8] [--candidates 16] [--steps 3] [--rounds 2]
                                          [--out runs/bench/multi_item_carry.json]
    python benchmarks/multi_item.py sessions [--k 8]   (how the users entered their ratings: see sessions())

speed: for every k, training steps of ``--candidates`` candidates each (k = 1: that many rows; k > 1:
packed rows of up to k candidates, as slimlm's trainer builds them from the train split with
``task.candidates_per_prefix = k``), timed from the forward to the optimizer step, exactly as
``slimlm.distill.trainer`` runs a step (DistillModule, chunked loss, AdamW, clip). Two settings:

    teacher SFT   the built-in SmolLM2-135M-Instruct teacher, cross-entropy on the label tokens;
    student KD    a --student-layers student made from the teacher's own layers (as ``slimlm init-student``),
                  forward KL to the live 30-layer teacher (the teacher forward is in the step).

The ks alternate within each round (k = 1, 4, 8, 16, then again), so load drift hits all alike; the
figure is the median step over all rounds; examples/s = candidates per step / median step seconds.

quality: SFT of a --layers model (the teacher's evenly spaced layers) for the same number of training
examples with k = 1 and with --k, same seed, lr and candidates per step; both scored on the whole
validation split (every user's 2 validation candidates) and compared with a paired bootstrap of ΔAUC
(slimlm.evaluate.paired_auc_delta). Target: the interval holds 0 (packing costs no quality). ``--runs
1,1u,8`` adds the diagnostic "1u": k = 1 rows (each candidate with its own up-to-date prefix) batched in
blocks of --k consecutive candidates of one user, as the packed rows are; so a batch holds as few users
as at k = --k, without packing. Every run is compared with k = 1 (else with the first run).

carry: the two ways of sharing a prefix the issue names, on teacher SFT steps at --k: packed rows (one
sequence, block mask, per-candidate positions: what the trainer does) vs the prefix's KV carried with its
autograd graph into a right-padded batch of the row's candidates (:func:`carry_loss`). First the loss and
three weights' gradients of one batch both ways (they must agree to fp32 rounding), then whole steps
(forward, backward, clip, AdamW) alternating between the two, median seconds per candidate.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from _common import write_json  # benchmarks/ is on sys.path when a script runs


def sequences(tokenizer, k: int, seed: int = 0):
    from slimlm.config import TaskConfig
    from slimlm.distill.data import build_sequences

    return build_sequences(TaskConfig(candidates_per_prefix=k), tokenizer, "train", None, seed)


def user_blocks(k: int) -> list[list[int]]:
    """The k = 1 training rows (in the task's order: user by user, in time) cut into blocks of up to ``k``
    consecutive rows of one user: the candidates a k-packed row holds, each with its own up-to-date prefix."""
    from slimlm.tasks import load_ranking_task

    users = [e.group.split("-")[0] for e in load_ranking_task("movielens-ranking", None, "train")]
    blocks: list[list[int]] = []
    for i, u in enumerate(users):
        if blocks and users[blocks[-1][0]] == u and len(blocks[-1]) < k:
            blocks[-1].append(i)
        else:
            blocks.append([i])
    return blocks


def batches_of(seqs, candidates: int, seed: int, blocks: list[list[int]] | None = None):
    """Batches of rows holding ``candidates`` targets each (whole rows), in a seeded order; with ``blocks``
    (lists of row indices) the blocks are shuffled and kept together, so a batch holds few users."""
    from slimlm.tasks.completion import IGNORE_INDEX

    if blocks is None:
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        shuffled = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).tolist()
        order = [i for b in shuffled for i in blocks[b]]
    batch, n = [], 0
    for i in order:
        t = sum(y != IGNORE_INDEX for y in seqs[i].labels)
        if n + t > candidates and batch:
            yield batch, n
            batch, n = [], 0
        batch.append(seqs[i])
        n += t


def make_step(module, params, lr=5e-5):
    from slimlm.distill.data import window_targets
    from slimlm.distill.losses import normalize

    opt = torch.optim.AdamW(params, lr=lr)

    def step(batch, mode):
        loss = module(batch["input_ids"], batch["attention_mask"], batch["labels"], mode=mode,
                      position_ids=batch.get("position_ids"), segments=batch.get("segments"))
        normalize(loss, window_targets([batch])).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def speed(args) -> dict:
    from slimlm.distill.data import collate
    from slimlm.distill.losses import LossConfig, check_vocab
    from slimlm.distill.trainer import DistillModule
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.prune.slice import evenly_spaced, keep_layers

    tok = load_tokenizer("teacher")
    teacher = load_model("teacher")
    ks = [int(k) for k in args.ks.split(",")]
    data = {k: sequences(tok, k) for k in ks}
    vocab = check_vocab(teacher.get_output_embeddings().weight.shape[0], None, len(tok))
    settings = {}
    sft_model = load_model("teacher").train()
    settings["teacher SFT"] = (DistillModule(sft_model, None, LossConfig(), vocab, 64), "sft", sft_model)
    student = keep_layers(load_model("teacher"), evenly_spaced(teacher.config.num_hidden_layers, args.student_layers))
    student.train()
    settings["student KD"] = (DistillModule(student, teacher, LossConfig(), vocab, 64), "kd", student)
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                 "threads": torch.get_num_threads(), "candidates_per_step": args.candidates, "settings": {}}
    for name, (module, mode, model) in settings.items():
        step = make_step(module, [p for p in model.parameters() if p.requires_grad])
        feeds = {k: batches_of(data[k], args.candidates, 0) for k in ks}
        times: dict[int, list[float]] = {k: [] for k in ks}
        tokens: dict[int, list[int]] = {k: [] for k in ks}
        for k in ks:  # warm-up: one step each (allocator, first-call overheads)
            b, _ = next(feeds[k])
            step(collate(b, tok.pad_token_id), mode)
        for _ in range(args.rounds):
            for k in ks:
                for _ in range(args.steps):
                    rows, n = next(feeds[k])
                    batch = collate(rows, tok.pad_token_id)
                    t0 = time.perf_counter()
                    step(batch, mode)
                    times[k].append((time.perf_counter() - t0) / n)  # seconds per candidate
                    tokens[k].append(int(batch["attention_mask"].sum()) / n)
        res = {}
        for k in ks:
            per = statistics.median(times[k])
            res[k] = {"examples_per_s": 1.0 / per, "tokens_per_example": statistics.mean(tokens[k]),
                      "steps": len(times[k])}
        for k in ks:
            res[k]["speedup_vs_k1"] = res[k]["examples_per_s"] / res[ks[0]]["examples_per_s"]
        out["settings"][name] = res
        print(f"\n{name} ({mode}), {args.candidates} candidates a step, median over {args.rounds} rounds x "
              f"{args.steps} steps:")
        print(f"{'k':>4} {'examples/s':>11} {'tokens/example':>15} {'vs k=1':>8}")
        for k in ks:
            r = res[k]
            print(f"{k:>4} {r['examples_per_s']:>11.2f} {r['tokens_per_example']:>15.1f} {r['speedup_vs_k1']:>7.2f}x")
    return out


def quality(args) -> dict:
    from slimlm.distill.data import collate
    from slimlm.distill.losses import LossConfig, check_vocab
    from slimlm.distill.trainer import DistillModule
    from slimlm.evaluate import bootstrap_auc, evaluate_ranking
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.prune.slice import evenly_spaced, keep_layers
    from slimlm.tasks import load_ranking_task

    tok = load_tokenizer("teacher")
    val = load_ranking_task("movielens-ranking", None, "val")
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
                 "examples": args.examples, "layers": args.layers, "candidates_per_step": args.candidates,
                 "lr": args.lr, "runs": {}}
    for run in args.runs.split(","):  # "1", "8": k; "1u": k = 1 rows in blocks of --k of one user
        spec, _, times = run.partition("x")  # "8x3": k = 8 for 3 x --examples (about k = 1's time at --examples)
        k, examples = int(spec.rstrip("u")), args.examples * (float(times) if times else 1)
        torch.manual_seed(0)
        base = load_model("teacher")
        model = keep_layers(base, evenly_spaced(base.config.num_hidden_layers, args.layers)).train()
        vocab = check_vocab(model.get_output_embeddings().weight.shape[0], None, len(tok))
        module = DistillModule(model, None, LossConfig(), vocab, 64)
        step = make_step(module, [p for p in model.parameters() if p.requires_grad], lr=args.lr)
        seen, t0, losses = 0, time.perf_counter(), []
        feed = batches_of(sequences(tok, k), args.candidates, 0, user_blocks(args.k) if spec.endswith("u") else None)
        while seen < examples:
            rows, n = next(feed)
            losses.append(step(collate(rows, tok.pad_token_id), "sft") / n)
            seen += n
        train_s = time.perf_counter() - t0
        model.eval()
        metrics, p = evaluate_ranking(model, tok, val, batch_size=16)
        out["runs"][run] = {"examples_seen": seen, "train_seconds": train_s, "val_auc": metrics["auc"],
                          "val_auc_ci95": list(bootstrap_auc([e.label for e in val], p)), "n_val": len(val),
                          "last_loss": statistics.mean(losses[-10:]),
                          "val_scores": [round(float(x), 6) for x in p]}  # for pairing with later runs
        print(f"{run}: {seen} examples in {train_s:.0f} s; validation AUC {metrics['auc']:.4f} on {len(val)} rows")
        paired_deltas(out, [e.label for e in val])
        write_json(args.out, out)  # each run as it ends (the whole command takes hours)
    return out


def paired_deltas(out: dict, labels: list[int]) -> None:
    """Every finished run against k = 1 (else the first run), ΔAUC paired on the same validation rows, from
    the runs' saved ``val_scores``; written into ``out``."""
    from slimlm.evaluate import paired_auc_delta

    runs = out["runs"]
    base = "1" if "1" in runs else next(iter(runs))
    for other in [r for r in runs if r != base]:
        d = paired_auc_delta(labels, runs[other]["val_scores"], runs[base]["val_scores"])
        out[f"delta_auc_{other}_minus_{base}"] = list(d)
        print(f"ΔAUC ({other} − {base}) {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]; holds 0: {d[1] <= 0 <= d[2]}")


def paired(args) -> dict:
    """The paired ΔAUCs of a quality result file whose command stopped early (its runs are saved as they end)."""
    from slimlm.tasks import load_ranking_task

    out = json.loads(Path(args.file).read_text())
    paired_deltas(out, [e.label for e in load_ranking_task("movielens-ranking", None, "val")])
    return out


def carry_loss(module, rows, pad_id: int) -> torch.Tensor:
    """The summed SFT loss of packed rows computed the other way the issue names: per row, the shared prefix
    runs once (with its autograd graph), its KV is carried, expanded, into a batch of the row's candidates
    (right-padded, positions continuing after the prefix), and the loss reads the candidates' hidden states.
    Equal to the packed loss (the same attention: each candidate sees the prefix and itself)."""
    from transformers.cache_utils import DynamicCache

    from slimlm.distill.chunked import fused_linear_kd_loss
    from slimlm.distill.trainer import SFT_LOSS
    from slimlm.runtime.scoring import cache_kwargs, right_pad
    from slimlm.tasks.completion import IGNORE_INDEX

    model = module.student
    base, head = model.get_decoder(), model.get_output_embeddings()
    hs, ys = [], []
    for seq in rows:
        p = seq.segments.index(1)
        cache = DynamicCache()
        base(input_ids=torch.tensor([seq.input_ids[:p]]), use_cache=True, **cache_kwargs(base, cache))
        kv = [(layer.keys, layer.values) for layer in cache.layers]  # still in the graph
        cands = [[i for i, g in enumerate(seq.segments) if g == j] for j in range(1, max(seq.segments) + 1)]
        ids, mask = right_pad([[seq.input_ids[i] for i in c] for c in cands], pad_id)
        labels = torch.full(ids.shape, IGNORE_INDEX, dtype=torch.long)
        for r, c in enumerate(cands):
            labels[r, :len(c)] = torch.tensor([seq.labels[i] for i in c])
        n = len(cands)
        batch_cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv])
        hidden = base(input_ids=ids, attention_mask=torch.cat([torch.ones(n, p, dtype=mask.dtype), mask], 1),
                      position_ids=torch.arange(p, p + ids.shape[1]).expand(n, -1), use_cache=True,
                      **cache_kwargs(base, batch_cache)).last_hidden_state
        hs.append(hidden[:, :-1].reshape(-1, hidden.shape[-1]))
        ys.append(labels[:, 1:].reshape(-1))
    return fused_linear_kd_loss(torch.cat(hs), head.weight, torch.cat(ys), SFT_LOSS, student_bias=head.bias,
                                vocab_size=module.vocab, chunk_size=module.chunk_size, closed_form=module.closed_form)


def carry(args) -> dict:
    """Packed rows (block mask) vs the prefix KV carried into a candidate batch: exactness on the first batch
    (loss and gradients), then seconds per candidate of whole SFT steps, the two ways alternating."""
    from slimlm.distill.data import collate
    from slimlm.distill.losses import LossConfig, check_vocab, normalize
    from slimlm.distill.trainer import DistillModule
    from slimlm.loading import load_model, load_tokenizer

    tok = load_tokenizer("teacher")
    model = load_model("teacher").train()
    vocab = check_vocab(model.get_output_embeddings().weight.shape[0], None, len(tok))
    module = DistillModule(model, None, LossConfig(), vocab, 256)
    params = [p for p in model.parameters() if p.requires_grad]
    pad = tok.pad_token_id
    feed = batches_of(sequences(tok, args.k), args.candidates, 0)

    def packed(rows):
        b = collate(rows, pad)
        return module(b["input_ids"], b["attention_mask"], b["labels"], mode="sft", position_ids=b["position_ids"],
                      segments=b["segments"])

    ways = {"packed": packed, "carry": lambda rows: carry_loss(module, rows, pad)}
    rows, n = next(feed)
    grads, losses = {}, {}
    for name, fn in ways.items():  # exactness: the same loss and gradients (no optimizer step here)
        loss = fn(rows)
        loss.backward()
        losses[name] = float(loss.detach())
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()
                       if k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                                "model.layers.29.mlp.down_proj.weight")}
        model.zero_grad(set_to_none=True)
    rel = {k: float((grads["carry"][k] - grads["packed"][k]).norm() / grads["packed"][k].norm()) for k in grads["packed"]}
    print(f"loss packed {losses['packed']:.6f} carry {losses['carry']:.6f}; gradient relative differences {rel}")
    opt = torch.optim.AdamW(params, lr=1e-6)
    times: dict[str, list[float]] = {name: [] for name in ways}
    batches = [next(feed) for _ in range(args.steps)]
    for r in range(args.rounds + 1):  # round 0: warm-up
        for name, fn in (ways.items() if r % 2 else reversed(ways.items())):
            for rows, n in batches:
                t0 = time.perf_counter()
                normalize(fn(rows), n).backward()  # n: the batch's target tokens (batches_of)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if r:
                    times[name].append((time.perf_counter() - t0) / n)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "k": args.k, "candidates_per_step": args.candidates,
           "loss": losses, "grad_rel_diff": rel, "ways": {}}
    for name in ways:
        per = statistics.median(times[name])
        out["ways"][name] = {"examples_per_s": 1.0 / per, "steps": len(times[name])}
    out["carry_over_packed"] = out["ways"]["carry"]["examples_per_s"] / out["ways"]["packed"]["examples_per_s"]
    print(f"k = {args.k}, {args.candidates} candidates a step: packed {out['ways']['packed']['examples_per_s']:.2f} "
          f"ex/s, carry {out['ways']['carry']['examples_per_s']:.2f} ex/s ({out['carry_over_packed']:.2f}x)")
    return out


def sessions(args) -> dict:
    """How MovieLens-100K users entered their ratings: consecutive ratings (each user's, in the task's order)
    with the same timestamp, the gaps between them, and the groups of ``--k`` consecutive ratings entered in
    one second — what a packed group's later candidates miss from their prefix (the ratings between the
    group's first and them) and the k = 1 rows see."""
    from slimlm.tasks.movielens import load_movielens, user_sequences

    seqs = user_sequences(load_movielens().ratings).values()
    gaps = [b.timestamp - a.timestamp for s in seqs for a, b in zip(s, s[1:], strict=False)]
    groups = [s[i:i + args.k] for s in seqs for i in range(0, len(s) - args.k + 1, args.k)]
    out = {"users": len(seqs), "consecutive_pairs": len(gaps),
           "same_timestamp": round(sum(g == 0 for g in gaps) / len(gaps), 3),
           "gap_under_60s": round(sum(g < 60 for g in gaps) / len(gaps), 3),
           "gap_under_1h": round(sum(g < 3600 for g in gaps) / len(gaps), 3),
           "median_gap_s": statistics.median(gaps), "k": args.k,
           "groups_in_one_second": round(sum(g[0].timestamp == g[-1].timestamp for g in groups) / len(groups), 3),
           "groups_within_60s": round(sum(g[-1].timestamp - g[0].timestamp < 60 for g in groups) / len(groups), 3)}
    print(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--ks", default="1,4,8,16")
    s.add_argument("--candidates", type=int, default=16)
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--rounds", type=int, default=2)
    s.add_argument("--student-layers", type=int, default=10)
    s.add_argument("--out", default="runs/bench/multi_item_speed.json")
    q = sub.add_parser("quality")
    q.add_argument("--examples", type=int, default=1600)
    q.add_argument("--k", type=int, default=8)
    q.add_argument("--runs", default="1,8", help="comma-separated: a k (1, 8); 1u: k = 1 rows in user blocks of "
                   "--k; 8x3: k = 8 for 3 x --examples (equal time rather than equal examples)")
    q.add_argument("--layers", type=int, default=6)
    q.add_argument("--candidates", type=int, default=16)
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--out", default="runs/bench/multi_item_quality.json")
    c = sub.add_parser("carry")
    c.add_argument("--k", type=int, default=8)
    c.add_argument("--candidates", type=int, default=16)
    c.add_argument("--steps", type=int, default=3)
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--out", default="runs/bench/multi_item_carry.json")
    e = sub.add_parser("sessions")
    e.add_argument("--k", type=int, default=8)
    e.add_argument("--out", default="runs/bench/multi_item_sessions.json")
    r = sub.add_parser("paired")
    r.add_argument("file", help="a quality result file (updated in place)")
    args = ap.parse_args()
    if args.what == "paired":
        args.out = args.file
    result = {"speed": speed, "quality": quality, "carry": carry, "paired": paired, "sessions": sessions}[args.what](args)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
