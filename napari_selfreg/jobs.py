"""Long jobs are generators: they yield :class:`Progress` events and return their result.

One protocol for the predictor, the feature inspector, training and fine-tuning:
napari's ``thread_worker`` runs such a generator directly (progress, cancel at a
yield, ``returned``); scripts, the CLI and tests run it with :func:`drain`. A step
inside a job that is itself long (a whole-volume prediction inside fine-tuning) is
a generator too and is run with ``yield from``, so its progress shows and the job
can be cancelled there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

Result = TypeVar("Result")


@dataclass
class Progress:
    """One progress event: ``done`` of ``total`` units of ``stage``, and a message.

    Stages of the predictor: ``prepare``, ``tiles``, ``fallback``, ``finish``; of the
    inspector: ``features``, ``statistics``, ``pca``, ``grad-cam``, ``finish``; of
    training (:class:`~napari_selfreg.training.TrainEvent`, which adds losses and
    Dice): ``iteration``, ``validation``, ``checkpoint``, ``message``, ``done``.
    ``total`` 0 means "not known yet".
    """

    done: int = 0
    total: int = 0
    stage: str = ""
    message: str = ""


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


class TimeLeft:
    """Estimates the time left of a stage from its rate so far (``None`` until it can).

    The estimate starts after the stage has done ``min_done`` units and ``min_seconds``
    passed (the first tiles include loading and warm-up), and restarts when the stage
    or its total changes.
    """

    def __init__(self, min_done: int = 2, min_seconds: float = 2.0, clock=time.monotonic):
        self.min_done, self.min_seconds, self.clock = min_done, min_seconds, clock
        self._key: tuple | None = None
        self._start = (0.0, 0)

    def update(self, event: Progress) -> float | None:
        """Seconds left in ``event``'s stage, or None."""
        if not event.total:
            return None
        key = (event.stage if event.stage != "validation" else "iteration", event.total)
        now = self.clock()
        if key != self._key:
            self._key, self._start = key, (now, event.done)
            return None
        t0, d0 = self._start
        done = event.done - d0
        if done < self.min_done or now - t0 < self.min_seconds:
            return None
        return max(0.0, (now - t0) / done * (event.total - event.done))


def format_seconds(seconds: float) -> str:
    """``'45 s'``, ``'3 min 05 s'``, ``'1 h 02 min'``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressPrinter:
    """The CLI's view of a job: a bar on a terminal, plain lines in a log or pipe.

    On a terminal it redraws one line (done / total, time left, the loss terms of
    training). Elsewhere it writes a line when a stage starts and at every 10 %,
    never carriage returns. Events with a message (a stage starting, a validation, a
    fallback) get a line of their own.
    """

    HIDDEN = ("seg",)  # = ce + dice, shown as those two

    def __init__(self, label: str = "", quiet: bool = False, stream=None):
        self.label, self.quiet = label, quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.eta = TimeLeft()
        self._last: tuple[str, int] = ("", -1)  # stage, tenth printed
        self._said = ""
        self._open = False

    def __call__(self, event: Progress) -> None:
        if self.quiet:
            return
        stage = event.stage
        if stage == "checkpoint" and not event.message:  # a file written: nothing to show
            return
        if event.message:  # a sentence of its own (stage starts, validations, fallbacks)
            text = self._describe(event)
            if text != self._said:
                self._said = text
                self._line(text)
            return
        if not event.total:
            return
        left = self.eta.update(event)
        text = f"{self.label + ': ' if self.label else ''}{stage} {event.done}/{event.total}"
        if left is not None:
            text += f", {format_seconds(left)} left"
        losses = getattr(event, "losses", None)
        if losses:
            text += "  " + " ".join(
                f"{k} {v:.3f}" for k, v in losses.items() if k not in self.HIDDEN
            )
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._open = True
            if event.done >= event.total:
                self._end_line()
            return
        tenth = 10 * event.done // event.total
        if (stage, tenth) != self._last and (stage != self._last[0] or tenth > self._last[1]):
            self._last = (stage, tenth)
            self._line(text)

    def _describe(self, event: Progress) -> str:
        if event.stage == "validation":
            dice = getattr(event, "dice", {}) or {}
            scores = ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if v is not None)
            return f"[{event.done}] validation Dice: {scores} - {event.message}"
        return f"{self.label}: {event.message}" if self.label else event.message

    def _line(self, text: str) -> None:
        if not text:
            return
        self._end_line()
        self.stream.write(text + "\n")
        self.stream.flush()

    def _end_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False

    def close(self) -> None:
        """Finish an open terminal line."""
        self._end_line()
        self.stream.flush()
