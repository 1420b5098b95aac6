"""Load slimlm exports in vLLM and run one request each: dtype warnings at load, and whether it generates.

For each ``--models`` directory the script starts vLLM's OpenAI server (in vLLM's own virtualenv, as in
``vllm_scoring.py``) with ``--dtype float32`` when the export's config.json says float32 (a ranking model)
and ``--dtype auto`` otherwise — as the README tells users — counts the WARNING lines of its log that
mention a dtype (e.g. "Attempted to load weight ... with dtype torch.float32 into parameter with dtype
torch.bfloat16"), and sends one greedy completion.

    python benchmarks/vllm_load.py --vllm-python /path/to/vllm-env/bin/python \\
        --models runs/demo/student-sft/model,runs/demo/int8/model,/tmp/fp8,/tmp/int4 --out runs/bench/vllm_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
from pathlib import Path

from _common import write_json
from vllm_scoring import cpu_flags, post, vllm_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", required=True, help="the python of a virtualenv that has vLLM")
    ap.add_argument("--models", required=True, help="comma-separated export directories")
    ap.add_argument("--port", type=int, default=8012)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/vllm_load.json"))
    args = ap.parse_args()

    results = []
    for i, model in enumerate(Path(m) for m in args.models.split(",")):
        config = json.loads((model / "config.json").read_text())
        kind = (config.get("quantization_config") or {}).get("format") or "float"
        config_dtype = config.get("dtype") or config.get("torch_dtype")
        dtype = "float32" if config_dtype == "float32" else "auto"
        log = args.out.parent / f"vllm-load-{i}-{model.parent.name}-{model.name}.log"
        row = {"model": str(model), "kind": kind, "config_dtype": config_dtype, "served_dtype": dtype, "log": str(log)}
        info: dict = {}
        try:
            with vllm_server(args.vllm_python, model, dtype, port=args.port, max_len=256, timeout=args.timeout,
                             log_path=log) as (url, info):
                try:
                    out = post(url + "/v1/completions", {"model": str(model), "prompt": "The capital of France is",
                                                         "max_tokens": 4, "temperature": 0})
                    row |= {"generates": True, "text": out["choices"][0]["text"]}
                except urllib.error.HTTPError as e:
                    row |= {"generates": False, "error": f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"}
        except SystemExit as e:  # the server did not come up
            row |= {"generates": False, "error": str(e)}
        row |= info
        if log.exists() and not row["generates"]:  # the root cause, where the engine names one
            lines = log.read_text(errors="replace").splitlines()
            cause = [ln for ln in lines if "Worker failed with error" in ln]
            row["log_errors"] = [ln[-300:] for ln in (cause or [ln for ln in lines if "Error" in ln])][-2:]
        print(json.dumps({k: row[k] for k in ("model", "kind", "served_dtype", "generates", "dtype_warnings")
                          if k in row}), flush=True)
        results.append(row)
    write_json(args.out, {"models": results, "cpu_flags": cpu_flags(), "loadavg": os.getloadavg()})


if __name__ == "__main__":
    main()
