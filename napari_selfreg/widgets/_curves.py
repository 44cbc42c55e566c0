"""The Fine-tune widget's live plot: loss per iteration and Dice on the reviewed voxels."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..training.metrics import mean_foreground


class Curves(QWidget):
    """Live loss (left axis, raw and smoothed) and Dice on the reviewed voxels (right axis) per iteration."""

    SMOOTH = 0.8  # weight of the past in the exponential moving average of the loss

    def __init__(self) -> None:
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        fg, grid, bg = "#d0d0d0", "#555555", "#262930"
        self.figure = Figure(figsize=(3.6, 2.4), dpi=100, facecolor=bg)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200)
        self.loss_ax = self.figure.add_subplot(111)
        self.dice_ax = self.loss_ax.twinx()
        for ax in (self.loss_ax, self.dice_ax):
            ax.set_facecolor(bg)
            ax.tick_params(colors=fg, labelsize=7)
            for spine in ax.spines.values():
                spine.set_color(grid)
        self.loss_ax.set_xlabel("iteration", color=fg, fontsize=8)
        self.loss_ax.set_ylabel("loss", color="#f58231", fontsize=8)
        self.dice_ax.set_ylabel("Dice on reviewed voxels", color="#3cb44b", fontsize=8)
        self.dice_ax.set_ylim(0, 1)
        self.loss_ax.grid(True, color=grid, lw=0.5)
        self.loss_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        (self.raw_line,) = self.loss_ax.plot([], [], color="#f58231", lw=0.7, alpha=0.35)
        (self.loss_line,) = self.loss_ax.plot([], [], color="#f58231", lw=1.6, label="loss")
        (self.dice_line,) = self.dice_ax.plot(
            [], [], "o-", color="#3cb44b", lw=1.4, ms=4, label="Dice, reviewed voxels"
        )
        self.figure.tight_layout(pad=0.6)
        box = QVBoxLayout(self)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self.canvas)
        self.clear()

    def clear(self) -> None:
        """Forget the curves (a new run starts)."""
        self.loss: list[tuple[int, float]] = []
        self.smooth: list[float] = []
        self.dice: list[tuple[int, float]] = []
        self.redraw()

    def add(self, event: Any) -> None:
        """Take one progress event: training iterations add loss points, validations Dice
        points; the predictor's events inside fine-tuning are not plotted."""
        if not hasattr(event, "losses"):
            return
        if event.kind == "iteration" and "total" in event.losses:
            value = float(event.losses["total"])
            self.loss.append((event.iteration, value))
            last = self.smooth[-1] if self.smooth else value
            self.smooth.append(self.SMOOTH * last + (1 - self.SMOOTH) * value)
        elif event.kind in ("validation", "done"):
            score = mean_foreground_dice(event.dice)
            if score is None:
                return
            self.dice.append((event.iteration, score))
        else:
            return
        self.redraw()

    def redraw(self) -> None:
        """Update the lines and rescale the axes (drawn when Qt is idle)."""
        x = [i for i, _ in self.loss]
        self.raw_line.set_data(x, [v for _, v in self.loss])
        self.loss_line.set_data(x, self.smooth)
        self.dice_line.set_data([i for i, _ in self.dice], [v for _, v in self.dice])
        self.loss_ax.relim()
        self.loss_ax.autoscale_view()
        if x:
            self.loss_ax.set_xlim(0, max(x[-1], 1))
        self.dice_ax.set_ylim(0, 1)
        self.canvas.draw_idle()


def mean_foreground_dice(dice: dict[str, float | None]) -> float | None:
    """:func:`training.metrics.mean_foreground` of Dice by class name, background first
    (None when no other class is known)."""
    values = list(dice.values())
    return mean_foreground(values) if any(v is not None for v in values[1:]) else None
