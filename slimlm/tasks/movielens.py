"""MovieLens-100K as the paper's predictive ranking task.

One example per rating: will this user rate this movie 4 or 5 stars (" Yes") or not (" No")?

Split (temporal, per user). Each user's ratings are ordered by (timestamp, item id); the last
``test_per_user`` go to test, the ``val_per_user`` before them to validation, the rest to train.

Prompt = shared user prefix + candidate suffix:

* prefix: the user's profile (age, gender, occupation); aggregates of the user's *training* ratings
  made before the prompt's point in time (count, mean, share liked); the ``history`` most recent rated
  movies before that point (title, year, genres, stars). For a train row the point is the row itself, or
  with ``candidates_per_prefix`` k > 1 the first row of its group of k consecutive train ratings (the
  group's candidates share one prefix: multi-item training); for validation it is the start of the
  validation window, for test the start of the test window, so all of a user's validation (or test)
  candidates share one prefix.
* suffix: the candidate movie (title, year, genres) with its aggregates over the training split (mean
  stars, number of raters) and the question.

No leakage (tested): a train prompt never sees validation/test ratings, and never its own rating: the
user aggregates cover only earlier ratings, and the item aggregates leave the row's own rating out.
Validation/test prompts use aggregates over the whole training split only.

The same :class:`Row` feeds the classic baseline (:mod:`slimlm.baseline`), so both see the same features.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slimlm import SlimlmError
from slimlm.tasks.files import SPLITS, check_split
from slimlm.tasks.ranking import RankingExample, whole_groups

GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
          "Western", "unknown")
LIKE = 4.0  # stars at or above which a rating counts as liked (label 1)


@dataclass(frozen=True)
class User:
    id: int
    age: int
    gender: str
    occupation: str


@dataclass(frozen=True)
class Item:
    id: int
    title: str
    year: int | None
    genres: tuple[str, ...]


@dataclass(frozen=True)
class Rating:
    user: int
    item: int
    stars: float
    timestamp: int


@dataclass
class MovieLens:
    users: dict[int, User]
    items: dict[int, Item]
    ratings: list[Rating]


@dataclass(frozen=True)
class SplitConfig:
    val_per_user: int = 2
    test_per_user: int = 2
    history: int = 8  # most recent rated movies shown in the prefix
    min_train: int = 1  # users with fewer train ratings than this keep all ratings in train
    # train rows: a user's consecutive ratings in groups of this many share one prefix, drawn at the group's
    # first rating (multi-item training); 1 = every train row has its own prefix
    candidates_per_prefix: int = 1


@dataclass(frozen=True)
class Aggregate:
    """Count, mean stars and share liked of a set of ratings (mean/liked are None when count == 0)."""

    count: int = 0
    total: float = 0.0
    liked: int = 0

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def like_rate(self) -> float | None:
        return self.liked / self.count if self.count else None

    def add(self, stars: float, sign: int = 1) -> Aggregate:
        return Aggregate(self.count + sign, self.total + sign * stars, self.liked + sign * int(stars >= LIKE))


@dataclass(frozen=True)
class Row:
    """Everything one example knows: what the prompt shows and the baseline's features are built from."""

    split: str
    user: User
    item: Item
    stars: float
    timestamp: int
    history: tuple[Rating, ...]  # the most recent rated movies before the prompt's point, oldest first
    user_agg: Aggregate  # the user's train ratings before the prompt's point in time
    item_agg: Aggregate  # the item's train ratings, minus this row's own rating for train rows
    position: int = field(default=0)  # index of the rating in the user's ordered sequence
    point: int = field(default=0)  # the prompt's point in that sequence: history and user_agg stop before it

    @property
    def label(self) -> int:
        return int(self.stars >= LIKE)


# --------------------------------------------------------------------------- reading RecBole atomic files


