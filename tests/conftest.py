"""Shared fixtures: tiny random model directories, a tiny synthetic MovieLens in RecBole format, simulated kills."""

from __future__ import annotations

import os
import random
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from slimlm.models import FAMILIES
from slimlm.testing import save_tiny_model, tiny_tokenizer


def free_port() -> int:
    """A loopback TCP port nothing listens on (for servers and process groups in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# --------------------------------------------------------------------------- simulated kills


class Killed(BaseException):
    """Stands in for SIGKILL: a BaseException, which no ``except Exception`` in slimlm catches."""


class Killer:
    """Watches ``os.replace``, ``shutil.rmtree`` (and what :meth:`watch` adds) on paths under ``root``: each
    call is numbered into ``events`` ((function name, path), in order) and, once :meth:`arm`-ed, call ``at``
    raises :class:`Killed` before it acts (``when="before"``) or just after (``"after"``), and so does every
    later watched call, cleanup included: a killed process does nothing more."""

    def __init__(self, monkeypatch, root: Path):
        self.monkeypatch, self.root = monkeypatch, Path(root)
        self.arm(None)
        self.watch(os, "replace")
        self.watch(shutil, "rmtree")

    def arm(self, at: int | None, when: str = "before") -> None:
        self.at, self.when, self.dead, self.events = at, when, False, []

    def watch(self, owner, name: str, path_arg: int = 0) -> None:
        real = getattr(owner, name)

        def call(*args, **kwargs):
            path = Path(args[path_arg])
            if not path.is_relative_to(self.root):
                return real(*args, **kwargs)
            i = len(self.events)
            self.events.append((name, path))
            if self.dead or (i == self.at and self.when == "before"):
                self.dead = True
                raise Killed(f"{name}({path.name}), event {i}")
            result = real(*args, **kwargs)
            if i == self.at:
                self.dead = True
                raise Killed(f"after {name}({path.name}), event {i}")
            return result

        self.monkeypatch.setattr(owner, name, call)


def hidden(d: Path) -> list[str]:
    """Names starting with a dot in directory ``d`` (slimlm's temporaries and asides are such)."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".")) if d.is_dir() else []


# --------------------------------------------------------------------------- tiny models



@pytest.fixture(autouse=True, scope="module")
def _one_thread(request):
    """Modules marked ``one_thread`` run torch on one thread: their tensors are tiny, so a second intra-op
    thread only adds synchronisation, and on a busy 2-core machine a contended OpenMP pool made them ~10x
    slower."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_tok():
    """The in-memory tiny BPE tokenizer (training it takes ~0.5 s, so build it once)."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> a saved tiny model directory (seed 0), one per family in FAMILIES."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: save_tiny_model(f, root / f, seed=0) for f in FAMILIES}


# --------------------------------------------------------------------------- tiny synthetic MovieLens

USER_HEADER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"

OCCUPATIONS = ("technician", "writer", "student", "educator", "engineer", "artist")
GENRE_SETS = ("Animation Children's Comedy", "Action Adventure Thriller", "Drama", "Comedy Romance",
              "Sci-Fi War", "Horror", "Film-Noir Mystery", "Documentary")


@dataclass(frozen=True)
class SynthRating:
    user: int
    item: int
    stars: int
    timestamp: int


@dataclass
class SynthMovieLens:
    """What was written, so tests can compute expectations by hand."""

    dir: Path
    users: dict[int, tuple[int, str, str]]  # id -> (age, gender, occupation)
    items: dict[int, tuple[str, str, str]]  # id -> (title, year, genres)
    ratings: list[SynthRating]


def synth_movielens(n_users: int = 6, per_user: int = 12, n_items: int = 20, seed: int = 0,
                    short_user: bool = True) -> tuple[dict, dict, list[SynthRating]]:
    """Random users/items/ratings: each full user rates ``per_user`` distinct items.

    Timestamps are drawn from a small range so that some of a user's ratings tie (the split must break
    ties by item id); with ``short_user`` one extra user has only 3 ratings (too few to hold any out).
    """
    rng = random.Random(seed)
    users = {u: (18 + 7 * u, "MF"[u % 2], OCCUPATIONS[u % len(OCCUPATIONS)]) for u in range(1, n_users + 1)}
    items = {}
    for i in range(1, n_items + 1):
        year = "" if i == 7 else str(1970 + i)  # one movie with an unknown year, as in the real data
        items[i] = (f"Movie {chr(64 + i)} {i}", year, GENRE_SETS[i % len(GENRE_SETS)])
    ratings = []
    for u in users:
        for item in rng.sample(sorted(items), per_user):
            ratings.append(SynthRating(u, item, rng.randint(1, 5), 880_000_000 + rng.randrange(0, 40) * 1000))
    if short_user:
        u = n_users + 1
        users[u] = (40, "F", "other")
        for item in (1, 2, 3):
            ratings.append(SynthRating(u, item, rng.randint(1, 5), 880_000_000 + item))
    rng.shuffle(ratings)  # file order must not matter
    return users, items, ratings


