"""The trainer: schedule, batch order, token normalisation, exact resume (after a kill at any instant of a
save too), the log after restarts, the divergence guard, on-policy masking."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import Killed, Killer, hidden, synth_movielens, write_movielens
from safetensors.torch import load_file, save_file

import slimlm.distill.checkpoint
import slimlm.distill.trainer
from slimlm import SlimlmError
from slimlm.config import DistillConfig, load_config
from slimlm.distill.data import BatchOrder, Seq, collate, window_targets
from slimlm.distill.losses import LossConfig, normalize
from slimlm.distill.trainer import (
    DistillModule,
    TrainingDiverged,
    evaluate_student,
    lr_factor,
    on_policy_batch,
    tokens_per_second,
    train,
)
from slimlm.io import read_jsonl
from slimlm.loading import load_model
from slimlm.testing import save_tiny_model, tiny_model

pytestmark = pytest.mark.one_thread  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    users, items, ratings = synth_movielens(n_users=10, per_user=14, seed=4)
    data = write_movielens(root / "ml", users, items, ratings)
    save_tiny_model("llama", root / "teacher", seed=1)
    save_tiny_model("llama", root / "student", seed=2, num_hidden_layers=1)
    return root, data


def config(root, data, out, **kw) -> DistillConfig:
    base = {"student": str(root / "student"), "teacher": str(root / "teacher"), "out": str(out),
            "task": {"data": str(data), "eval_limit": 12}, "batch_size": 3, "grad_accum": 2, "max_steps": 6,
            "eval_every": 0, "save_every": 0, "tensorboard": False, "on_policy": {"max_new_tokens": 3},
            "optim": {"lr": 1e-3, "warmup_steps": 2}}
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return DistillConfig.model_validate(base)


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(10, 10, 0, "cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(7, 10, 0, "constant") == 1.0


def test_tokens_per_second():
    assert tokens_per_second(1000, 0.5) == 2000.0 and tokens_per_second(10, 0.0) == 0.0


def test_batch_order_resumes_and_shards():
    a = BatchOrder(10, 3, seed=5)
    first = [a.next() for _ in range(5)]  # crosses an epoch boundary
    b = BatchOrder(10, 3, seed=5)
    for _ in range(2):
        b.next()
    resumed = BatchOrder(10, 3, seed=5, **b.state())
    assert [resumed.next() for _ in range(3)] == first[2:]
    assert all(len(x) == 3 for x in first)
    # epoch 0 is one permutation: its 10 items fill batches 0-2 and the first slot of batch 3
    assert sorted(first[0] + first[1] + first[2] + first[3][:1]) == list(range(10))
    single = BatchOrder(10, 4, seed=1)
    r0, r1 = BatchOrder(10, 2, seed=1, rank=0, world=2), BatchOrder(10, 2, seed=1, rank=1, world=2)
    for _ in range(4):
        assert single.next() == r0.next() + r1.next()


def _grads(module, batches, n_targets):
    module.student.zero_grad()
    for b in batches:
        normalize(module(b["input_ids"], b["attention_mask"], b["labels"]), n_targets).backward()
    return [p.grad.clone() for p in module.student.parameters()]


def test_grad_accumulation_invariance():
    student, teacher = tiny_model("qwen2", seed=3), tiny_model("qwen2", seed=4)
    module = DistillModule(student, teacher, LossConfig(divergence="jsd", ce_weight=0.5), 384, chunk_size=5)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(8):  # uneven lengths and uneven numbers of targets
        n = 5 + 3 * i % 11
        ids = torch.randint(3, 384, (n,), generator=g).tolist()
        p = 1 + i % 4
        seqs.append(Seq(tuple(ids), (-100,) * p + tuple(ids[p:]), p))
    whole = [collate(seqs, 0)]
    micro = [collate(seqs[i:i + 2], 0) for i in range(0, 8, 2)]
    assert window_targets(whole) == window_targets(micro) == sum(len(s.input_ids) - s.prompt_len for s in seqs)
    ga = _grads(module, whole, window_targets(whole))
    gb = _grads(module, micro, window_targets(micro))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_train_with_grad_accum_equals_one_big_batch(setup, tmp_path):
    """Through train() itself: 2 micro-batches of 3 per step give the same updates and logged loss as one
    batch of 6 (the same examples in the same order; the loss is normalised over the window's targets)."""
    root, data = setup
    runs = {}
    for name, bs, ga in (("accum", 3, 2), ("whole", 6, 1)):
        out = train(config(root, data, tmp_path / name, batch_size=bs, grad_accum=ga, max_steps=3,
                           mixed_precision=False))  # an fp32 equality: no bf16 autocast on CPUs that have it
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (load_file(str(out / "model" / "model.safetensors")),
                      [(r["loss"], r["targets"]) for r in rows if "loss" in r])
    (wa, la), (wb, lb) = runs["accum"], runs["whole"]
    assert [t for _, t in la] == [t for _, t in lb]
    assert [x for x, _ in la] == pytest.approx([x for x, _ in lb], rel=1e-4)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    start = load_file(str(root / "student" / "model.safetensors"))
    assert any(not torch.allclose(wa[k], start[k]) for k in wa)  # the comparison is of trained weights


def test_held_out_kl_reuses_the_frozen_teachers_states(setup, tiny_tok):
    """The periodic evaluation keeps the teacher's held-out hidden states: later calls run only the
    student, and the KL equals the live computation."""
    root, data = setup
    cfg = config(root, data, root / "unused", batch_size=3)
    module = DistillModule(tiny_model("llama", seed=2, vocab_size=len(tiny_tok)),
                           tiny_model("llama", seed=1, vocab_size=len(tiny_tok)), LossConfig(), len(tiny_tok), 5)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(7):
        ids = torch.randint(3, len(tiny_tok), (6 + i,), generator=g).tolist()
        seqs.append(Seq(tuple(ids), (-100,) * (2 + i % 3) + tuple(ids[2 + i % 3:]), 2 + i % 3))
    calls = []
    module.teacher.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    live = evaluate_student(module, tiny_tok, cfg, seqs, None, "cpu")["eval_kl"]
    assert len(calls) == 3  # 7 sequences in batches of 3
    memo: list = []
    first = evaluate_student(module, tiny_tok, cfg, seqs, None, "cpu", teacher_memo=memo)["eval_kl"]
    second = evaluate_student(module, tiny_tok, cfg, seqs, None, "cpu", teacher_memo=memo)["eval_kl"]
    assert len(calls) == 6 and len(memo) == 3  # the second memo call ran no teacher pass
    assert first == second == pytest.approx(live, rel=1e-6) and live > 0
    assert sum(len(m) for m in memo) == sum(len(s.input_ids) - s.prompt_len for s in seqs)


def test_sft_loss_is_response_cross_entropy():
    student = tiny_model("llama", seed=5)
    module = DistillModule(student, None, LossConfig(), 384, chunk_size=4)
    seqs = [Seq((5, 6, 7, 8, 9), (-100, -100, 7, 8, 9), 2), Seq((10, 11, 12), (-100, 11, 12), 1)]
    b = collate(seqs, 0)
    got = module(b["input_ids"], b["attention_mask"], b["labels"], mode="sft")
    with torch.no_grad():
        ref = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert got.item() == pytest.approx(ref.item() * window_targets([b]), rel=1e-5)


def test_on_policy_batch_masks_prompts(setup, tiny_tok):
    root, data = setup
    cfg = config(root, data, root / "unused", mode="on_policy")
    student = tiny_model("llama", seed=2, vocab_size=len(tiny_tok))
    seqs = [Seq((5, 6, 7, 8), (-100, -100, -100, 8), 3), Seq((9, 10), (-100, 10), 1)]
    out = on_policy_batch(student, seqs, cfg, tiny_tok, torch.Generator().manual_seed(0))
    for s, o in zip(seqs, out, strict=True):
        assert o.input_ids[: s.prompt_len] == s.input_ids[: s.prompt_len] and o.prompt_len == s.prompt_len
        assert o.labels[: s.prompt_len] == (-100,) * s.prompt_len
        sampled = o.input_ids[s.prompt_len:]
        assert 1 <= len(sampled) <= 3 and o.labels[s.prompt_len:] == sampled
    student.train()
    on_policy_batch(student, seqs, cfg, tiny_tok, torch.Generator().manual_seed(0))
    assert student.training


@pytest.mark.parametrize("mode, k", [("kd", 1), ("two_stage", 1), ("two_stage", 4)])
def test_resume_is_exact(setup, tmp_path, mode, k):
    """Also with multi-item groups (k = 4: packed rows, and unpacked for on-policy sampling)."""
    root, data = setup
    task = {"candidates_per_prefix": k}
    full = train(config(root, data, tmp_path / "full", mode=mode, task=task))
    cfg = config(root, data, tmp_path / "split", mode=mode, task=task)
    train(cfg, stop_after=3)
    first_run = json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())
    assert first_run["step"] == 3 and first_run["train_seconds"] > 0
    assert not (tmp_path / "split" / "model").exists()
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # a log line torn by the kill
        f.write('{"step": 4, "loss": 0.')
    train(cfg)
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))  # no duplicated steps after resume
    # the stage's wall time counts both runs
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["train_seconds"] >= first_run["train_seconds"]
    # re-running a finished stage does nothing
    before = (tmp_path / "split" / "metrics.jsonl").read_text()
    train(cfg)
    assert (tmp_path / "split" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_resume_is_exact_on_a_streamed_user_file(setup, tmp_path, fmt):
    """A completion file's rows are read when drawn (slimlm.distill.data.FileSequences): the batch order,
    and so a resume mid-epoch (36 training rows, 6 a step: the second epoch starts at step 7), are those of
    a list."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _ = setup
    rows = [{"prompt": f"What is {i} + {i % 7}?", "response": str(i + i % 7)} for i in range(40)]
    path = tmp_path / f"c.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": "completion", "data": str(path), "eval_limit": 3}
    full = train(config(root, path, tmp_path / "full", mode="kd", max_steps=9, task=task))
    cfg = config(root, path, tmp_path / "split", mode="kd", max_steps=9, task=task)
    train(cfg, stop_after=4)
    assert json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())["step"] == 4
    train(cfg)
    a = load_file(str(full / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            for d in (full, tmp_path / "split")]
    assert logs[0] == logs[1] and len(logs[0]) == 9


def test_nan_loss_stops_and_keeps_checkpoint(setup, tmp_path):
    root, data = setup
    bad_teacher = tmp_path / "bad-teacher"
    save_tiny_model("llama", bad_teacher, seed=1)
    cfg = config(root, data, tmp_path / "run", teacher=str(bad_teacher))
    train(cfg, stop_after=2)
    weights = load_file(str(bad_teacher / "model.safetensors"))
    weights = {k: torch.full_like(v, math.nan) if "norm" in k else v for k, v in weights.items()}
    save_file(weights, str(bad_teacher / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TrainingDiverged, match=r"step 3: loss is nan.*last good checkpoint .*\(step 2\)"):
        train(cfg)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "run" / "model").exists()


def test_config_errors(tmp_path):
    with pytest.raises(SlimlmError, match="needs a teacher"):
        load_config(DistillConfig, None, ["mode=kd", "student=s", "out=o"])
    with pytest.raises(SlimlmError, match="loss.temprature: unknown key"):
        load_config(DistillConfig, None, ["mode=sft", "student=s", "out=o", "loss.temprature=2"])
    f = tmp_path / "r.yaml"
    f.write_text("mode: kd\nstudent: s\n  bad: indent\n")
    with pytest.raises(SlimlmError, match=r"r\.yaml:3: invalid YAML"):
        load_config(DistillConfig, f)
    cfg = load_config(DistillConfig, None, ["mode=sft", "student=s", "out=o", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)


def test_a_run_directory_refuses_other_settings(setup, tmp_path):
    """Resuming (or re-running a finished run) with settings that change the result is an error naming the
    key; operational settings (evaluation cadence, device, ...) may change on resume."""
    root, data = setup
    cfg = config(root, data, tmp_path / "run", max_steps=2)
    train(cfg, stop_after=1)
    with pytest.raises(SlimlmError, match=r"other settings \(optim\.lr: 0\.001 -> 0\.002\)"):
        train(config(root, data, tmp_path / "run", max_steps=2, optim={"lr": 2e-3}))
    with pytest.raises(SlimlmError, match=r"other settings \(loss\.temperature: 1\.0 -> 2\.0\)"):  # a dotted key
        train(config(root, data, tmp_path / "run", max_steps=2, loss={"temperature": 2.0}))
    # how the loss is computed (chunk size: the default changed from 64 to 256; compiling) may change
    train(config(root, data, tmp_path / "run", max_steps=2, eval_every=1, save_every=1,
                 loss={"chunk_size": 64, "compile": False}))  # resumes, finishes
    assert (tmp_path / "run" / "model" / "config.json").exists()
    with pytest.raises(SlimlmError, match=r"max_steps: 2 -> 3"):  # finished: not silently "done" either
        train(config(root, data, tmp_path / "run", max_steps=3))


def test_bad_model_paths_fail_before_anything_is_written(setup, tmp_path):
    root, data = setup
    for key, message in (("student", r"student: .*nope: not a directory"), ("teacher", r"teacher: .*no config\.json")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        bad = str(tmp_path / "nope") if key == "student" else str(tmp_path / "empty")
        with pytest.raises(SlimlmError, match=message):
            train(config(root, data, tmp_path / f"out-{key}", **{key: bad}))
        assert not (tmp_path / f"out-{key}").exists()


def test_offloaded_optimizer_is_bit_identical_on_cpu(setup, tmp_path):
    """Optimizer-state offload keeps fp32 masters + AdamW moments in host memory: on a CPU run the copies
    are same-device, so training must match plain AdamW exactly, including across a resume."""
    root, data = setup
    plain = train(config(root, data, tmp_path / "plain", max_steps=4))
    cfg = config(root, data, tmp_path / "offload", max_steps=4, offload_optimizer=True)
    train(cfg, stop_after=2)
    train(cfg)
    a = load_file(str(plain / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "offload" / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _rows(out) -> list[dict]:
    """metrics.jsonl without its timing field."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_jsonl(out / "metrics.jsonl")]


def _restart(cfg) -> tuple[int, str]:
    """Run ``cfg`` to the end; return the first step it ran and what its start-up said it cleaned up."""
    steps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, progress=lambda step, row: steps.append(step))
    return steps[0], " ".join(str(w.message) for w in caught if "cleaned up" in str(w.message))


