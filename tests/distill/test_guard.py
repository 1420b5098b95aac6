"""The divergence guard against hand-computed medians: non-finite values, spikes, warm-up, off switch."""

from __future__ import annotations

import math

import torch

from slimlm.distill.guard import WINDOW, divergence, nonfinite_count, remember


def test_non_finite_values_always_stop():
    for value in (math.nan, math.inf, -math.inf):
        assert divergence({}, "kd.loss", value, None, 10) == f"loss is {value}"
    assert divergence({}, "sft.grad_norm", math.inf, 0.0, 10) == "grad norm is inf"


def test_a_spike_is_a_factor_over_the_running_median_of_its_own_key():
    history = {"kd.loss": [1.0, 3.0, 2.0, 100.0, 2.5]}  # median 2.5: one outlier does not move it
    assert divergence(history, "kd.loss", 25.0, 10.0, 5) is None  # exactly 10x is not over
    assert divergence(history, "kd.loss", 25.01, 10.0, 5) == "loss 25.01 is over 10x its running median 2.5"
    assert divergence(history, "kd.loss", 25.01, 10.0, 6) is None  # warm-up: 5 values known, 6 needed
    assert divergence(history, "kd.loss", 1e9, 0.0, 1) is None and divergence(history, "kd.loss", 1e9, None, 1) is None
    assert divergence(history, "on_policy.loss", 1e9, 10.0, 1) is None  # another mode has its own history
    assert divergence({"kd.loss": [0.0] * 5}, "kd.loss", 1.0, 10.0, 1) is None  # a zero median: no spike


def test_remember_keeps_the_last_window():
    history: dict = {}
    for i in range(WINDOW + 7):
        remember(history, "kd.grad_norm", float(i))
    assert history == {"kd.grad_norm": [float(i) for i in range(7, WINDOW + 7)]}


def test_nonfinite_count():
    a = torch.tensor([1.0, math.nan, math.inf, -math.inf, 0.0])
    assert nonfinite_count([a, torch.ones(3, 2), a[:2]]) == 4
    assert nonfinite_count([torch.zeros(4)]) == 0
