"""The FMCHISEL-style greedy (OBS removal one group at a time, then a least-squares refit) against naive
references: brute force, the one-at-a-time rule evaluated from scratch, and slimlm's greedy with one
removal per step."""

from __future__ import annotations

import pytest
import torch
from test_osscar import brute_force, naive_fit, problem  # tests/prune is on sys.path (rootdir-less test dirs)

from slimlm.prune import baselines, osscar

pytestmark = pytest.mark.one_thread  # tiny tensors: see tests/conftest.py


def one_at_a_time(X, W, lam, m, keep, part=None):
    """Remove the group whose removal raises the exact objective least, one at a time, from scratch."""
    n_groups = W.shape[1] // m
    kept = set(range(n_groups))
    per = None if part is None else keep // len(torch.unique(part))
    while len(kept) > keep:
        f0 = naive_fit(X, W, lam, sorted(kept), m)[1] if len(kept) < n_groups else 0.0
        allowed = [g for g in kept if part is None or sum(int(part[k]) == int(part[g]) for k in kept) > per]
        kept.remove(min(allowed, key=lambda g: naive_fit(X, W, lam, sorted(kept - {g}), m)[1] - f0))
    return sorted(kept)


@pytest.mark.parametrize("n_groups,m,out,keep", [(8, 1, 4, 3), (7, 2, 3, 4), (6, 3, 5, 2), (9, 1, 1, 5)])
def test_fmchisel_greedy_against_references(n_groups, m, out, keep):
    for seed in range(4):
        X, W = problem(n_groups, m, out, seed=700 + seed, N=3 * n_groups * m, corr=1.5)
        G, lam = osscar.damped(X.T @ X, 0.01)
        res = baselines.fmchisel_greedy(X.T @ X, W, m, keep, block=3)
        assert len(res.kept) == keep and res.kept == sorted(res.kept)
        # its refit is the exact least-squares solution for its kept set
        Wk, f = naive_fit(X, W, lam, res.kept, m)
        torch.testing.assert_close(res.weight, Wk, rtol=1e-7, atol=1e-9)
        assert res.objective == pytest.approx(f, rel=1e-8)
        assert res.objective_greedy == pytest.approx(f, rel=1e-7)  # the summed removal costs are exact
        # it need not be optimal, but it can't beat the optimum
        assert res.objective >= brute_force(X, W, lam, n_groups, m, keep)[0] * (1 - 1e-9)
        # the same choices as the rule evaluated from scratch, and as slimlm's greedy with one group per step
        assert res.kept == one_at_a_time(X, W, lam, m, keep)
        assert res.kept == osscar.solve(X.T @ X, W, m, keep, local=False, steps=n_groups - keep).kept


@pytest.mark.parametrize("m", [1, 2])
def test_fmchisel_greedy_blocks_partitions_and_float32(m):
    """Lazy blocks of any size give the same choices as block = 1 (explicit downdates); partitions keep equal
    counts (and match the from-scratch rule); float32 keeps the float64 refit."""
    n_groups, keep = 24, 12
    part = torch.arange(n_groups) // 6
    X, W = problem(n_groups, m, 6, seed=31 + m, N=4 * n_groups * m, corr=1.2)
    H = X.T @ X
    one = baselines.fmchisel_greedy(H, W, m, keep, block=1)
    for block in (2, 5, 64):
        assert baselines.fmchisel_greedy(H, W, m, keep, block=block).kept == one.kept
    parted = baselines.fmchisel_greedy(H, W, m, keep, part=part, block=5)
    assert torch.bincount(part[parted.kept], minlength=4).tolist() == [3, 3, 3, 3]
    _, lam = osscar.damped(H, 0.01)
    assert parted.kept == one_at_a_time(X, W, lam, m, keep, part)
    f32 = baselines.fmchisel_greedy(H, W.float(), m, keep, dtype=torch.float32)
    assert f32.weight.dtype == torch.float64
    assert f32.objective == pytest.approx(one.objective, rel=1e-4)


def test_fmchisel_greedy_keeps_everything_unchanged():
    X, W = problem(5, 2, 3, seed=1)
    res = baselines.fmchisel_greedy(X.T @ X, W.float(), 2, 5)
    assert res.kept == [0, 1, 2, 3, 4] and res.objective == 0.0 and torch.equal(res.weight.float(), W.float())