def test_a_save_killed_at_any_instant_resumes_from_the_newest_complete_checkpoint(setup, tmp_path, monkeypatch):
    """A kill before each file-system step of a save (the checkpoint replacing an older one, and the final
    model) and after its last: the restart resumes from the newest complete checkpoint, says what it
    cleaned up, and ends with the uninterrupted run's weights, log and files, nothing else."""
    root, data = setup
    kw = {"max_steps": 5, "save_every": 2}  # checkpoints of steps 2 and 4, the model after step 5
    whole = train(config(root, data, tmp_path / "whole", **kw))
    killer = Killer(monkeypatch, tmp_path)
    killer.watch(slimlm.distill.checkpoint, "save_file", path_arg=1)
    train(config(root, data, tmp_path / "events", **kw))
    names = [(name, path.name if name != "save_file" else path.parent.name[:12]) for name, path in killer.events]
    second = [i for i, (_, n) in enumerate(names) if n.startswith((".checkpoint", "checkpoint"))][5:]  # the step-4 save
    model = [i for i, (_, n) in enumerate(names) if n.startswith((".model", "model"))]
    assert [names[i][0] for i in second] == ["save_file", "save_file", "replace", "replace", "replace", "rmtree"]
    assert [names[i][0] for i in model] == ["replace", "replace", "rmtree"]
    kills = [(i, "before") for i in second + model] + [(second[-1], "after"), (model[-1], "after")]
    a = load_file(str(whole / "model" / "model.safetensors"))
    for at, when in kills:
        cfg = config(root, data, tmp_path / f"{at}-{when}", **kw)
        killer.arm(at, when)
        with pytest.raises(Killed):
            train(cfg)
        killer.arm(None)
        left = hidden(tmp_path / f"{at}-{when}")
        first, said = _restart(cfg)
        # the step-4 checkpoint is complete once its temp directory is renamed to .checkpoint.new
        assert first == (3 if at < second[2] or (at == second[2] and when == "before") else 5), (at, when)
        assert all(name in said for name in left) and bool(said) == bool(left), (at, when, left, said)
        b = load_file(str(cfg.out) + "/model/model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), (at, when)
        assert _rows(tmp_path / f"{at}-{when}") == _rows(whole), (at, when)
        assert sorted(p.name for p in (tmp_path / f"{at}-{when}").iterdir()) == sorted(p.name for p in whole.iterdir())


def test_the_log_after_restarts_equals_the_uninterrupted_runs(setup, tmp_path):
    """Killed before its first checkpoint (the restart starts over: the log too), and after one (the log is
    trimmed to the checkpoint's step), with a torn last line: the rows are the uninterrupted run's."""
    root, data = setup
    whole = train(config(root, data, tmp_path / "whole", save_every=2))

    def kill_at(n):
        def progress(step, row):
            if step == n:
                raise Killed(f"step {n}")
        return progress

    for save_every, killed_at, resumed_from in ((0, 2, 0), (2, 3, 2)):
        cfg = config(root, data, tmp_path / f"run{save_every}", save_every=save_every)
        with pytest.raises(Killed):
            train(cfg, progress=kill_at(killed_at))
        assert [r["step"] for r in _rows(tmp_path / f"run{save_every}")] == list(range(1, killed_at + 1))
        with open(tmp_path / f"run{save_every}" / "metrics.jsonl", "a") as f:
            f.write('{"step": 9, "loss": 0.')
        assert _restart(cfg)[0] == resumed_from + 1
        assert _rows(tmp_path / f"run{save_every}") == _rows(whole)
        assert [r["step"] for r in _rows(whole)] == [1, 2, 3, 4, 5, 6, 6]  # every step, then the final evaluation


def _finite_logits(root, ckpt) -> bool:
    model = load_model(str(root / "student"), device="cpu", dtype=torch.float32)
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    with torch.no_grad():
        return bool(torch.isfinite(model(torch.arange(1, 40)[None]).logits).all())


@pytest.mark.parametrize("jump, reason", [(1e14, "(loss|grad norm) is (nan|inf)|weights are not finite"),
                                          (1e3, "loss .* is over 100x its running median")])
def test_a_diverging_run_names_a_checkpoint_that_gives_finite_logits(setup, tmp_path, monkeypatch, jump, reason):
    """The learning rate jumps after step 3 (×1e14: weights ~1e11, non-finite logits; ×1e3: a finite blow-up
    of the loss). The step-4 checkpoint holds the bad weights, so it is never written: the run stops at step
    5 and names step 3's, whose logits are finite; with the spike check off the finite blow-up runs on."""
    root, data = setup
    monkeypatch.setattr(slimlm.distill.trainer, "lr_factor", lambda step, *args: 1.0 if step < 3 else jump)
    cfg = config(root, data, tmp_path / "run", save_every=1, divergence_warmup=2, max_steps=8)
    with pytest.raises(TrainingDiverged, match=rf"^step 5: ({reason}).*; training stopped, the last good "
                                               rf"checkpoint is .*checkpoint \(step 3\)$"):
        train(cfg)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert _finite_logits(root, tmp_path / "run" / "checkpoint")
    assert not (tmp_path / "run" / "model").exists()
    if jump == 1e3:  # the spike stays finite: only the spike check stops it
        assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["guard"]["kd.loss"] == [
            r["loss"] for r in _rows(tmp_path / "run")[:3]]
        train(config(root, data, tmp_path / "off", save_every=1, divergence_factor=0, max_steps=8))
        assert max(r["loss"] for r in _rows(tmp_path / "off") if "loss" in r) > 100 * _rows(tmp_path / "off")[0]["loss"]
