"""Dock layout: a vertical scroll area around each dock's rows, and word-wrapped lines
that re-fit it when their text grows (a dock taller than the window scrolls instead of
squeezing or clipping its rows)."""

from __future__ import annotations

from qtpy.QtCore import QEvent, QSize, QTimer
from qtpy.QtWidgets import QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget

MIN_DOCK_HEIGHT = 180  # px: about six rows; three docks in a column fit a 768-px screen


class _VerticalScroll(QScrollArea):
    """A scroll area that asks for its content's width plus its scroll bar's (a plain
    one asks for little, so the dock came out narrower than its rows)."""

    def _changed(self) -> None:
        self.updateGeometry()  # ask again, up to the dock around us
        if self.parentWidget() is not None:
            self.parentWidget().updateGeometry()

    def eventFilter(self, watched, event) -> bool:
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self._changed()  # the content's rows changed
        return super().eventFilter(watched, event)

    def refit(self) -> None:
        """Size the content to its rows again (setting the flag recomputes it)."""
        self.setWidgetResizable(True)

    def viewportEvent(self, event) -> bool:
        if event.type() == QEvent.Type.Resize:
            self._changed()  # the scroll bar came or went
        return super().viewportEvent(event)

    def _width(self, content_width: int) -> int:
        bar = self.verticalScrollBar()
        beside = bar.sizeHint().width() + 2 * self.frameWidth()
        if bar.isVisible():  # what the styled bar and its margins really take
            beside = max(beside, self.width() - self.viewport().width())
        return content_width + beside

    def minimumSizeHint(self) -> QSize:
        content = self.widget()
        # a few rows at least: a dock docked below others is not squeezed to two of them
        height = min(content.sizeHint().height(), MIN_DOCK_HEIGHT)
        height = max(height, super().minimumSizeHint().height())
        return QSize(self._width(content.minimumSizeHint().width()), height)

    def sizeHint(self) -> QSize:
        content = self.widget().sizeHint()
        return QSize(self._width(content.width()), content.height())


class WrappedLabel(QLabel):
    """A word-wrapped line whose new text re-fits the scroll area around it: a scroll
    area sizes its content once and misses a wrapped line growing by a row."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(text, parent)
        self.setWordWrap(True)

    def setText(self, text: str) -> None:
        super().setText(text)
        scroll = self.parentWidget()
        while scroll is not None and not isinstance(scroll, _VerticalScroll):
            scroll = scroll.parentWidget()
        if scroll is not None:  # once the layouts have the new height (posted events)
            QTimer.singleShot(0, scroll.refit)


def scrolling_layout(dock: QWidget) -> QVBoxLayout:
    """The layout for a dock's content, inside a vertical scroll area: a dock taller
    than the window scrolls instead of squeezing (and clipping) wrapped lines."""
    content = QWidget()
    scroll = _VerticalScroll()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setWidget(content)
    outer = QVBoxLayout(dock)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(scroll)
    return QVBoxLayout(content)
