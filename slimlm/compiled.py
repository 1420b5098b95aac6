"""``torch.compile`` with an eager fallback, for the pure tensor functions slimlm compiles (the per-chunk loss).

Compiling needs a working inductor backend (a C++ compiler on CPU, Triton on CUDA); where it is missing or
fails, the function runs eagerly with the same results and one warning says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


class Compiled:
    """``fn`` through ``torch.compile(fn, **options)``; on the first failure (compiling is lazy, so it shows
    at a call) one warning naming ``what``, and ``fn`` itself from then on. Keep one instance per use for the
    life of a run: it holds the compiled graphs."""

    def __init__(self, fn: Callable, what: str, **options):
        self.fn, self.what = fn, what
        self._compiled: Callable | None = None
        try:
            self._compiled = torch.compile(fn, **options)
        except Exception as e:  # noqa: BLE001 - no backend here: the eager function gives the same results
            self._failed(e)

    @property
    def active(self) -> bool:
        """Whether calls run compiled (False after a fallback)."""
        return self._compiled is not None

    def _failed(self, e: Exception) -> None:
        self._compiled = None
        warnings.warn(f"torch.compile of {self.what} failed ({type(e).__name__}: {str(e)[:200]}); running it "
                      "without compiling (same results)", RuntimeWarning, stacklevel=3)

    def __call__(self, *args, **kwargs):
        if self._compiled is not None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the eager call below computes the same thing
                self._failed(e)
        return self.fn(*args, **kwargs)