def _read_atomic(path: Path, want: dict[str, type]) -> list[tuple[int, dict]]:
    """Read a RecBole atomic file (tab-separated, header ``name:type``): (line number, dict of ``want``)."""
    if not path.is_file():
        raise SlimlmError(f"{path}: no such file (run `slimlm fetch`, or pass the MovieLens directory as --data / task.data)")
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        names = [h.split(":")[0] for h in header]
        missing = [k for k in want if k not in names]
        if missing:
            raise SlimlmError(f"{path}:1: header lacks field '{missing[0]}'")
        idx = {k: names.index(k) for k in want}
        for n, line in enumerate(f, 2):
            line = line.rstrip("\n")
            if not line:
                continue
            cols = line.split("\t")
            if len(cols) < len(names):
                raise SlimlmError(f"{path}:{n}: expected {len(names)} tab-separated fields, got {len(cols)}")
            row = {}
            for k, conv in want.items():
                raw = cols[idx[k]]
                try:
                    row[k] = conv(raw) if conv is not str else raw
                except ValueError:
                    raise SlimlmError(f"{path}:{n}: field '{k}' is not a valid {conv.__name__}: {raw!r}") from None
            rows.append((n, row))
    return rows


def load_movielens(data_dir: str | Path | None = None) -> MovieLens:
    """Read ``ml-100k.{user,item,inter}`` from ``data_dir`` (default: the fetched asset)."""
    if data_dir is None:
        from slimlm.assets import movielens_dir

        data_dir = movielens_dir()
    d = Path(data_dir)
    users = {
        r["user_id"]: User(r["user_id"], r["age"], r["gender"], r["occupation"])
        for _, r in _read_atomic(d / "ml-100k.user", {"user_id": int, "age": int, "gender": str, "occupation": str})
    }
    items = {}
    for _, r in _read_atomic(d / "ml-100k.item", {"item_id": int, "movie_title": str, "release_year": str,
                                                   "class": str}):
        year = int(r["release_year"]) if r["release_year"].strip().isdigit() else None
        items[r["item_id"]] = Item(r["item_id"], r["movie_title"].strip(), year,
                                   tuple(r["class"].split()) or ("unknown",))
    inter_path = d / "ml-100k.inter"
    ratings = []
    for n, r in _read_atomic(inter_path, {"user_id": int, "item_id": int, "rating": float, "timestamp": float}):
        if r["user_id"] not in users or r["item_id"] not in items:
            what = "user_id" if r["user_id"] not in users else "item_id"
            raise SlimlmError(f"{inter_path}:{n}: field '{what}' refers to an unknown id")
        ratings.append(Rating(r["user_id"], r["item_id"], r["rating"], int(r["timestamp"])))
    return MovieLens(users, items, ratings)


# --------------------------------------------------------------------------- split and features


def user_sequences(ratings: list[Rating]) -> dict[int, list[Rating]]:
    """Each user's ratings in time order (ties broken by item id, so the order is deterministic)."""
    seqs: dict[int, list[Rating]] = defaultdict(list)
    for r in ratings:
        seqs[r.user].append(r)
    for s in seqs.values():
        s.sort(key=lambda r: (r.timestamp, r.item))
    return dict(sorted(seqs.items()))


def split_bounds(n: int, cfg: SplitConfig) -> tuple[int, int]:
    """Indices (train_end, val_end) into a user's ordered sequence of ``n`` ratings."""
    if n - cfg.val_per_user - cfg.test_per_user < cfg.min_train:
        return n, n  # too few ratings to hold any out
    return n - cfg.val_per_user - cfg.test_per_user, n - cfg.test_per_user


def build_rows(ml: MovieLens, cfg: SplitConfig = SplitConfig()) -> dict[str, list[Row]]:
    """All rows of every split (see the module docstring for what each row may see)."""
    seqs = user_sequences(ml.ratings)
    bounds = {u: split_bounds(len(s), cfg) for u, s in seqs.items()}
    item_train: dict[int, Aggregate] = defaultdict(Aggregate)
    for u, s in seqs.items():
        for r in s[: bounds[u][0]]:
            item_train[r.item] = item_train[r.item].add(r.stars)

    out: dict[str, list[Row]] = {k: [] for k in SPLITS}
    for u, seq in seqs.items():
        train_end, val_end = bounds[u]
        user = ml.users[u]
        user_agg = Aggregate()
        k = max(1, cfg.candidates_per_prefix)
        for start in range(0, train_end, k):  # user aggregate grows as we walk forward in time
            # every row of the group sees the user as of the group's first rating: no rating of the group
            # (its own or a later one) is in the shared prefix
            for i in range(start, min(start + k, train_end)):
                r = seq[i]
                out["train"].append(Row("train", user, ml.items[r.item], r.stars, r.timestamp,
                                        tuple(seq[max(0, start - cfg.history):start]), user_agg,
                                        item_train[r.item].add(r.stars, -1), i, start))
            for r in seq[start:min(start + k, train_end)]:
                user_agg = user_agg.add(r.stars)
        for name, start, end in (("val", train_end, val_end), ("test", val_end, len(seq))):
            history = tuple(seq[max(0, start - cfg.history):start])
            for i in range(start, end):
                r = seq[i]
                out[name].append(Row(name, user, ml.items[r.item], r.stars, r.timestamp, history, user_agg,
                                     item_train[r.item], i, start))
    return out


