"""Quality of distillation on movielens-ranking: student trained by SFT only vs by KD, same budget.

    python benchmarks/distill_quality.py [--steps 60] [--teacher-steps 60] [--eval-limit 600] [--layers 8]

1. the teacher is fine-tuned on the task by SFT (a zero-shot 135M model ranks at chance);
2. a student is initialised from the fine-tuned teacher's layers (evenly spaced);
3. the student is trained twice from that same initialisation, on the same examples in the same order,
   for the same number of steps: once by SFT (hard labels) and once by KD (forward KL to the teacher);
4. test-split AUC (with bootstrap 95% intervals) for the teacher before/after SFT and both students.

Every stage is the user-facing CLI in a subprocess; the commands are printed and saved with the results.
Training budgets are equal in examples and steps, not in wall time (KD also runs the teacher).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import run_logged  # benchmarks/ is on sys.path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--teacher-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=4000, help="training examples (whole users)")
    ap.add_argument("--eval-limit", type=int, default=600)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/quality"))
    args = ap.parse_args()
    slim = [sys.executable, "-m", "slimlm"]
    o = args.out
    log: list = []
    common = [f"task.limit={args.limit}", "task.eval_limit=128", f"batch_size={args.batch_size}", "eval_every=0",
              f"optim.lr={args.lr}", "optim.warmup_steps=5", "tensorboard=false"]
    run_logged([*slim, "sft", "student=teacher", f"out={o}/teacher-sft", f"max_steps={args.teacher_steps}", *common], log)
    teacher = f"{o}/teacher-sft/model"
    if not (o / "student-init" / "config.json").is_file():  # the trainer itself skips finished runs
        run_logged([*slim, "init-student", teacher, "--layers", str(args.layers), "--out", f"{o}/student-init"], log)
    run_logged([*slim, "sft", f"student={o}/student-init", f"out={o}/student-sft", f"max_steps={args.steps}", *common], log)
    run_logged([*slim, "distill", "mode=kd", f"student={o}/student-init", f"teacher={teacher}", f"out={o}/student-kd",
         f"max_steps={args.steps}", "loss.divergence=forward_kl", *common], log)
    results = {}
    for name, model in (("teacher zero-shot", "teacher"), ("teacher SFT", teacher),
                        ("student init", f"{o}/student-init"), ("student SFT", f"{o}/student-sft/model"),
                        ("student KD", f"{o}/student-kd/model")):
        f = o / "eval" / f"{name.replace(' ', '_')}.json"
        if not f.is_file():  # a re-run after an interruption evaluates only what is missing
            run_logged([*slim, "eval", model, "--task", "movielens-ranking", "--split", "test", "--limit", str(args.eval_limit),
                 "--out", str(f)], log)
        r = json.loads(f.read_text())
        results[name] = {**r["metrics"], "params": r["params"]}
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "commands": log}
    (o / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, m in results.items():
        lo, hi = m["auc_ci95"]
        print(f"{name:18s} AUC {m['auc']:.4f} [{lo:.3f}, {hi:.3f}]  log-loss {m['log_loss']:.4f}  "
              f"non-emb params {m['params']['non_embedding']:,}")
    print(f"results: {o / 'summary.json'}")


if __name__ == "__main__":
    main()
