"""Does an INT8 teacher change what the student learns? KD from a fp32 teacher vs from its INT8 W8A8 export.

    python benchmarks/int8_teacher.py --teacher DIR [--student DIR | --layers 8] [--steps 200] [--limit 4000]
                                      [--eval-limit 512] [--test-limit 1000] [--seed 0] [--out runs/bench/int8_teacher]

1. the teacher's INT8 W8A8 export, SmoothQuant calibrated on MovieLens train prompts (``slimlm quantize``);
2. unless ``--student`` is given, a student from the teacher's evenly spaced layers (``slimlm init-student``);
3. KD (forward KL) twice from that same student, the same examples in the same order, the same steps: once
   with the fp32 teacher, once with the INT8 export as the teacher (``teacher=DIR``: the quantized runtime);
4. each student: the held-out forward KL to the **fp32** teacher per answer token on ``--eval-limit``
   validation sequences (the quantity KD minimises, against the teacher a user actually has), test AUC on
   ``--test-limit`` rows, and ΔAUC (INT8-taught − fp32-taught) by paired bootstrap on the same rows; each
   KD run's median training tokens/s (from its metrics.jsonl).

``--seed``: the training seed of both KD runs (the examples drawn and their order); the evaluation rows stay
those of seed 0, so runs with different seeds are replicates measured on the same rows.

``--teacher`` should be a teacher fine-tuned on the task (a zero-shot model ranks at chance, so AUC would
say nothing). Every training stage is the user-facing CLI in a subprocess; a re-run skips finished stages.
Training seconds are comparable only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import run_logged, write_json  # benchmarks/ is on sys.path when run as a script


def median_tokens_per_s(run: Path) -> float | None:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return statistics.median(speeds) if speeds else None


def measure(teacher: str, students: dict[str, str], eval_limit: int, test_limit: int, seed: int = 0) -> dict:
    """Held-out KL to the fp32 ``teacher`` and test AUC of each student; paired ΔAUC of the second vs the first."""
    import torch

    from slimlm.config import DistillConfig, TaskConfig
    from slimlm.distill.data import build_sequences
    from slimlm.distill.losses import LossConfig, check_vocab
    from slimlm.distill.trainer import DistillModule, eval_teacher_memo, evaluate_student
    from slimlm.evaluate import bootstrap_auc, evaluate_ranking, paired_auc_delta
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.tasks import load_ranking_task

    tok = load_tokenizer(teacher)
    task = TaskConfig(name="movielens-ranking", eval_limit=eval_limit)
    eval_seqs = build_sequences(task, tok, "val", eval_limit, seed)
    test = load_ranking_task("movielens-ranking", None, "test", test_limit, seed)
    labels = [e.label for e in test]
    fp32 = load_model(teacher).eval()
    memo = eval_teacher_memo(fp32, eval_seqs)  # the teacher's side is computed once for both students
    out, scores = {}, {}
    for name, path in students.items():
        torch.manual_seed(seed)
        student = load_model(path).eval()
        cfg = DistillConfig(student=path, teacher=teacher, out="unused", task=task, batch_size=8)
        vocab = check_vocab(student.get_output_embeddings().weight.shape[0], None, len(tok))
        module = DistillModule(student, fp32, LossConfig(), vocab, 256)
        kl = evaluate_student(module, tok, cfg, eval_seqs, None, "cpu", teacher_memo=memo)["eval_kl"]
        metrics, p = evaluate_ranking(student, tok, test, batch_size=16)
        scores[name] = p
        out[name] = {"path": path, "heldout_kl_to_fp32_teacher": kl, "test_auc": metrics["auc"],
                     "test_auc_ci95": list(bootstrap_auc(labels, p)), "n_test": len(test),
                     "n_eval_sequences": len(eval_seqs)}
        print(f"{name}: held-out KL to the fp32 teacher {kl:.5f}; test AUC {metrics['auc']:.4f} ({len(test)} rows)")
    first, second = list(students)
    d = paired_auc_delta(labels, scores[second], scores[first])
    out[f"delta_auc_{second}_minus_{first}"] = list(d)
    print(f"ΔAUC ({second} − {first}) {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="a fp32 teacher fine-tuned on movielens-ranking")
    ap.add_argument("--student", default=None, help="the student both runs start from (default: init-student)")
    ap.add_argument("--layers", type=int, default=8, help="init-student layers when --student is not given")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=4000, help="training examples (whole users)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-limit", type=int, default=512, help="validation sequences for the held-out KL")
    ap.add_argument("--test-limit", type=int, default=1000, help="test rows for AUC (whole users, seeded)")
    ap.add_argument("--seed", type=int, default=0, help="training seed of both KD runs")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/int8_teacher"))
    args = ap.parse_args()
    slim, o, log = [sys.executable, "-m", "slimlm"], args.out, []
    t8 = o / "teacher-int8"
    if not (t8 / "config.json").is_file():
        run_logged([*slim, "quantize", args.teacher, "--scheme", "int8", "--smooth", "--calib", "movielens-ranking",
                    "--samples", "64", "--seq-len", "256", "--out", str(t8)], log)
    student = args.student or str(o / "student-init")
    if args.student is None and not (o / "student-init" / "config.json").is_file():
        run_logged([*slim, "init-student", args.teacher, "--layers", str(args.layers), "--out", student], log)
    common = [f"student={student}", f"task.limit={args.limit}", "task.eval_limit=64", f"batch_size={args.batch_size}",
              f"max_steps={args.steps}", f"optim.lr={args.lr}", "optim.warmup_steps=10", "eval_every=0",
              "save_every=50", "tensorboard=false", "loss.divergence=forward_kl", f"seed={args.seed}",
              "mixed_precision=false"]  # fp32 vs INT8: no bf16 autocast (and bf16 teacher) where the CPU has bf16
    runs = {"fp32-teacher": args.teacher, "int8-teacher": str(t8)}
    for name, teacher in runs.items():  # the trainer skips a finished run and resumes an interrupted one
        run_logged([*slim, "distill", "mode=kd", f"teacher={teacher}", f"out={o}/{name}", *common], log)
    students = {name: str(o / name / "model") for name in runs}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "args": {k: str(v) for k, v in vars(args).items()},
              "commands": log, "train_tokens_per_s": {n: median_tokens_per_s(o / n) for n in runs},
              "students": measure(args.teacher, students, args.eval_limit, args.test_limit)}
    write_json(o / "summary.json", result)


if __name__ == "__main__":
    main()
