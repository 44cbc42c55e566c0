"""The one progress protocol: events, time left, and the CLI's printer on terminals and in logs."""

import io

from napari_selfreg.jobs import Progress, ProgressPrinter, TimeLeft, drain, format_seconds
from napari_selfreg.training.config import TrainEvent


def job():
    yield Progress(0, 0, "prepare", "checking the input")
    for i in range(1, 201):
        yield Progress(i, 200, "tiles")
    yield Progress(200, 200, "finish", "writing")
    return "result"


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_printer_writes_lines_in_a_log_and_one_redrawn_line_on_a_terminal():
    log = io.StringIO()
    assert drain(job(), ProgressPrinter("scan.nii", stream=log)) == "result"
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "scan.nii: checking the input"
    tiles = [ln for ln in lines if " tiles " in ln]
    assert 10 <= len(tiles) <= 11 and tiles[-1].startswith("scan.nii: tiles 200/200")
    tty = Tty()
    printer = ProgressPrinter("scan.nii", stream=tty)
    drain(job(), printer)
    printer.close()
    assert tty.getvalue().count("\r") == 200 and tty.getvalue().endswith("scan.nii: writing\n")


def test_training_events_are_progress_with_losses_and_dice():
    event = TrainEvent(5, 10, "iteration", losses={"total": 1.5, "seg": 1.0, "scr": 0.5})
    assert isinstance(event, Progress) and event.kind == "iteration" and event.iteration == 5
    log = io.StringIO()
    printer = ProgressPrinter("train", stream=log)
    printer(event)
    printer(TrainEvent(10, 10, "validation", dice={"a": 0.5}, message="mean 0.5"))
    printer(TrainEvent(10, 10, "checkpoint"))
    text = log.getvalue()
    assert "total 1.500" in text and "scr 0.500" in text and "seg" not in text
    assert "[10] validation Dice: a 0.500 - mean 0.5" in text and "checkpoint" not in text


def test_time_left_from_the_rate_of_the_current_stage():
    now = [0.0]
    eta = TimeLeft(min_done=2, min_seconds=1.0, clock=lambda: now[0])
    assert eta.update(Progress(0, 10, "tiles")) is None  # the stage starts
    now[0] = 2.0
    assert eta.update(Progress(2, 10, "tiles")) == 8.0  # 1 s per tile, 8 to go
    now[0] = 3.0
    assert eta.update(Progress(1, 5, "other")) is None  # a new stage restarts the estimate
    assert format_seconds(45) == "45 s" and format_seconds(185) == "3 min 05 s"
    assert format_seconds(3720) == "1 h 02 min"
