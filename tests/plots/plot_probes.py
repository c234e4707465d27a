"""What the plot tests read off a Figure, and the sample numbers they draw (a helper: no tests)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

MIB = 2**20


def breakdown(parameters: int, gradients: int, optimizer: int, activations: int) -> dict[str, int]:
    """A memory breakdown with an extra key that the plots must ignore."""
    return {
        "parameters": parameters,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "other": 123_456_789,
    }


FULL = breakdown(4 * MIB, 4 * MIB, 8 * MIB, 6 * MIB)


LORA = breakdown(4 * MIB, MIB // 4, MIB // 2, 6 * MIB)


def main_axes(fig: Figure):
    """The first Axes: the plot itself (a colorbar, if any, comes after)."""
    return fig.axes[0]


def texts(fig: Figure) -> list[str]:
    """Every text drawn on any Axes of the figure."""
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def assert_labelled(fig: Figure, unit: str | None = None) -> None:
    """A Figure with a title, both axis labels and, when given, the unit in the y label."""
    assert isinstance(fig, Figure)
    ax = main_axes(fig)
    assert ax.get_title()
    assert ax.get_xlabel()
    assert ax.get_ylabel()
    if unit is not None:
        assert unit in ax.get_ylabel()


def bar_heights(ax) -> list[float]:
    """Heights of the bars drawn on an Axes, in drawing order."""
    return [patch.get_height() for patch in ax.patches]


def lines_with_data(ax) -> list:
    """Lines that plot data (not axhline references)."""
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 2]


RUNS = [
    {"learned": 0.5, "rank": 4, "replay": 0.0, "source_accuracy": 0.3, "source_loss": 2.0},
    {"learned": 0.7, "rank": 4, "replay": 0.05, "source_accuracy": 0.8, "source_loss": 1.0},
    {"learned": 0.8, "rank": 16, "replay": 0.0, "source_accuracy": 0.2, "source_loss": 3.0},
    {"learned": 0.9, "rank": None, "replay": 0.0, "source_accuracy": 0.05, "source_loss": 5.0},
    {"learned": 0.95, "rank": None, "replay": 0.05, "source_accuracy": 0.6, "source_loss": 1.5},
]


def drawn_points(ax) -> np.ndarray:
    """Display coordinates of what an Axes shows: line vertices and points along each segment,
    scatter points, and the corners and centres of bars, inside the Axes only."""
    points = []
    for line in ax.get_lines():
        xy = line.get_transform().transform(np.asarray(line.get_xydata(), dtype=float))
        xy = xy[np.isfinite(xy).all(axis=1)]
        points.append(xy)
        for a, b in zip(xy[:-1], xy[1:], strict=True):  # a segment can cross with no vertex in
            points.append(a + np.linspace(0, 1, 25)[:, None] * (b - a))
    for collection in ax.collections:
        offsets = np.asarray(collection.get_offsets(), dtype=float)
        if len(offsets):
            points.append(collection.get_offset_transform().transform(offsets))
    for patch in ax.patches:
        box = patch.get_window_extent()
        xs = np.linspace(box.x0, box.x1, 5)
        ys = np.linspace(box.y0, box.y1, 5)
        points.append(np.array([(x, y) for x in xs for y in ys]))
    xy = np.concatenate([p for p in points if len(p)]) if points else np.empty((0, 2))
    inside = ax.get_window_extent()
    keep = (
        (xy[:, 0] >= inside.x0)
        & (xy[:, 0] <= inside.x1)
        & (xy[:, 1] >= inside.y0)
        & (xy[:, 1] <= inside.y1)
    )
    return xy[keep]


def assert_clear_of_data(fig: Figure) -> None:
    """No legend covers a drawn curve, point or bar, and every legend lies inside the Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    page = fig.bbox
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    for legend in legends:
        box = legend.get_window_extent()
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, "a legend runs off the Figure"
        assert page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, "a legend runs off the Figure"
        for ax in fig.axes:
            xy = drawn_points(ax)
            covered = (
                (xy[:, 0] > box.x0)
                & (xy[:, 0] < box.x1)
                & (xy[:, 1] > box.y0)
                & (xy[:, 1] < box.y1)
            )
            assert not covered.any(), f"the legend covers {int(covered.sum())} drawn points"