# --------------------------------------------------------------------------- prompts

_GENDER = {"M": "male", "F": "female"}
INSTRUCTION = "A movie recommender predicts whether a user will like a movie (rate it 4 or 5 stars out of 5).\n"


def _movie(item: Item) -> str:
    year = f" ({item.year})" if item.year else ""
    return f"{item.title}{year}, {'|'.join(item.genres)}"


def render_suffix(row: Row) -> str:
    a = row.item_agg
    stats = (f"Rated {a.mean:.2f} stars on average by {a.count} users." if a.count
             else "Not rated by any user yet.")
    return f"Candidate: {_movie(row.item)}. {stats}\nWill the user like it? Answer:"


def example_id(row: Row) -> str:
    """The ranking example's id for a row: the same for the prompt and for the classic baseline's score."""
    return f"{row.split}-u{row.user.id}-i{row.item.id}-t{row.timestamp}"


def to_examples(rows: list[Row], items: dict[int, Item]) -> list[RankingExample]:
    """Render rows as ranking examples (prefix/suffix/label); the group is the user and prompt point."""
    out = []
    for row in rows:
        out.append(RankingExample(
            id=example_id(row),
            group=f"u{row.user.id}-{row.split}" if row.split != "train" else f"u{row.user.id}-p{row.point}",
            prefix=render_prefix(row, items),
            suffix=render_suffix(row),
            label=row.label,
        ))
    return out


def render_prefix(row: Row, items: dict[int, Item]) -> str:
    u, a = row.user, row.user_agg
    lines = [INSTRUCTION.rstrip("\n"),
             f"User: {u.age}-year-old {_GENDER.get(u.gender, u.gender)} {u.occupation}."]
    if a.count:
        lines.append(f"The user has rated {a.count} movies, {a.mean:.2f} stars on average, "
                     f"and liked {100 * a.like_rate:.0f}% of them.")
    else:
        lines.append("The user has not rated any movies yet.")
    if row.history:
        lines.append("Most recent ratings (oldest first):")
        lines += [f"- {_movie(items[h.item])}: {h.stars:.0f} stars" for h in row.history]
    return "\n".join(lines) + "\n"


def subsample(examples: list[RankingExample], limit: int | None, seed: int = 0) -> list[RankingExample]:
    """At most ``limit`` examples made of whole groups, in a seeded random order (keeps prefixes shared;
    :func:`slimlm.tasks.ranking.whole_groups`). Groups that would overflow ``limit`` are skipped, so the
    result can be a little under ``limit``."""
    if limit is None or limit >= len(examples):
        return examples
    names: dict[str, int] = {}
    group_of = np.array([names.setdefault(ex.group, len(names)) for ex in examples], dtype=np.int64)
    order, _ = whole_groups(group_of, list(names), limit, seed)
    return [examples[int(i)] for i in order]


def movielens_examples(split: str = "test", *, data_dir: str | Path | None = None,
                       cfg: SplitConfig = SplitConfig(), limit: int | None = None,
                       seed: int = 0) -> list[RankingExample]:
    """The ranking examples of one split, optionally subsampled by whole groups (deterministic)."""
    check_split(split)
    ml = load_movielens(data_dir)
    rows = build_rows(ml, cfg)[split]
    return subsample(to_examples(rows, ml.items), limit, seed)
