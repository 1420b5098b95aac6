"""Tasks: each turns data into tokenizable examples (ranking, text, completion)."""

from __future__ import annotations

from pathlib import Path

from slimlm import SlimlmError

RANKING_TASKS = ("movielens-ranking", "ranking")


def load_ranking_task(name: str, data: str | Path | None, split: str, limit: int | None = None, seed: int = 0,
                      candidates_per_prefix: int = 1):
    """Ranking examples of ``split``: the built-in MovieLens task (``data`` = its directory, optional) or a
    user ranking file (``data`` required); at most ``limit``, as whole groups, seeded. ``candidates_per_prefix``:
    MovieLens train rows share a prefix in groups of this many consecutive ratings (see its module)."""
    from slimlm.tasks.movielens import SplitConfig, movielens_examples
    from slimlm.tasks.ranking import index_ranking_file

    if name == "movielens-ranking":
        return movielens_examples(split, data_dir=data, limit=limit, seed=seed,
                                  cfg=SplitConfig(candidates_per_prefix=candidates_per_prefix))
    if name != "ranking":
        raise SlimlmError(f"unknown ranking task {name!r}; expected one of {', '.join(RANKING_TASKS)}")
    if data is None:
        raise SlimlmError("task 'ranking' needs data: a .jsonl or .parquet file (schema in the README)")
    rows = index_ranking_file(data, split, limit, seed)  # only the chosen rows are read (and kept)
    return rows.examples(range(len(rows)))
