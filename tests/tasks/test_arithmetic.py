"""The generative task `arithmetic`: splits, examples, exact-match evaluation, trainer metric, pipeline."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from slimlm import SlimlmError
from slimlm.cli import app
from slimlm.config import DistillConfig
from slimlm.distill.data import build_sequences
from slimlm.distill.trainer import generation_eval_set, train
from slimlm.evaluate import (
    answer_matches,
    evaluate_generation,
    first_number,
    paired_mean_delta,
    wilson_interval,
)
from slimlm.loading import load_model, load_tokenizer
from slimlm.pipeline import builtin_recipes, load_recipe, run
from slimlm.report import write_report
from slimlm.runtime import decoding
from slimlm.tasks.arithmetic import (
    SPLITS,
    ArithmeticSpec,
    arithmetic_examples,
    parse_spec,
    split_of,
)
from slimlm.tasks.completion import IGNORE_INDEX, CompletionExample, render, tokenize_completion
from slimlm.tasks.files import holdout_indices
from slimlm.testing import save_tiny_model

pytestmark = pytest.mark.one_thread  # tiny models: see tests/conftest.py

EXPR = re.compile(r"Compute (.+)\. Answer with the number only\.")


def expression(ex: CompletionExample) -> str:
    return EXPR.fullmatch(ex.prompt_messages[-1]["content"]).group(1)


def chain_value(expr: str) -> int:
    """Independent oracle: left-to-right + and - over the space-separated terms."""
    tokens = expr.split(" ")
    total = int(tokens[0])
    for op, term in zip(tokens[1::2], tokens[2::2], strict=True):
        total = total + int(term) if op == "+" else total - int(term)
    return total


# --------------------------------------------------------------------------- the task


def test_splits_are_deterministic_disjoint_and_prefix_stable():
    sizes = {"train": 400, "val": 120, "test": 120}
    got = {s: arithmetic_examples(s, n) for s, n in sizes.items()}
    assert {s: len(v) for s, v in got.items()} == sizes
    questions = {s: [expression(e) for e in v] for s, v in got.items()}
    for s, qs in questions.items():
        assert len(set(qs)) == len(qs), f"{s} repeats a question"
        assert all(split_of(q) == s for q in qs)
    assert not set(questions["train"]) & set(questions["val"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["val"]) & set(questions["test"])
    # the same call gives the same examples, and a smaller limit is a prefix (limits never reshuffle)
    assert arithmetic_examples("test", 120) == got["test"]
    assert arithmetic_examples("test", 30) == got["test"][:30]
    # default difficulty: 2-4 terms of 1-2 digits, every term with the same digit count
    for q in questions["train"]:
        terms = q.split(" ")[::2]
        assert 2 <= len(terms) <= 4 and len({len(t) for t in terms}) == 1 and 1 <= len(terms[0]) <= 2


def test_a_small_question_space_is_partitioned_exhaustively():
    # 2 one-digit terms: 10 x 10 x 2 = 200 questions in all; the three splits take all of theirs, no overlap
    spec = "terms=2,digits=1"
    per_split = {}
    for s in SPLITS:
        n = 1
        while True:  # grow until the split runs out (the error says so)
            try:
                per_split[s] = {expression(e) for e in arithmetic_examples(s, n, spec)}
                n += 20
            except SlimlmError as e:
                assert "fewer than" in str(e) and "terms=2-2,digits=1-1" in str(e)
                break
    union = set().union(*per_split.values())
    assert sum(len(v) for v in per_split.values()) == len(union)  # disjoint
    assert len(union) > 150  # most of the 200 questions are reached
    assert len(per_split["train"]) > 3 * len(per_split["test"])


def test_examples_are_chats_with_the_right_answer(tiny_tok):
    exs = arithmetic_examples("val", 50)
    for ex in exs:
        assert [m["role"] for m in ex.messages] == ["user", "assistant"]
        assert ex.prompt_messages[-1]["content"].endswith("Answer with the number only.")
        assert int(ex.response) == chain_value(expression(ex))
    assert any(int(ex.response) < 0 for ex in exs)  # subtraction can go below zero
    enc = tokenize_completion(exs[0], tiny_tok)
    targets = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tiny_tok.decode(targets, skip_special_tokens=True).strip() == exs[0].response  # loss on the answer only


@pytest.mark.parametrize("spec, expect", [
    (None, ArithmeticSpec(2, 4, 1, 2)),
    ("terms=3,digits=1-3", ArithmeticSpec(3, 3, 1, 3)),
    (" digits = 2 ", ArithmeticSpec(2, 4, 2, 2)),
])
def test_spec_parsing(spec, expect):
    assert parse_spec(spec) == expect


@pytest.mark.parametrize("call, message", [
    (lambda: parse_spec("terms=4-2"), "terms must satisfy"),
    (lambda: parse_spec("terms=1"), "terms must satisfy"),
    (lambda: parse_spec("digits=0"), "digits must satisfy"),
    (lambda: parse_spec("ops=3"), "expected a spec like"),
    (lambda: arithmetic_examples("dev", 3), "unknown split 'dev'"),
    (lambda: arithmetic_examples("train", 0), "limit must be >= 1"),
])
def test_bad_input_is_one_clear_error(call, message):
    with pytest.raises(SlimlmError, match=message):
        call()


def test_training_sequences_target_the_answer(tiny_tok):
    task = DistillConfig.model_validate({"student": "-", "out": "-", "mode": "sft",
                                         "task": {"name": "arithmetic", "limit": 8}}).task
    seqs = build_sequences(task, tiny_tok, "train", 8)
    exs = arithmetic_examples("train", 8)
    assert len(seqs) == 8
    for s, ex in zip(seqs, exs, strict=True):
        prompt, _ = render(ex, tiny_tok)
        assert list(s.input_ids[:s.prompt_len]) == tiny_tok(prompt, add_special_tokens=False).input_ids
        assert tiny_tok.decode([t for t in s.labels if t != IGNORE_INDEX], skip_special_tokens=True).strip() == ex.response


# --------------------------------------------------------------------------- exact match


@pytest.mark.parametrize("output, reference, rule, ok", [
    ("42", "42", "exact", True),
    ("  42 \n", "42", "exact", True),
    ("a  b\tc", "a b c", "exact", True),
    ("42.", "42", "exact", False),
    ("42", "42", "number", True),
    ("The answer is -7.", "-7", "number", True),
    ("+7.0", "7", "number", True),
    ("07", "7", "number", True),
    ("12 or 13", "13", "number", False),  # only the first number counts
    ("2 + 5 = 7", "7", "number", False),
    ("no idea", "7", "number", False),
    ("-8", "8", "number", False),
])
def test_answer_matching_rules(output, reference, rule, ok):
    assert answer_matches(output, reference, rule) is ok


def test_answer_matching_errors_and_helpers():
    assert first_number("x = -12.50 or 3") == first_number("-12.5")
    with pytest.raises(SlimlmError, match="holds no number"):
        answer_matches("1", "none", "number")
    with pytest.raises(SlimlmError, match="unknown match rule"):
        answer_matches("1", "1", "fuzzy")


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (37, 50), (50, 50)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)


def test_evaluate_generation_equals_direct_greedy_decode(tiny_model_dirs):
    """Oracle: references made from the model's own greedy output (one direct `decoding.generate` call on
    the whole batch) must all match; references changed for every other example must all miss."""
    path = tiny_model_dirs["llama"]
    model, tok = load_model(path), load_tokenizer(path)
    exs = arithmetic_examples("test", 10)
    prompts = [tok(render(ex, tok)[0], add_special_tokens=False).input_ids for ex in exs]
    direct = decoding.generate(model, prompts, max_new_tokens=6, temperature=0.0, eos_id=tok.eos_token_id,
                               pad_id=tok.pad_token_id)
    texts = [tok.decode(t, skip_special_tokens=True) for t in direct]
    own = [CompletionExample((ex.messages[0], {"role": "assistant", "content": t})) for ex, t in zip(exs, texts, strict=True)]
    seen = []
    res = evaluate_generation(model, tok, own, max_new_tokens=6, batch_size=3, samples=4, progress=seen.append)
    assert res["exact_match"] == 1.0 and res["n"] == res["correct"] == 10 and sum(seen) == 10
    assert [s["output"] for s in res["samples"]] == texts[:4]
    assert res["truncated"] == sum(tok.eos_token_id not in t for t in direct)
    wrong = [CompletionExample((ex.messages[0], {"role": "assistant", "content": ex.response + " #" if i % 2 else ex.response}))
             for i, ex in enumerate(own)]
    res = evaluate_generation(model, tok, wrong, max_new_tokens=6, batch_size=4, per_example=True)
    assert res["correct"] == 5 and res["exact_match"] == 0.5
    assert res["hits"] == [1, 0] * 5  # in the examples' order: every other reference was changed
    lo, hi = res["exact_match_ci95"]
    assert lo < 0.5 < hi


def test_evaluate_generation_rejects_bad_input(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    model, tok = load_model(path), load_tokenizer(path)
    with pytest.raises(SlimlmError, match="at least one example"):
        evaluate_generation(model, tok, [])
    with pytest.raises(SlimlmError, match="unknown match rule"):
        evaluate_generation(model, tok, arithmetic_examples("val", 2), rule="close")


# --------------------------------------------------------------------------- trainer, CLI, pipeline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    save_tiny_model("llama", root / "teacher", seed=1, num_hidden_layers=3)
    save_tiny_model("llama", root / "student", seed=2, num_hidden_layers=1)
    return root


def test_trainer_reports_exact_match_of_the_saved_model(models, tmp_path):
    cfg = DistillConfig.model_validate({
        "mode": "two_stage", "student": str(models / "student"), "teacher": str(models / "teacher"),
        "out": str(tmp_path / "run"), "task": {"name": "arithmetic", "limit": 24, "eval_limit": 6},
        "batch_size": 4, "max_steps": 2, "eval_every": 1, "save_every": 0, "tensorboard": False,
        "log_every": 10, "on_policy": {"max_new_tokens": 3}, "optim": {"lr": 1e-3}})
    out = train(cfg)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("mode") for r in rows] == ["kd", None]  # step 1 logged for its eval despite log_every
    assert "eval_exact_match" in rows[0] and "eval_kl" in rows[0]
    final = json.loads((out / "metrics.json").read_text())
    # the trainer's number is exactly what an independent evaluation of the saved student gives
    examples, rule, max_new = generation_eval_set(cfg, load_tokenizer(out / "model"))
    assert rule == "number" and len(examples) == 6 and max_new == 16
    again = evaluate_generation(load_model(out / "model"), load_tokenizer(out / "model"), examples,
                                max_new_tokens=max_new, rule=rule)
    assert final["eval_exact_match"] == again["exact_match"]


def test_completion_file_gets_exact_match_too(models, tmp_path):
    data = tmp_path / "c.jsonl"
    words = [f"w{i}" for i in range(40)]
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in words))
    cfg = DistillConfig.model_validate({
        "mode": "sft", "student": str(models / "student"), "out": str(tmp_path / "run"),
        "task": {"name": "completion", "data": str(data), "eval_limit": 2}, "batch_size": 2, "max_steps": 1,
        "eval_every": 0, "save_every": 0, "tensorboard": False})
    examples, rule, _ = generation_eval_set(cfg, load_tokenizer(models / "student"))
    assert rule == "exact" and len(examples) == 2
    # evaluated on the held-out val rows, never on rows it trains on
    assert {ex.response for ex in examples} == {words[i] for i in holdout_indices(40, "val")}
    final = json.loads((train(cfg) / "metrics.json").read_text())
    assert final["eval_exact_match"] in (0.0, 0.5, 1.0) and "eval_kl" not in final  # sft: no teacher


def test_cli_eval_arithmetic(models, tmp_path):
    out = tmp_path / "e.json"
    res = CliRunner().invoke(app, ["eval", str(models / "student"), "--task", "arithmetic", "--split", "val",
                                   "--limit", "5", "--data", "terms=2,digits=1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())["metrics"]
    assert m["n"] == 5 and m["rule"] == "number" and 0.0 <= m["exact_match"] <= 1.0
    res = CliRunner().invoke(app, ["eval", str(models / "student"), "--task", "arithmetic", "--data", "terms=x"])
    assert res.exit_code == 2 and "expected a spec like" in res.output


def test_tiny_generative_pipeline_end_to_end(models, tmp_path):
    train_cfg = {"max_steps": 2, "batch_size": 3, "eval_every": 0, "save_every": 1, "tensorboard": False,
                 "optim": {"lr": 1e-3}, "on_policy": {"max_new_tokens": 3}}
    tree = {"out": str(tmp_path / "run"), "teacher": str(models / "teacher"),
            "task": {"name": "arithmetic", "limit": 12, "eval_limit": 3},
            "stages": [
                {"name": "teacher-sft", "kind": "distill", "config": {**train_cfg, "mode": "sft"}},
                {"name": "student", "kind": "init", "config": {"layers": 1}},
                {"name": "kd", "kind": "distill", "teacher": "teacher-sft", "config": {**train_cfg, "mode": "kd"}},
                {"name": "two-stage", "kind": "distill", "from": "student", "teacher": "teacher-sft",
                 "config": {**train_cfg, "mode": "two_stage", "first_stage_steps": 1}},
                {"name": "eval", "kind": "evaluate", "models": ["teacher-sft", "kd", "two-stage"],
                 "config": {"split": "test", "limit": 4, "speed": False}},
            ]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tree))
    records = run(load_recipe(tmp_path / "r.yaml"))
    modes = [json.loads(ln).get("mode") for ln in (tmp_path / "run" / "two-stage" / "metrics.jsonl").read_text().splitlines()]
    assert modes[:2] == ["kd", "on_policy"]
    evals = records["eval"]["metrics"]
    assert set(evals) == {"teacher-sft", "kd", "two-stage"}
    for r in evals.values():
        assert r["metrics"]["n"] == 4 and 0.0 <= r["metrics"]["exact_match"] <= 1.0
    assert evals["kd"]["params"]["non_embedding"] < evals["teacher-sft"]["params"]["non_embedding"]
    # per-question hits beside the results; the report pairs two-stage with the reference (here kd) on them
    scores = json.loads((tmp_path / "run" / "eval" / "scores.json").read_text())
    for name, r in evals.items():
        assert "scores" not in r and len(scores[name]["correct"]) == 4
        assert sum(scores[name]["correct"]) == r["metrics"]["correct"]
    md = write_report(tmp_path / "run", reference="kd").read_text()
    d = paired_mean_delta(scores["two-stage"]["correct"], scores["kd"]["correct"])
    row = next(ln for ln in md.splitlines() if ln.startswith("| two-stage |"))
    assert "Δ exact match vs reference, paired (95% CI)" in md and f"| {d[0]:+.4f} ({d[1]:+.3f}–{d[2]:+.3f}) |" in row
    # tiny models answer nothing right, so give them known hits: model − reference, not the other way
    scores["kd"]["correct"], scores["two-stage"]["correct"] = [0, 0, 1, 0], [1, 1, 1, 0]
    (tmp_path / "run" / "eval" / "scores.json").write_text(json.dumps(scores))
    md = write_report(tmp_path / "run", reference="kd").read_text()
    assert "| +0.5000 (+" in next(ln for ln in md.splitlines() if ln.startswith("| two-stage |"))


def test_builtin_arithmetic_recipe_validates():
    path = builtin_recipes()["arithmetic-two-stage"]
    recipe = load_recipe(path, ["out=/tmp/never-written"])
    assert recipe.task.name == "arithmetic" and recipe.teacher == "teacher"
    stages = {s.name: s for s in recipe.stages}
    kd, two = stages["kd"], stages["two-stage"]
    assert kd.from_ == two.from_ == "student" and kd.teacher == two.teacher == "teacher-sft"
    assert kd.config["mode"] == "kd" and two.config["mode"] == "two_stage"
    assert kd.config["max_steps"] == two.config["max_steps"]  # equal total budgets
    assert 0 < two.config["first_stage_steps"] < two.config["max_steps"]
    assert set(stages["eval"].models) >= {"teacher", "teacher-sft", "kd", "two-stage"}
