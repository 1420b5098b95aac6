"""The one progress-callback shape every long stage reports through.

A stage calls ``progress(what, done, total)`` as it goes: ``what`` names the part running now (a layer,
"calibration", "solver"), ``done`` of ``total`` units are finished. The CLI draws one bar per ``what``;
library callers pass ``None`` for silence. Callbacks that are not progress (a status line, a count of
items just finished) have their own names where they are used.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def silent(_what: str, _done: int, _total: int) -> None:
    """A :data:`Progress` that draws nothing."""
