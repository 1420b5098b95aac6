"""MovieLens ranking task: temporal split, no target leakage (oracle tests), prompts, reading errors."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace

import pytest
from conftest import SynthRating, synth_movielens, write_movielens

from slimlm import SlimlmError
from slimlm.tasks.movielens import (
    SPLITS,
    MovieLens,
    SplitConfig,
    build_rows,
    load_movielens,
    movielens_examples,
    subsample,
    to_examples,
)


def _examples(ml: MovieLens, cfg: SplitConfig = SplitConfig()):
    rows = build_rows(ml, cfg)
    return {s: to_examples(rows[s], ml.items) for s in SPLITS}


def _hand_split(ratings: list[SynthRating], val: int = 2, test: int = 2, min_train: int = 1):
    """split -> list of ratings, computed independently of slimlm: order by (timestamp, item) per user."""
    by_user = defaultdict(list)
    for r in ratings:
        by_user[r.user].append(r)
    out = {s: [] for s in SPLITS}
    for seq in by_user.values():
        seq.sort(key=lambda r: (r.timestamp, r.item))
        n_train = len(seq) - val - test
        if n_train < min_train:
            out["train"] += seq
            continue
        out["train"] += seq[:n_train]
        out["val"] += seq[n_train:n_train + val]
        out["test"] += seq[n_train + val:]
    return out


def _with_stars(ml: MovieLens, new_stars: dict[tuple[int, int], float]) -> MovieLens:
    """A copy of ``ml`` with the ratings of (user, item) pairs in ``new_stars`` changed."""
    ratings = [replace(r, stars=new_stars[(r.user, r.item)]) if (r.user, r.item) in new_stars else r
               for r in ml.ratings]
    return MovieLens(ml.users, ml.items, ratings)


def _keys(rows):
    return {(r.user.id, r.item.id) for r in rows}


def _prompts(examples):
    return [(e.id, e.group, e.prefix, e.suffix) for e in examples]


# --------------------------------------------------------------------------- split


@pytest.mark.parametrize(("val", "test", "min_train"), [(2, 2, 1), (3, 1, 1), (1, 4, 8)])
def test_split_sizes_per_user(ml_synth, val, test, min_train):
    cfg = SplitConfig(val_per_user=val, test_per_user=test, min_train=min_train)
    rows = build_rows(load_movielens(ml_synth.dir), cfg)
    counts = {s: Counter(r.user.id for r in rows[s]) for s in SPLITS}
    per_user = Counter(r.user for r in ml_synth.ratings)
    for u, n in per_user.items():
        held_out = n - val - test >= min_train
        assert counts["train"][u] == (n - val - test if held_out else n)
        assert counts["val"][u] == (val if held_out else 0)
        assert counts["test"][u] == (test if held_out else 0)
    assert any(counts["test"].values()) == (12 - val - test >= min_train)  # (1, 4, 8): 12 - 5 < 8
    if min_train == 1:
        assert counts["test"][7] == 0 and counts["train"][7] == 3  # the short user keeps everything in train
    # Every rating is in exactly one split.
    all_keys = [k for s in SPLITS for k in sorted(_keys(rows[s]))]
    assert sorted(all_keys) == sorted((r.user, r.item) for r in ml_synth.ratings)


def test_split_is_temporal(ml_synth):
    rows = build_rows(load_movielens(ml_synth.dir))
    times = {s: defaultdict(list) for s in SPLITS}
    for s in SPLITS:
        for r in rows[s]:
            times[s][r.user.id].append(r.timestamp)
    for u in times["test"]:
        assert max(times["train"][u]) <= min(times["val"][u] + times["test"][u])
        assert max(times["val"][u]) <= min(times["test"][u])
    # And exactly the hand-computed split (ties broken by item id).
    hand = _hand_split(ml_synth.ratings)
    for s in SPLITS:
        assert _keys(rows[s]) == {(r.user, r.item) for r in hand[s]}


def test_timestamp_ties_break_by_item_id(tmp_path):
    users = {1: (30, "M", "writer")}
    items = {i: (f"Movie {i}", "1990", "Drama") for i in range(1, 7)}
    ratings = [SynthRating(1, i, 3, 100) for i in (6, 2, 5, 1, 4, 3)]  # all at the same second
    rows = build_rows(load_movielens(write_movielens(tmp_path, users, items, ratings)))
    assert [r.item.id for r in rows["train"]] == [1, 2]
    assert [r.item.id for r in rows["val"]] == [3, 4]
    assert [r.item.id for r in rows["test"]] == [5, 6]


# --------------------------------------------------------------------------- no leakage (oracle tests)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heldout_ratings_do_not_reach_train_examples(ml_synth, seed):
    ml = load_movielens(ml_synth.dir)
    rows = build_rows(ml)
    base = _examples(ml)
    rng = random.Random(seed)
    held = _keys(rows["val"]) | _keys(rows["test"])
    stars = {(r.user, r.item): r.stars for r in ml.ratings}
    new = {k: float(rng.choice([s for s in range(1, 6) if s != stars[k]])) for k in held}
    changed = _examples(_with_stars(ml, new))
    assert changed["train"] == base["train"]  # prefix, suffix, label, id, group: all identical
    assert [e.label for e in changed["val"] + changed["test"]] != [e.label for e in base["val"] + base["test"]]


@pytest.mark.parametrize("flipped, unchanged", [("test", ["train", "val"]), ("val", ["train"])])
def test_heldout_ratings_do_not_reach_prompts(ml_synth, flipped, unchanged):
    """Flipping every rating of a held-out split changes its labels, never its own prompts, nor the
    splits before it (test prompts may show validation ratings as history: those are in the past)."""
    ml = load_movielens(ml_synth.dir)
    rows = build_rows(ml)
    base = _examples(ml)
    flip = {(r.user.id, r.item.id): (1.0 if r.stars >= 4 else 5.0) for r in rows[flipped]}
    changed = _examples(_with_stars(ml, flip))
    for split in unchanged:
        assert changed[split] == base[split]
    assert _prompts(changed[flipped]) == _prompts(base[flipped])
    assert all(a.label != b.label for a, b in zip(changed[flipped], base[flipped], strict=True))


def test_train_row_never_sees_its_own_rating(ml_synth):
    ml = load_movielens(ml_synth.dir)
    rows = build_rows(ml)
    base_all = _examples(ml)
    base = {e.id: e for e in base_all["train"]}
    assert len(base) == len(rows["train"])
    for r in rows["train"]:
        flipped = 1.0 if r.stars >= 4 else 5.0
        changed = _examples(_with_stars(ml, {(r.user.id, r.item.id): flipped}))
        new = {e.id: e for e in changed["train"]}
        eid = next(e for e in base if e.startswith(f"train-u{r.user.id}-i{r.item.id}-"))
        assert (new[eid].prefix, new[eid].suffix) == (base[eid].prefix, base[eid].suffix), eid
        assert new[eid].label == 1 - base[eid].label
        # The change is visible somewhere else (later rows of the user, other raters of the item, or
        # the held-out prompts): the oracle really changed something the features can see.
        others = [e for e in changed["train"] if e.id != eid] + changed["val"] + changed["test"]
        before = [e for e in base_all["train"] if e.id != eid] + base_all["val"] + base_all["test"]
        assert _prompts(others) != _prompts(before)


def test_aggregates_match_hand_computation(ml_synth):
    ml = load_movielens(ml_synth.dir)
    rows = build_rows(ml)
    hand = _hand_split(ml_synth.ratings)
    train = hand["train"]
    pos_in_user = {}
    by_user = defaultdict(list)
    for r in sorted(train, key=lambda r: (r.user, r.timestamp, r.item)):
        pos_in_user[(r.user, r.item)] = len(by_user[r.user])
        by_user[r.user].append(r)
    several = 0
    for split in SPLITS:
        for row, ex in zip(rows[split], to_examples(rows[split], ml.items), strict=True):
            u, i = row.user.id, row.item.id
            # Item: every train rating of the item except this row's own (a user rates a movie once).
            others = [r.stars for r in train if r.item == i and r.user != u]
            assert row.item_agg.count == len(others)
            if others:
                mean = sum(others) / len(others)
                assert row.item_agg.mean == pytest.approx(mean)
                assert f"Rated {mean:.2f} stars on average by {len(others)} users." in ex.suffix
                several += len(others) >= 2
            else:
                assert "Not rated by any user yet." in ex.suffix
            # User: train ratings strictly before the row (train) or all of them (val/test).
            seen = by_user[u][: pos_in_user[(u, i)]] if split == "train" else by_user[u]
            assert row.user_agg.count == len(seen)
            if seen:
                mean = sum(r.stars for r in seen) / len(seen)
                liked = 100 * sum(r.stars >= 4 for r in seen) / len(seen)
                assert f"The user has rated {len(seen)} movies, {mean:.2f} stars on average, " \
                       f"and liked {liked:.0f}% of them." in ex.prefix
            else:
                assert "The user has not rated any movies yet." in ex.prefix
            assert ex.label == int(row.stars >= 4)
    assert several > 5  # leave-one-out actually differs from the plain mean for many rows


def test_history_shows_recent_ratings_before_the_prompt_point(ml_synth):
    ml = load_movielens(ml_synth.dir)
    cfg = SplitConfig(history=3)
    rows = build_rows(ml, cfg)
    hand = _hand_split(ml_synth.ratings)
    seqs = defaultdict(list)
    for s in SPLITS:
        for r in hand[s]:
            seqs[r.user].append(r)
    for seq in seqs.values():
        seq.sort(key=lambda r: (r.timestamp, r.item))
    for split in SPLITS:
        for row, ex in zip(rows[split], to_examples(rows[split], ml.items), strict=True):
            seq = seqs[row.user.id]
            n_train = len([r for r in hand["train"] if r.user == row.user.id])
            point = {"train": row.position, "val": n_train, "test": n_train + cfg.val_per_user}[split]
            want = seq[max(0, point - 3):point]
            assert [(h.item, h.stars) for h in row.history] == [(h.item, h.stars) for h in want]
            lines = [ln for ln in ex.prefix.splitlines() if ln.startswith("- ")]
            assert len(lines) == len(want)
            for ln, h in zip(lines, want, strict=True):
                assert ln.startswith(f"- {ml_synth.items[h.item][0]}") and ln.endswith(f": {h.stars} stars")


def test_prompt_rendering(ml_synth):
    ex = _examples(load_movielens(ml_synth.dir))
    for e in ex["train"] + ex["val"] + ex["test"]:
        assert e.prefix.endswith("\n") and not e.suffix[0].isspace()  # the tokenization boundary
        assert e.suffix.endswith("Answer:")
        assert e.prefix.startswith("A movie recommender predicts")
    e = next(e for e in ex["test"] if e.id.startswith("test-u1-"))
    assert "User: 25-year-old female writer." in e.prefix  # user 1: age 25, "F", writer
    no_year = [e for e in ex["train"] + ex["val"] + ex["test"] if "-i7-" in e.id]
    assert no_year and all("Candidate: Movie G 7, Documentary." in e.suffix for e in no_year)
    assert len({e.id for s in SPLITS for e in ex[s]}) == sum(len(ex[s]) for s in SPLITS)


# --------------------------------------------------------------------------- groups, determinism, subsample


@pytest.mark.parametrize("split", ["val", "test"])
def test_heldout_candidates_share_one_prefix_per_user(ml_synth, split):
    examples = movielens_examples(split, data_dir=ml_synth.dir)
    prefixes = defaultdict(set)
    for e in examples:
        prefixes[e.group].add(e.prefix)
    assert sorted(prefixes) == [f"u{u}-{split}" for u in range(1, 7)]
    assert all(len(p) == 1 for p in prefixes.values())
    assert len({next(iter(p)) for p in prefixes.values()}) == 6  # and users' prefixes differ


def test_examples_deterministic_and_independent_of_file_order(ml_synth, tmp_path):
    first = {s: movielens_examples(s, data_dir=ml_synth.dir) for s in SPLITS}
    assert first == {s: movielens_examples(s, data_dir=ml_synth.dir) for s in SPLITS}
    shuffled = list(ml_synth.ratings)
    random.Random(1).shuffle(shuffled)
    d2 = write_movielens(tmp_path / "shuffled", ml_synth.users, ml_synth.items, shuffled)
    assert first == {s: movielens_examples(s, data_dir=d2) for s in SPLITS}


def test_unknown_split(ml_synth):
    with pytest.raises(SlimlmError, match="'dev'"):
        movielens_examples("dev", data_dir=ml_synth.dir)


def _groups_of(examples):
    g = defaultdict(list)
    for e in examples:
        g[e.group].append(e)
    return g


def test_subsample_seeded_and_bounded(ml_synth):
    examples = movielens_examples("test", data_dir=ml_synth.dir, cfg=SplitConfig(test_per_user=3))
    assert subsample(examples, None) == examples and subsample(examples, len(examples)) == examples
    picks = {seed: subsample(examples, 9, seed) for seed in range(6)}
    for seed, pick in picks.items():
        assert pick == subsample(examples, 9, seed)
        assert len(pick) <= 9 and all(e in examples for e in pick)
        assert len({e.id for e in pick}) == len(pick)
    assert len({tuple(e.id for e in p) for p in picks.values()}) > 1  # the seed matters
    assert movielens_examples("test", data_dir=ml_synth.dir, cfg=SplitConfig(test_per_user=3),
                              limit=9, seed=3) == picks[3]


def test_subsample_keeps_whole_groups(ml_synth):
    examples = movielens_examples("test", data_dir=ml_synth.dir, cfg=SplitConfig(test_per_user=3))
    full = _groups_of(examples)
    for seed in range(4):
        pick = subsample(examples, 7, seed)  # groups of 3: at most two whole groups fit
        assert len(pick) <= 7
        for g, members in _groups_of(pick).items():
            assert members == full[g], (seed, g)


# --------------------------------------------------------------------------- malformed files


def test_non_integer_user_id_names_file_line_and_field(ml_synth):
    path = ml_synth.dir / "ml-100k.inter"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = "abc" + lines[2][lines[2].index("\t"):]  # line 3 of the file
    path.write_text("".join(lines))
    with pytest.raises(SlimlmError) as e:
        load_movielens(ml_synth.dir)
    assert "ml-100k.inter:3" in str(e.value) and "user_id" in str(e.value) and "'abc'" in str(e.value)


def test_bad_float_rating(ml_synth):
    path = ml_synth.dir / "ml-100k.inter"
    lines = path.read_text().splitlines(keepends=True)
    cols = lines[5].split("\t")
    cols[2] = "four"
    lines[5] = "\t".join(cols)
    path.write_text("".join(lines))
    with pytest.raises(SlimlmError, match=r"ml-100k\.inter:6: field 'rating'"):
        load_movielens(ml_synth.dir)


@pytest.mark.parametrize(("name", "header", "field"), [
    ("ml-100k.inter", "user_id:token\titem_id:token\ttimestamp:float", "rating"),
    ("ml-100k.user", "user_id:token\tage:token\tgender:token\tzip_code:token", "occupation"),
    ("ml-100k.item", "item_id:token\tmovie_title:token_seq\tclass:token_seq", "release_year"),
])
def test_header_missing_a_field(ml_synth, name, header, field):
    path = ml_synth.dir / name
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(header + "\n" + "".join(lines[1:]))
    with pytest.raises(SlimlmError) as e:
        load_movielens(ml_synth.dir)
    assert f"'{field}'" in str(e.value) and f"{name}:1" in str(e.value)


def test_unknown_item_id(ml_synth):
    path = ml_synth.dir / "ml-100k.inter"
    lines = path.read_text().splitlines(keepends=True)
    lines.insert(4, "1\t999\t3\t880000000\n")  # line 5
    path.write_text("".join(lines))
    with pytest.raises(SlimlmError, match=r"ml-100k\.inter:5: field 'item_id'"):
        load_movielens(ml_synth.dir)


def test_unknown_id_line_number_after_blank_line(ml_synth):
    path = ml_synth.dir / "ml-100k.inter"
    lines = path.read_text().splitlines(keepends=True)
    lines[2:2] = ["\n", "1\t999\t3\t880000000\n"]  # blank line 3, bad row on line 4
    path.write_text("".join(lines))
    with pytest.raises(SlimlmError, match=r"ml-100k\.inter:4: field 'item_id'"):
        load_movielens(ml_synth.dir)


def test_missing_file(ml_synth):
    (ml_synth.dir / "ml-100k.item").unlink()
    with pytest.raises(SlimlmError, match=r"ml-100k\.item"):
        load_movielens(ml_synth.dir)


def test_synthetic_data_has_what_the_tests_need():
    users, items, ratings = synth_movielens()
    per_user = Counter(r.user for r in ratings)
    assert sorted(per_user.values()) == [3] + [12] * 6
    ties = Counter((r.user, r.timestamp) for r in ratings)
    assert max(ties.values()) >= 2  # some same-second ratings, so the tie-break matters


# --------------------------------------------------------------------------- the real MovieLens-100K (slow)


@pytest.mark.slow
def test_real_movielens_splits_and_tokenization():
    from slimlm.assets import movielens_dir, teacher_dir
    from slimlm.loading import load_tokenizer
    from slimlm.tasks.ranking import tokenize_ranking

    ml = load_movielens(movielens_dir())
    assert (len(ml.users), len(ml.items), len(ml.ratings)) == (943, 1682, 100_000)
    rows = build_rows(ml)
    for split in ("val", "test"):
        assert len({r.user.id for r in rows[split]}) == 943
        assert len(rows[split]) == 2 * 943
    assert len(rows["train"]) == 100_000 - 4 * 943

    tok = load_tokenizer(teacher_dir())
    examples = to_examples(rows["test"], ml.items)
    tokenized = tokenize_ranking(examples, tok)
    whole = tok([e.prompt for e in examples]).input_ids
    mismatched = [e.id for e, t, w in zip(examples, tokenized, whole, strict=True) if list(t.input_ids) != w]
    assert mismatched == []
    assert [t.id for t in tokenized] == [e.id for e in examples]


# --------------------------------------------------------------------------- multi-item groups (no leakage)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_a_group_prompt_never_sees_the_group_s_own_or_later_ratings(ml_synth, k):
    """Oracle: for every train row, rewriting its own rating and every later rating of its user (to any
    other star value) leaves its prompt unchanged; the group shares one prefix drawn at its first row."""
    ml = load_movielens(ml_synth.dir)
    cfg = SplitConfig(candidates_per_prefix=k)
    rows = build_rows(ml, cfg)
    base = {e.id: e for e in _examples(ml, cfg)["train"]}
    rng = random.Random(k)
    by_user = defaultdict(list)
    for r in rows["train"]:
        by_user[r.user.id].append(r)
    checked = 0
    for uid, urows in by_user.items():
        for r in urows[:: max(1, len(urows) // 3)]:  # a few rows per user: each is a full rebuild
            later = {(x.user, x.item): float(rng.choice([s for s in range(1, 6) if s != x.stars]))
                     for x in ml.ratings if x.user == uid and (x.timestamp, x.item) >= (r.timestamp, r.item.id)}
            changed = {e.id: e for e in _examples(_with_stars(ml, later), cfg)["train"]}
            eid = next(e for e in base if e.startswith(f"train-u{uid}-i{r.item.id}-"))
            assert (changed[eid].prefix, changed[eid].suffix) == (base[eid].prefix, base[eid].suffix), eid
            checked += 1
    assert checked > 10
    # candidates of one group share the prefix exactly, groups hold at most k consecutive ratings
    groups = defaultdict(list)
    for e in base.values():
        groups[e.group].append(e)
    assert max(len(g) for g in groups.values()) == k
    assert all(len({e.prefix for e in g}) == 1 for g in groups.values())
    assert len(groups) < len(base)


def test_groups_of_one_are_today_s_rows(ml_synth):
    ml = load_movielens(ml_synth.dir)
    assert _examples(ml, SplitConfig(candidates_per_prefix=1)) == _examples(ml)
    grouped = _examples(ml, SplitConfig(candidates_per_prefix=4))
    assert grouped["val"] == _examples(ml)["val"] and grouped["test"] == _examples(ml)["test"]
