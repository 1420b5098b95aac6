"""The distillation trainer: SFT, KD, on-policy KD and the two-stage recipe in one loop.

Read :func:`train` top to bottom: set-up, resume, then each optimizer step is

    1. the step's mode (two-stage: first stage, then on-policy);
    2. ``grad_accum`` micro-batches in a fixed seeded order (on-policy: a fraction λ of them replaced
       by the student's own samples, scored by the teacher);
    3. the window's target-token count, so the update is a per-token mean over the whole window;
    4. loss (chunked fused-linear: no [tokens x vocab] logits) and backward per micro-batch;
    5. the gradient norm (before clipping) and clipping; the divergence guard (:mod:`slimlm.distill.guard`):
       a non-finite or spiking loss or gradient norm stops the run; else a checkpoint requested after the
       previous step is written now (its weights just passed), then step, schedule;
    6. log (JSONL + TensorBoard), evaluate and request a checkpoint on their periods.

The output directory holds ``model/`` (a standard HF directory), ``metrics.jsonl``, ``metrics.json``
(final evaluation), ``config.yaml`` and, while running, ``checkpoint/`` (exact resume). Start-up finishes
or undoes a save that a killed run left half done (:func:`slimlm.io.recover_dir`), and trims
``metrics.jsonl`` to the step it resumes from, so the log equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from slimlm import SlimlmError
from slimlm.config import DistillConfig, dump_config
from slimlm.distill.checkpoint import (
    is_sharded_checkpoint,
    load_checkpoint,
    load_sharded_checkpoint,
    rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from slimlm.distill.chunked import (
    ClosedForm,
    compile_closed_form,
    fused_linear_cached_kd_loss,
    fused_linear_kd_loss,
)
from slimlm.distill.data import BatchOrder, Seq, build_sequences, collate, take, window_targets
from slimlm.distill.dist import (
    all_sum,
    barrier,
    full_state_dict,
    gather_states,
    gathered,
    init_distributed,
    no_sync,
    shutdown,
    sum_int,
    wrap,
)
from slimlm.distill.guard import History, divergence, nonfinite_count, remember, total_grad_norm
from slimlm.distill.losses import LossConfig, check_vocab, closed_form_value_and_grad, normalize
from slimlm.distill.offload import OffloadAdamW
from slimlm.distill.sharded import materialize, meta_model
from slimlm.distill.teacher import (
    TeacherCache,
    build_teacher_cache,
    load_teacher,
    teacher_precision,
)
from slimlm.io import atomic_write_json, atomic_write_text, read_jsonl, recover_dir, remove_temporaries
from slimlm.loading import check_model_dir, load_model, load_tokenizer, resolve_model
from slimlm.models import save_model
from slimlm.placement import DTYPES, fast_bf16
from slimlm.runtime.packing import attention_inputs
from slimlm.tasks import RANKING_TASKS, load_ranking_task
from slimlm.tasks.completion import IGNORE_INDEX

SFT_LOSS = LossConfig(kd_weight=0.0, ce_weight=1.0)


class TrainingDiverged(SlimlmError):
    pass


def tokens_per_second(tokens: int, seconds: float) -> float:
    """Throughput as every loop and benchmark reports it: input tokens processed per wall second."""
    return tokens / seconds if seconds > 0 else 0.0


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up, then the schedule."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1 - min_ratio) * decay


class DistillModule(torch.nn.Module):
    """Student (+ frozen teacher) with the loss inside ``forward``, so DDP / FSDP2 wrap one module."""

    def __init__(self, student, teacher, loss: LossConfig, vocab: int, chunk_size: int,
                 closed_form: ClosedForm = closed_form_value_and_grad):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.loss, self.vocab, self.chunk_size, self.closed_form = loss, vocab, chunk_size, closed_form

    @torch.no_grad()
    def _teacher_hidden(self, input_ids, attention_mask, position_ids=None, segments=None) -> torch.Tensor:
        """The teacher's final hidden states at every position that predicts a next token, [B·(T−1), H_T]."""
        t = self.teacher.get_decoder()(input_ids=input_ids, use_cache=False, **attention_inputs(
            self.teacher, attention_mask, position_ids, segments)).last_hidden_state
        return t[:, :-1].reshape(-1, t.shape[-1])

    def teacher_rows(self, input_ids, attention_mask, labels, position_ids=None, segments=None) -> torch.Tensor:
        """The teacher's final hidden states at the batch's target rows (labels shifted as in forward)."""
        hidden = self._teacher_hidden(input_ids, attention_mask, position_ids, segments)
        return hidden[labels[:, 1:].reshape(-1) != self.loss.ignore_index]

    def forward(self, input_ids, attention_mask, labels, mode: str = "kd", loss: LossConfig | None = None,
                cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                teacher_rows: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """Summed loss over the batch's target tokens (divide by the window's count outside).

        ``mode`` "sft" is cross-entropy only (no teacher); "kd" uses ``loss`` (default: the stage's)
        against the live teacher, or against ``cached`` (ids, logprobs, tail) rows when given, or against
        ``teacher_rows`` (:meth:`teacher_rows` of this batch, computed earlier) through the teacher's head.
        ``position_ids`` / ``segments``: a packed multi-item batch (:func:`slimlm.distill.data.collate`);
        student and teacher see the same packing."""
        hidden = self.student.get_decoder()(input_ids=input_ids, use_cache=False, **attention_inputs(
            self.student, attention_mask, position_ids, segments)).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1)
        head = self.student.get_output_embeddings()
        if mode == "sft":
            return fused_linear_kd_loss(h, head.weight, y, SFT_LOSS, student_bias=head.bias, vocab_size=self.vocab,
                                        chunk_size=self.chunk_size, closed_form=self.closed_form)
        if cached is not None:
            ids, logprobs, tail = (t.to(h.device) for t in cached)
            return fused_linear_cached_kd_loss(h, head.weight, y, loss or self.loss, teacher_ids=ids,
                                               teacher_logprobs=logprobs, teacher_tail=tail, student_bias=head.bias,
                                               vocab_size=self.vocab, chunk_size=self.chunk_size)
        if teacher_rows is not None:  # only the target rows are read by the loss
            t_flat = teacher_rows.new_zeros(h.shape[0], teacher_rows.shape[-1])
            t_flat[y != self.loss.ignore_index] = teacher_rows
        else:
            t_flat = self._teacher_hidden(input_ids, attention_mask, position_ids, segments)
        t_head = self.teacher.get_output_embeddings()
        return fused_linear_kd_loss(h, head.weight, y, loss or self.loss, student_bias=head.bias,
                                    teacher_hidden=t_flat, teacher_weight=t_head.weight, teacher_bias=t_head.bias,
                                    vocab_size=self.vocab, chunk_size=self.chunk_size, closed_form=self.closed_form)


