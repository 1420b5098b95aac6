"""The classic (non-LLM) reference for the MovieLens ranking task.

A scikit-learn model on the same :class:`~slimlm.tasks.movielens.Row` objects the prompts are made of,
so it sees exactly the information the LLM sees (profile, history, train-split aggregates) and nothing
more: every AUC in the project has a non-LLM number beside it on the same split.

Features per row: age, gender, occupation (categorical); the user's count / mean / like-rate so far;
the item's release year, genres (multi-hot) and train count / mean / like-rate (leave-one-out for
train rows); from the history: mean stars, like-rate, and the mean stars and count of history movies
sharing a genre with the candidate.
"""

from __future__ import annotations

import time

import numpy as np

from slimlm import SlimlmError
from slimlm.evaluate import ranking_metrics
from slimlm.tasks.files import check_split
from slimlm.tasks.movielens import GENRES, MovieLens, Row, SplitConfig, build_rows, load_movielens

MODELS = ("gbdt", "logistic")


def _nan(x: float | None) -> float:
    return np.nan if x is None else float(x)


def features(rows: list[Row], ml: MovieLens, occupations: list[str]) -> np.ndarray:
    """[rows x features] float matrix (NaN = unknown; the GBDT handles it natively)."""
    occ = {o: i for i, o in enumerate(occupations)}
    g_index = {g: i for i, g in enumerate(GENRES)}
    out = np.empty((len(rows), 13 + len(GENRES)), dtype=np.float64)
    for r_i, r in enumerate(rows):
        cand = set(r.item.genres)
        hist = [h.stars for h in r.history]
        same = [h.stars for h in r.history if cand & set(ml.items[h.item].genres)]
        genres = np.zeros(len(GENRES))
        for g in r.item.genres:
            if g in g_index:
                genres[g_index[g]] = 1.0
        out[r_i] = [
            r.user.age, float(r.user.gender == "F"), occ.get(r.user.occupation, len(occ)),
            r.user_agg.count, _nan(r.user_agg.mean), _nan(r.user_agg.like_rate),
            _nan(r.item.year), r.item_agg.count, _nan(r.item_agg.mean), _nan(r.item_agg.like_rate),
            np.mean(hist) if hist else np.nan,
            np.mean(same) if same else np.nan, len(same),
            *genres,
        ]
    return out


def _impute(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    x = x.copy()
    idx = np.where(np.isnan(x))
    x[idx] = np.take(means, idx[1])
    return x


def baseline_predictions(model: str = "gbdt", split: str = "test", *, data_dir=None,
                         cfg: SplitConfig = SplitConfig(), seed: int = 0,
                         ml: MovieLens | None = None) -> tuple[list[Row], np.ndarray, int]:
    """Fit on the train split; return ``split``'s rows, P(like) for each, and the number of train rows.
    ``ml``: the data already loaded (else read from ``data_dir``)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model not in MODELS:  # both checked before any data is read
        raise SlimlmError(f"unknown baseline model {model!r}; expected one of {', '.join(MODELS)}")
    check_split(split)
    ml = load_movielens(data_dir) if ml is None else ml
    rows = build_rows(ml, cfg)
    occupations = sorted({u.occupation for u in ml.users.values()})
    x_tr, y_tr = features(rows["train"], ml, occupations), np.array([r.label for r in rows["train"]])
    x_ev = features(rows[split], ml, occupations)
    if len(set(y_tr.tolist())) < 2:
        raise SlimlmError(f"the train split has {len(y_tr)} rows of one class only: no baseline can be fitted")
    if model == "gbdt":
        clf = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=31,
                                             categorical_features=[2], early_stopping=True,
                                             validation_fraction=0.1, random_state=seed)
        clf.fit(x_tr, y_tr)
        p = clf.predict_proba(x_ev)[:, 1]
    else:  # logistic
        means = np.nanmean(x_tr, axis=0)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        clf.fit(_impute(x_tr, means), y_tr)
        p = clf.predict_proba(_impute(x_ev, means))[:, 1]
    return rows[split], p, len(y_tr)


def run_baseline(model: str = "gbdt", split: str = "test", *, data_dir=None, cfg: SplitConfig = SplitConfig(),
                 seed: int = 0) -> dict:
    """Fit on the train split, evaluate on ``split``; return metrics plus timing."""
    t0 = time.perf_counter()
    rows, p, train_rows = baseline_predictions(model, split, data_dir=data_dir, cfg=cfg, seed=seed)
    metrics = ranking_metrics([r.label for r in rows], p)
    metrics.update({"model": model, "split": split, "train_rows": train_rows,
                    "seconds": round(time.perf_counter() - t0, 2)})
    return metrics
