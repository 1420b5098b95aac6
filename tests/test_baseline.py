"""The classic baseline: features computed by hand on a synthetic MovieLens, and a full fit/eval run."""

from __future__ import annotations

import numpy as np
import pytest

from slimlm.baseline import features, run_baseline
from slimlm.tasks.movielens import GENRES, SplitConfig, build_rows, load_movielens


def test_features_by_hand(ml_synth):
    ml = load_movielens(ml_synth.dir)
    rows = build_rows(ml, SplitConfig(val_per_user=2, test_per_user=2, history=3))
    occupations = sorted({u.occupation for u in ml.users.values()})
    row = rows["test"][0]
    x = features([row], ml, occupations)[0]
    hist = [h.stars for h in row.history]
    same = [h.stars for h in row.history if set(row.item.genres) & set(ml.items[h.item].genres)]
    assert x[0] == row.user.age and x[1] == float(row.user.gender == "F")
    assert x[2] == occupations.index(row.user.occupation)
    assert x[3] == row.user_agg.count and x[4] == pytest.approx(row.user_agg.mean)
    assert x[5] == pytest.approx(row.user_agg.like_rate) and x[6] == row.item.year
    assert x[7] == row.item_agg.count and x[8] == pytest.approx(row.item_agg.mean)
    assert x[9] == pytest.approx(row.item_agg.like_rate)
    assert x[10] == pytest.approx(np.mean(hist))
    assert x[12] == len(same) == 0 and np.isnan(x[11])  # no same-genre history -> NaN, not 0
    row2 = rows["test"][2]  # one with same-genre history
    same2 = [h.stars for h in row2.history if set(row2.item.genres) & set(ml.items[h.item].genres)]
    x2 = features([row2], ml, occupations)[0]
    assert same2 and x2[11] == pytest.approx(np.mean(same2)) and x2[12] == len(same2)
    genres = x[13:]
    assert genres.sum() == len(row.item.genres)
    assert all(genres[GENRES.index(g)] == 1 for g in row.item.genres)
    first_train = next(r for r in rows["train"] if r.position == 0)  # nothing known yet -> NaN, not 0
    xf = features([first_train], ml, occupations)[0]
    assert xf[3] == 0 and np.isnan(xf[4]) and np.isnan(xf[10])


@pytest.mark.parametrize("model", ["logistic", "gbdt"])
def test_baseline_runs_on_synthetic_data(ml_synth, model):
    result = run_baseline(model, "test", data_dir=ml_synth.dir, cfg=SplitConfig(val_per_user=3, test_per_user=3))
    assert result["n"] == 3 * (len(ml_synth.users) - 1)  # the short user keeps all ratings in train
    assert 0.0 <= result["auc"] <= 1.0 and result["train_rows"] > 0


@pytest.mark.slow
def test_baseline_beats_chance_on_movielens():
    result = run_baseline("logistic", "val")
    assert result["n"] == 1886
    assert result["auc_ci95"][0] > 0.6  # a real, not accidental, signal
