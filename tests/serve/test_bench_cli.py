"""`slimlm bench-serve` (bounded load generator) and `slimlm serve` (the CLI entry) on a tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import free_port
from typer.testing import CliRunner

from slimlm.cli import app
from slimlm.serve.bench import run_load
from slimlm.testing import save_tiny_model

runner = CliRunner()


pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("bench") / "tiny-qwen2", seed=0)


@pytest.mark.parametrize("kind,extra", [("completions", []), ("chat", ["--stream"]), ("score", ["--candidates", "7"])])
def test_bench_serve_in_process(model_dir, tmp_path, kind, extra):
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["bench-serve", "--model", str(model_dir), "--kind", kind, "--requests", "12",
                              "--concurrency", "4", "--max-tokens", "3", "--duration", "60", "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["ok"] == 12 and r["errors"] == 0 and r["requests_sent"] == 12
    assert r["latency_s"]["p50"] <= r["latency_s"]["p99"] <= r["latency_s"]["max"]
    assert len(r["loadavg"]) == 3
    if kind == "score":
        assert r["candidates"] == 12 * 7 and r["candidates_per_s"] > 0
    else:
        assert r["completion_tokens"] == 12 * 3  # ignore_eos: exactly max_tokens each
    if kind == "chat":
        assert r["ttft_s"]["p50"] <= r["latency_s"]["max"]


def test_bench_serve_time_limit_and_refusals(model_dir, tmp_path):
    from slimlm.serve.app import create_app, serve_in_thread

    with serve_in_thread(create_app(model_dir)) as url:
        r = run_load(url, kind="completions", requests=100_000, concurrency=2, duration=0.5, max_tokens=2)
        assert r["errors"] == 0 and 0 < r["requests_sent"] < 100_000  # stopped by the time limit
        bad = run_load(url, kind="completions", requests=3, concurrency=1, model="other-model", max_tokens=2)
        assert bad["errors"] == 3 and "404" in bad["error_examples"][0]
    for args, msg in [(["--url", "http://10.1.2.3:8000"], "loopback"), (["--url", "http://example.com"], "loopback"),
                      (["--model", str(model_dir), "--requests", "0"], "requests"),
                      (["--model", str(model_dir), "--kind", "embed"], "kind"),
                      (["--url", f"http://127.0.0.1:{free_port()}"], "no slimlm server answering")]:
        res = runner.invoke(app, ["bench-serve", *args, "--out", str(tmp_path / "x.json")])
        assert res.exit_code == 2 and msg in res.output, res.output
    assert not (tmp_path / "x.json").exists()


def test_serve_command_starts_on_loopback_and_stops(model_dir):
    port = free_port()
    env = {**os.environ, "SLIMLM_API_KEY": "k1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "slimlm", "serve", str(model_dir), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401  # the key came from SLIMLM_API_KEY
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k1"})
        assert r.json()["data"][0]["id"] == "tiny-qwen2"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGINT, 130)


def test_serve_refuses_a_missing_model_dir(tmp_path):
    res = runner.invoke(app, ["serve", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a directory" in res.output