def step_mode(cfg: DistillConfig, step: int) -> str:
    if cfg.mode != "two_stage":
        return cfg.mode
    first = cfg.first_stage_steps if cfg.first_stage_steps is not None else cfg.max_steps // 2
    return cfg.first_stage if step < first else "on_policy"


def on_policy_batch(student, seqs: list[Seq], cfg: DistillConfig, tokenizer, generator: torch.Generator) -> list[Seq]:
    """Replace each sequence's response by the student's sample; only sampled tokens are targets."""
    from slimlm.runtime.decoding import generate

    prompts = [s.input_ids[: s.prompt_len] for s in seqs]
    was_training = student.training
    student.eval()
    samples = generate(student, prompts, max_new_tokens=cfg.on_policy.max_new_tokens,
                       temperature=cfg.on_policy.temperature, top_p=cfg.on_policy.top_p,
                       eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, generator=generator)
    student.train(was_training)
    return [Seq(tuple(p) + tuple(s), (IGNORE_INDEX,) * len(p) + tuple(s), len(p)) for p, s in zip(prompts, samples, strict=True)]


def generation_eval_set(cfg: DistillConfig, tokenizer) -> tuple[list, str, int] | None:
    """(examples, match rule, max_new_tokens) for the exact-match metric of generative tasks, else None.

    ``arithmetic``: the first ``eval_limit`` examples of ``eval_split``, rule ``number``; ``completion``
    (a file, which has no splits): the same seeded subsample the KL is measured on, rule ``exact``.
    ``max_new_tokens`` leaves room for the longest reference plus a few tokens (and EOS)."""
    import numpy as np

    from slimlm.tasks.completion import index_completion_file, read_completions

    task = cfg.task
    if task.name == "arithmetic":
        from slimlm.tasks.arithmetic import arithmetic_examples

        examples, rule = arithmetic_examples(task.eval_split, task.eval_limit, task.data), "number"
    elif task.name == "completion" and task.data is not None:
        index = index_completion_file(task.data, task.eval_split)  # only the chosen rows are read
        order = np.random.default_rng(cfg.seed).permutation(len(index))[:task.eval_limit]
        examples, rule = read_completions(index, order), "exact"
    else:
        return None
    longest = max(len(tokenizer(ex.response, add_special_tokens=False).input_ids) for ex in examples)
    return examples, rule, max(16, longest + 4)


