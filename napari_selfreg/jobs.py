"""Long jobs are generators: they yield progress events and return their result.

napari's ``thread_worker`` runs such a generator directly (progress, cancel at a
yield, ``returned``); scripts, the CLI and tests run it with :func:`drain`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

Result = TypeVar("Result")


def drain(
    job: Generator[Any, Any, Result], callback: Callable[[Any], None] | None = None
) -> Result:
    """Run ``job`` to its end, passing each yielded event to ``callback``; return its result."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)
