"""The CLI end to end on tiny models and synthetic data: results files, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slimlm.cli import app

runner = CliRunner()


def test_eval_movielens_on_tiny_model(tiny_model_dirs, ml_synth, tmp_path):
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", str(tiny_model_dirs["qwen2"]), "--data", str(ml_synth.dir),
                              "--split", "test", "--batch-size", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["metrics"]["n"] == 12 and 0 <= result["metrics"]["auc"] <= 1
    assert result["params"]["total"] > result["params"]["non_embedding"] > 0


def test_eval_text_and_info(tiny_model_dirs, tmp_path):
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "ppl.json"
    res = runner.invoke(app, ["eval", str(tiny_model_dirs["llama"]), "--task", "text", "--data",
                              str(tmp_path / "t.txt"), "--split", "all", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["metrics"]["perplexity"] > 1
    # one block of text has no held-out test block: a clear error, not a perplexity over training text
    res = runner.invoke(app, ["eval", str(tiny_model_dirs["llama"]), "--task", "text", "--data",
                              str(tmp_path / "t.txt"), "--out", str(tmp_path / "none.json")])
    assert res.exit_code != 0 and "none for split 'test'" in res.output
    assert not (tmp_path / "none.json").exists()
    res = runner.invoke(app, ["info", str(tiny_model_dirs["qwen3"])])
    assert res.exit_code == 0 and '"head_dim": 32' in res.output


@pytest.mark.parametrize("args, message", [
    (["eval", "/no/such/dir"], "/no/such/dir: not a directory"),
    (["eval", "MODEL", "--task", "nope"], "unknown task 'nope'"),
    (["eval", "MODEL", "--task", "ranking"], "--task ranking needs --data"),
    (["eval", "MODEL", "--split", "dev"], "unknown split 'dev'"),
    (["baseline", "other-task"], "no baseline for task 'other-task'"),
    (["baseline", "movielens-ranking", "--split", "tset"], "unknown split 'tset'"),
    (["baseline", "movielens-ranking", "--model", "svm"], "unknown baseline model 'svm'"),
    (["eval", "MODEL", "--device", "gpu0"], "device 'gpu0': not a torch device"),
    (["init-student", "MODEL", "--layers", "0", "--out", "never"], "--layers must be at least 1"),
    (["init-student", "MODEL", "--keep", "0,x", "--out", "never"], "--keep must be comma-separated integers"),
    (["serve", "MODEL", "--max-batch", "0"], "--max-batch"),
    (["serve", "MODEL", "--prefix-cache-mb", "-1"], "--prefix-cache-mb"),
    (["serve", "MODEL", "--max-prefill-tokens", "0"], "--max-prefill-tokens"),
])
def test_user_errors_are_one_line_exit_2(tiny_model_dirs, ml_synth, args, message):
    args = [a.replace("MODEL", str(tiny_model_dirs["llama"])) for a in args]
    if args[0] == "eval" and "--task" not in args and args[1] != "/no/such/dir":
        args += ["--data", str(ml_synth.dir)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_malformed_ranking_file_fails_before_loading_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prefix": "a\\n", "suffix": "b", "label": 1}\n{"prefix": "a\\n", "label": 0}\n')
    # the model path does not exist: the data error must come first (no model work on bad data)
    res = runner.invoke(app, ["eval", str(tmp_path / "missing-model"), "--task", "ranking", "--data", str(bad)])
    assert res.exit_code == 2
    assert "bad.jsonl:2: missing field 'suffix'" in res.output


def test_fetch_without_registry_exits_2(tmp_path):
    """No network: `slimlm fetch` says what could not be fetched and how to provide it, exit code 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(SLIMLM_HOME=str(tmp_path / "home"), PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(tmp_path), PIP_RETRIES="0", PIP_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-m", "slimlm", "fetch"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "could not fetch" in err and "--wheel-dir" in err and "Traceback" not in proc.stderr
    assert not list((tmp_path / "home").rglob("*.inter"))  # nothing half-written


def test_fetch_from_wheel_dir_missing_wheel(tmp_path):
    env = {**os.environ, "SLIMLM_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "slimlm", "fetch", "--wheel-dir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no wheel for recbole==1.2.1" in " ".join(proc.stderr.split())