def write_movielens(d: Path, users: dict, items: dict, ratings: list[SynthRating]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ml-100k.user").write_text(
        USER_HEADER + "\n" + "".join(f"{u}\t{a}\t{g}\t{o}\t0{u}000\n" for u, (a, g, o) in users.items()))
    (d / "ml-100k.item").write_text(
        ITEM_HEADER + "\n" + "".join(f"{i}\t{t}\t{y}\t{c}\n" for i, (t, y, c) in items.items()))
    (d / "ml-100k.inter").write_text(
        INTER_HEADER + "\n" + "".join(f"{r.user}\t{r.item}\t{r.stars}\t{r.timestamp}\n" for r in ratings))
    return d


@pytest.fixture
def ml_synth(tmp_path) -> SynthMovieLens:
    """A fresh tiny MovieLens dir: 6 users x 12 ratings over 20 items, plus one user with 3 ratings."""
    users, items, ratings = synth_movielens()
    d = write_movielens(tmp_path / "ml", users, items, ratings)
    return SynthMovieLens(d, users, items, ratings)


def wait_for(cond, timeout: float = 60) -> None:
    """Poll ``cond()`` until it is true; fail the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def prometheus(url: str) -> dict[str, float]:
    """A server's /metrics as {series (name and labels): value}."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}


def greedy_reference(model, prompt, n, eos=None) -> list[int]:
    """Greedy continuation by full forwards over the whole growing sequence (no cache, no padding, no
    batch): the oracle for every cached / batched generation path."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(t)
            seq.append(t)
            if t == eos:
                break
    return out


@pytest.fixture(scope="session")
def recipe_world(tmp_path_factory) -> tuple[Path, Path]:
    """(root, MovieLens data dir) for pipeline recipes: a 3-layer tiny llama teacher at root/teacher and
    synthetic MovieLens files; every test writes its runs under its own directory."""
    root = tmp_path_factory.mktemp("recipes")
    users, items, ratings = synth_movielens(n_users=10, per_user=14, seed=4)
    data = write_movielens(root / "ml", users, items, ratings)
    save_tiny_model("llama", root / "teacher", seed=1, num_hidden_layers=3)
    return root, data


def more_stages_recipe(root, data, out: Path, device: str) -> dict:
    """A recipe of the stages the GPU tier's tiny recipe leaves out (tests/gpu/test_gpu_tier.py: on-policy KD,
    cached-teacher KD, GPTQ / QuantEase INT4 and FP8 with calibration, evaluation of them all), on ``device``.
    tests/test_pipeline.py runs it with ``device: cpu``, so a failure of the GPU tier's run is the GPU's."""
    train = {"max_steps": 2, "batch_size": 3, "eval_every": 0, "save_every": 0, "tensorboard": False}
    calib = {"calib": "movielens-ranking", "samples": 4, "seq_len": 32}
    return {"out": str(out), "teacher": str(root / "teacher"), "device": device,
            "task": {"name": "movielens-ranking", "data": str(data), "eval_limit": 6},
            "stages": [
                {"name": "student", "kind": "prune", "config": {"layers_keep": 2, "multiple": 4, **calib}},
                {"name": "on-policy", "kind": "distill",
                 "config": {**train, "mode": "on_policy", "on_policy": {"lam": 0.5, "max_new_tokens": 4}}},
                {"name": "cached", "kind": "distill", "from": "student",
                 "config": {**train, "mode": "kd", "teacher_signal": "cached",
                            "teacher_cache": str(out / "teacher-cache"), "cache_top_k": 8}},
                {"name": "int4-gptq", "kind": "quantize", "from": "on-policy",
                 "config": {"scheme": "int4", "method": "gptq", "group_size": 32, **calib}},
                {"name": "int4-qe", "kind": "quantize", "from": "on-policy",
                 "config": {"scheme": "int4", "method": "quantease", "group_size": 32, **calib}},
                {"name": "fp8", "kind": "quantize", "from": "on-policy", "config": {"scheme": "fp8"}},
                {"name": "eval", "kind": "evaluate", "models": ["on-policy", "cached", "int4-gptq", "int4-qe", "fp8"],
                 "config": {"split": "val", "limit": 6}}]}