EVAL_TEACHER_BUDGET = 512 * 2**20  # bytes of teacher hidden states kept for the held-out KL


def eval_teacher_memo(teacher, eval_seqs: Sequence[Seq]) -> list[torch.Tensor] | None:
    """An empty memo for :func:`evaluate_student` when the teacher's hidden states at the held-out targets
    fit :data:`EVAL_TEACHER_BUDGET` (else None: every evaluation runs the teacher)."""
    if teacher is None:
        return None
    n_rows = sum(sum(y != IGNORE_INDEX for y in s.labels[1:]) for s in eval_seqs)
    width = teacher.get_output_embeddings().weight
    return [] if n_rows * width.shape[1] * width.element_size() <= EVAL_TEACHER_BUDGET else None


@torch.no_grad()
def evaluate_student(module: DistillModule, tokenizer, cfg: DistillConfig, eval_seqs: Sequence[Seq],
                     ranking_eval, device, generation_eval: tuple[list, str, int] | None = None,
                     teacher_memo: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Held-out teacher->student forward KL per target token (if a teacher is loaded) and the task metric:
    AUC / log-loss for ranking, ``eval_exact_match`` of greedy answers for generative tasks.

    ``teacher_memo``: a list that keeps the frozen teacher's hidden states at the held-out targets between
    calls (filled by the first; see :func:`eval_teacher_memo`), so later evaluations run the student only;
    the KL is the same number either way."""
    student = module.student
    student.eval()
    out: dict[str, float] = {}
    kl_cfg = LossConfig(divergence="forward_kl")
    if module.teacher is not None and eval_seqs:
        memo = teacher_memo
        total, count = 0.0, 0
        for j, i in enumerate(range(0, len(eval_seqs), cfg.batch_size)):
            b = collate(eval_seqs[i:i + cfg.batch_size], tokenizer.pad_token_id, device)
            rows = None
            if memo is not None:
                if j == len(memo):
                    memo.append(module.teacher_rows(b["input_ids"], b["attention_mask"], b["labels"],
                                                    b.get("position_ids"), b.get("segments")))
                rows = memo[j]
            total += float(module(b["input_ids"], b["attention_mask"], b["labels"], mode="kd", loss=kl_cfg,
                                  teacher_rows=rows, position_ids=b.get("position_ids"), segments=b.get("segments")))
            count += window_targets([b])
        out["eval_kl"] = total / max(count, 1)
    if ranking_eval is not None:
        from slimlm.evaluate import evaluate_ranking

        metrics, _ = evaluate_ranking(student, tokenizer, ranking_eval, batch_size=cfg.batch_size)
        out.update({"eval_auc": metrics["auc"], "eval_log_loss": metrics["log_loss"]})
    if generation_eval is not None:
        from slimlm.evaluate import evaluate_generation

        examples, rule, max_new = generation_eval
        metrics = evaluate_generation(student, tokenizer, examples, max_new_tokens=max_new,
                                      batch_size=max(cfg.batch_size, 16), rule=rule, samples=0)
        out["eval_exact_match"] = metrics["exact_match"]
    student.train()
    return out


# settings that may change between an interrupted run and its resume without changing what it computes
RESUMABLE_CHANGES = ("out", "device", "parallel", "eval_every", "save_every", "log_every", "tensorboard",
                     "gradient_checkpointing", "offload_optimizer", "divergence_factor", "divergence_warmup",
                     "loss.chunk_size", "loss.compile")  # how the loss is computed, not what (equal within fp)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_run(out: Path, cfg: DistillConfig) -> None:
    """Refuse to resume (or to report as done) a run directory made with other settings: the result would
    silently mix the two. Keys the earlier config lacks (a newer slimlm) and :data:`RESUMABLE_CHANGES` pass."""
    import yaml

    f = out / "config.yaml"
    if not f.is_file():
        return
    try:
        before = _flat(yaml.safe_load(f.read_text()) or {})
    except yaml.YAMLError:
        raise SlimlmError(f"{f}: unreadable; delete {out} to start the run afresh") from None
    now = _flat(cfg.model_dump(mode="json"))
    diff = [k for k in now if k in before and now[k] != before[k]
            and k not in RESUMABLE_CHANGES and k.split(".")[0] not in RESUMABLE_CHANGES]
    if diff:
        shown = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in diff[:3]) + (" ..." if len(diff) > 3 else "")
        raise SlimlmError(f"{out} holds a run with other settings ({shown}); use a new out= or delete {out}")


def train(cfg: DistillConfig, progress: Callable[[int, dict], None] | None = None,
          stop_after: int | None = None) -> Path:
    """Run (or resume) one distillation stage; return ``cfg.out``. ``stop_after`` ends the process's
    work after that many optimizer steps as if interrupted (for resume tests), leaving their checkpoint
    (written, as every checkpoint, once the next step's loss and gradient norm passed the guard)."""
    out = Path(cfg.out)
    check_same_run(out, cfg)
    if (out / "model" / "config.json").exists() and (out / "metrics.json").exists():
        return out  # finished earlier: nothing to do
    import os

    from slimlm.placement import choose

    # checked before any work: a device this machine lacks, or more local ranks than GPUs, is a one-line error
    where = choose(cfg.device, world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dist, device = init_distributed(cfg.parallel, str(where.device))
    try:
        return _train(cfg, out, dist, device, progress, stop_after)
    finally:  # a process group left to the interpreter's exit can abort a rank ("terminate called ...")
        shutdown(dist)


def _train(cfg: DistillConfig, out: Path, dist, device, progress, stop_after) -> Path:
    if cfg.offload_optimizer and dist.strategy == "fsdp2":
        raise SlimlmError("offload_optimizer works with a single process or parallel=ddp; under fsdp2 the "
                          "optimizer state is already sharded over the ranks")
    needs_teacher = cfg.teacher is not None and not (
        cfg.teacher_signal == "cached" and (Path(cfg.teacher_cache) / "index.json").exists())
    for role, path in (("student", cfg.student), ("teacher", cfg.teacher if needs_teacher else None)):
        if path is not None:  # before anything is written under out/
            try:
                check_model_dir(path)
            except SlimlmError as e:
                raise SlimlmError(f"{role}: {e}") from None
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        clean_up(out)
        atomic_write_text(out / "config.yaml", dump_config(cfg))
    barrier(dist)  # no rank reads checkpoint/ before it is recovered
    torch.manual_seed(cfg.seed)

    # -- data first (bad data fails before any model is loaded), then models --------------------
    tokenizer = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    train_seqs = build_sequences(cfg.task, tokenizer, cfg.task.split, cfg.task.limit, cfg.seed)
    eval_seqs = build_sequences(cfg.task, tokenizer, cfg.task.eval_split, cfg.task.eval_limit, cfg.seed)
    ranking_eval = (load_ranking_task(cfg.task.name, cfg.task.data, cfg.task.eval_split, cfg.task.eval_limit, cfg.seed)
                    if cfg.task.name in RANKING_TASKS else None)
    generation_eval = generation_eval_set(cfg, tokenizer)

    fsdp2 = dist.strategy == "fsdp2"  # models built as shapes only; each rank reads its own rows once sharded
    # bf16 autocast for the forward passes where bf16 products are fast (slimlm.placement), else None (fp32)
    autocast = torch.bfloat16 if cfg.mixed_precision and fast_bf16(device) else None
    load = meta_model if fsdp2 else load_model
    student = load(cfg.student, device=device, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    student.train()
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    cache = None
    if cfg.teacher_signal == "cached":  # the teacher runs once, into the cache; training never loads it
        if not (Path(cfg.teacher_cache) / "index.json").exists():
            build_teacher_cache(cfg, dist=dist, device=device)  # every rank writes its share
        cache = TeacherCache(cfg.teacher_cache)
        cache.check(train_seqs, cfg.loss.temperature)
    teacher = None
    if cfg.teacher is not None and cache is None:  # sft uses it only for the held-out KL
        teacher = load_teacher(cfg, device, load, autocast)
    vocab = check_vocab(student.get_output_embeddings().weight.shape[0],
                        teacher.get_output_embeddings().weight.shape[0] if teacher is not None else None,
                        len(tokenizer))
    eval_teacher = eval_teacher_memo(teacher, eval_seqs)  # the held-out KL's teacher states, kept between evaluations
    loss_cfg = LossConfig(**cfg.loss.model_dump(exclude={"chunk_size", "compile"}))
    module = DistillModule(student, teacher, loss_cfg, vocab, cfg.loss.chunk_size,
                           compile_closed_form(cfg.loss.compile, cfg.loss.chunk_size, vocab))
    wrapped = wrap(module, dist, device)  # DDP / FSDP2 / itself; the optimizer must see the wrapped params
    if fsdp2:
        materialize(wrapped, device, [(m, resolve_model(p)) for m, p in ((student, cfg.student), (teacher, cfg.teacher))
                                      if m is not None])
        # FSDP2 sets itself up at the root's first forward: run one tiny one
        with torch.no_grad():  # now, before anything calls the student directly (on-policy sampling)
            pad = tokenizer.pad_token_id
            wrapped(torch.tensor([[pad, pad]], device=device), torch.ones(1, 2, dtype=torch.long, device=device),
                    torch.tensor([[IGNORE_INDEX, pad]], device=device), mode="sft")
        wrapped.reshard()  # parameters gathered under no_grad must not be reused by the training forward

    params = [p for p in student.parameters() if p.requires_grad]
    adamw = OffloadAdamW if cfg.offload_optimizer else torch.optim.AdamW
    optimizer = adamw(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                      weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, cfg.max_steps, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio))
    # on-policy: the coin (is this batch sampled?) must agree on every rank; the samples differ per rank
    coins = torch.Generator().manual_seed(cfg.seed + 1)
    sampler = torch.Generator().manual_seed(cfg.seed + 2 + dist.rank)
    generators = {"coins": coins, "sampler": sampler}

    # -- resume ----------------------------------------------------------------------------------
    step, ckpt = 0, out / "checkpoint"
    history: History = {}  # the divergence guard's recent losses and gradient norms
    seconds_before, t_start = 0.0, time.perf_counter()  # wall time of the earlier runs of this stage
    order = BatchOrder(len(train_seqs), cfg.batch_size, cfg.seed, rank=dist.rank, world=dist.world)
    if (ckpt / "state.json").exists():
        if fsdp2 != is_sharded_checkpoint(ckpt):
            raise SlimlmError(f"{ckpt}: written by a run with{'out' if fsdp2 else ''} parallel=fsdp2; resume it "
                              "with the same kind of run")
        if fsdp2:  # every rank reads the rows it owns
            state = load_sharded_checkpoint(ckpt, student, optimizer, scheduler, generators, rank=dist.rank)
        else:
            state = load_checkpoint(ckpt, student, optimizer, scheduler, generators, rank=dist.rank)
        if isinstance(optimizer, OffloadAdamW):
            optimizer.resync()  # the masters must start from the restored weights
        step, seconds_before, history = state["step"], state.get("train_seconds", 0.0), state.get("guard", {})
        order = BatchOrder(len(train_seqs), cfg.batch_size, cfg.seed, state["epoch"], state["cursor"],
                           rank=dist.rank, world=dist.world)
    if dist.main:  # rows past the step we resume from (all of them without a checkpoint) will come again
        _truncate_log(out / "metrics.jsonl", step)
    barrier(dist)
    log = open(out / "metrics.jsonl", "a") if dist.main else None
    writer = _tensorboard(out / "tb") if cfg.tensorboard and dist.main else None

    def snapshot() -> dict:
        """What a checkpoint after this step holds besides weights, optimizer and scheduler (which stay
        as they are until the next step's update, when :func:`checkpoint` writes them)."""
        return {"state": {"step": step, **order.state(), "train_seconds": seconds_before + time.perf_counter()
                          - t_start, "guard": {k: list(v) for k, v in history.items()}},
                "rngs": gather_states(rng_state(generators), dist)}  # each rank samples its own on-policy stream

    def checkpoint(snap: dict) -> None:
        if fsdp2:  # every rank writes its own rows
            save_sharded_checkpoint(ckpt, student, optimizer, scheduler, snap["state"], snap["rngs"], rank=dist.rank,
                                    world=dist.world, sync=lambda: barrier(dist))
            return
        if dist.main:
            save_checkpoint(ckpt, student, optimizer, scheduler, snap["state"], generators, rank_rngs=snap["rngs"])
        barrier(dist)

    def diverged(at: int, reason: str) -> TrainingDiverged:
        if log:
            log.close()
        hint = " (a larger divergence_factor, or 0, lets such a step pass)" if "median" in reason else ""
        kept = (f"the last good checkpoint is {ckpt} (step {_ckpt_step(ckpt)})" if (ckpt / "state.json").exists()
                else "no checkpoint was written yet")
        return TrainingDiverged(f"step {at}: {reason}{hint}; training stopped, {kept}")

    # -- the loop --------------------------------------------------------------------------------
    # A checkpoint requested after step s is written during step s + 1, once the loss and gradient norm of the
    # weights it holds passed the guard (and before they change): the checkpoint on disk is always good.
    steps_done, pending, stopping = 0, None, False
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        mode = step_mode(cfg, step)
        window = []
        for _ in range(cfg.grad_accum):
            picked = order.next()
            seqs = take(train_seqs, picked)  # a user file's rows are read (and tokenized) now
            micro_mode = mode
            if mode == "on_policy":
                coin = float(torch.rand((), generator=coins))
                if coin < cfg.on_policy.lam:  # one prompt per candidate: packed rows are unpacked to sample
                    with gathered(wrapped, dist, within=student):
                        seqs = on_policy_batch(student, [u for s in seqs for u in s.unpacked()], cfg, tokenizer,
                                               sampler)
                micro_mode = "kd"
            rows = cache.rows(picked) if cache is not None else None
            window.append((collate(seqs, tokenizer.pad_token_id, device), micro_mode, rows))
        n_targets = sum_int(window_targets([b for b, _, _ in window]), dist)  # over the window, all ranks
        loss_total, tokens = 0.0, 0
        for i, (batch, micro_mode, rows) in enumerate(window):
            amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast is not None)
            with no_sync(wrapped, dist, last=i == len(window) - 1), amp:
                loss_sum = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"], mode=micro_mode,
                                   cached=rows, position_ids=batch.get("position_ids"), segments=batch.get("segments"))
                # both engines average gradients over ranks: scale back to a sum over the global window
                (normalize(loss_sum, n_targets) * dist.world).backward()
            loss_total += loss_sum.detach().item()
            tokens += int(batch["attention_mask"].sum())
        loss = all_sum([loss_total], dist)[0] / max(n_targets, 1)
        grad_norm = total_grad_norm(params, cfg.optim.max_grad_norm)  # the same on every rank, as the loss
        factor, warmup = cfg.divergence_factor, cfg.divergence_warmup
        reason = (divergence(history, f"{mode}.loss", loss, factor, warmup)
                  or divergence(history, f"{mode}.grad_norm", grad_norm, factor, warmup))
        if reason is None and pending is not None and sum_int(nonfinite_count(params), dist):
            reason = "weights are not finite"
        if reason is not None:
            raise diverged(step + 1, reason)
        if pending is not None:
            t_save = time.perf_counter()
            checkpoint(pending)
            pending, t0 = None, t0 + time.perf_counter() - t_save  # the step's speed leaves the save out
            if stopping:
                if log:
                    log.close()
                return out
        remember(history, f"{mode}.loss", loss)
        remember(history, f"{mode}.grad_norm", grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        steps_done += 1
        seconds = time.perf_counter() - t0
        tokens = sum_int(tokens, dist)
        row = {"step": step, "mode": mode, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "targets": n_targets, "tokens": tokens, "tokens_per_s": tokens_per_second(tokens, seconds)}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            with gathered(wrapped, dist, within=student):  # the teacher's layers gather one at a time
                row.update(evaluate_student(module, tokenizer, cfg, eval_seqs, ranking_eval, device,
                                            generation_eval, eval_teacher))
        evaluated = any(k in row for k in ("eval_kl", "eval_auc", "eval_exact_match"))
        if log and (step % cfg.log_every == 0 or evaluated):
            _log(log, writer, row)
        if progress and dist.main:
            progress(step, row)
        stopping = stop_after is not None and steps_done >= stop_after and step < cfg.max_steps
        if stopping or (cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps):
            pending = snapshot()

    # -- finish ----------------------------------------------------------------------------------
    with gathered(wrapped, dist, within=student):
        final = {"step": step, **evaluate_student(module, tokenizer, cfg, eval_seqs, ranking_eval, device,
                                                  generation_eval, eval_teacher)}
    bad = sum_int(nonfinite_count(params), dist)  # no step checked the last update's result: check it here
    if bad or not math.isfinite(final.get("eval_kl", 0.0)):
        raise diverged(step, "the final weights are not finite" if bad else f"the final held-out KL is {final['eval_kl']}")
    state_dict = full_state_dict(student, dist)  # every rank takes part in the gather
    if dist.main:
        _log(log, writer, final)
        log.close()
        if writer is not None:
            writer.close()
        save_model(student, tokenizer, out / "model", state_dict=state_dict)
        # wall time over every run of the stage, resumes included (up to the last checkpoint of each)
        final["train_seconds"] = round(seconds_before + time.perf_counter() - t_start, 1)
        rates = [r["tokens_per_s"] for r in read_jsonl(out / "metrics.jsonl") if "tokens_per_s" in r]
        if rates:  # over every logged step of every run of the stage
            final["median_tokens_per_s"] = statistics.median(rates)
        final["autocast"] = str(autocast).removeprefix("torch.") if autocast else "off"
        if teacher is not None:
            final["teacher_precision"] = teacher_precision(cfg.teacher, teacher)
        atomic_write_json(out / "metrics.json", final)
    barrier(dist)
    return out


def clean_up(out: Path) -> list[str]:
    """Finish or undo the saves a killed run left half done in the run directory ``out`` and remove its
    temporaries (slimlm's own names for the run's files only); warn saying what was done, and return it."""
    done = recover_dir(out / "checkpoint") + recover_dir(out / "model")
    for name in ("metrics.jsonl", "metrics.json", "config.yaml"):
        done += remove_temporaries(out / name)
    if done:
        warnings.warn(f"{out}: cleaned up after an interrupted run: " + "; ".join(done), stacklevel=2)
    return done


def _ckpt_step(ckpt: Path) -> int | str:
    try:
        return json.loads((ckpt / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return "?"


def _truncate_log(path: Path, step: int) -> None:
    """Drop log rows past ``step``, the checkpoint's we resume from or 0 (they will be produced again)."""
    if not path.exists():
        return
    rows = []
    for ln in path.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:
            continue  # a line cut off when the process was killed mid-write
        if isinstance(row, dict) and row.get("step", 0) <= step:
            rows.append(ln)
    atomic_write_text(path, "".join(r + "\n" for r in rows))


def _log(log, writer, row: dict) -> None:
    log.write(json.dumps(row) + "\n")
    log.flush()
    if writer is not None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(k, v, row["step"])


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # a dependency, but an environment may lack it: say so rather than log nothing
        import warnings

        warnings.warn("tensorboard is not installed: no TensorBoard logs (metrics.jsonl has the same rows; "
                      "pip install tensorboard, or set tensorboard=false)", stacklevel=2)
        return None
    return SummaryWriter(str(path))
