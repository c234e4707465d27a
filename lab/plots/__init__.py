"""Plots for the lab: pure functions, plain numbers in, a matplotlib Figure out.

Figures are built with `matplotlib.figure.Figure`, never pyplot, so a notebook shows each one
exactly once (as a cell's last expression, or through `display(fig)`) and a widget can redraw
without global state. Nothing here knows about torch or training.

One module per kind of plot: cost_plots (parameters and memory), training_plots (loss and
accuracy), spectra_plots (why low rank works), practice_plots (learning rate and forgetting),
timing_plots (deployment); figures holds what they share (palette, labels, legend, PNG bytes).

Colours are the Okabe-Ito palette (safe for colour-blind readers) and every series also differs by
line style, marker or hatch, so the plots still read when printed in grayscale. A function given no
data returns a Figure that says "no results yet", so widgets can draw before anything is trained.
"""

from .cost_plots import cost_comparison, memory_breakdown, memory_vs_rank, trainable_vs_rank
from .figures import CATEGORIES, FIGSIZE, NO_RESULTS, savefig_bytes  # noqa: F401 (FIGSIZE: lab.widgets)
from .practice_plots import accuracy_vs_lr, learn_forget
from .spectra_plots import energy_captured, singular_values, update_size_vs_rank
from .timing_plots import timings
from .training_plots import accuracy_heatmap, dropout_effect, loss_curves

__all__ = [
    "CATEGORIES",
    "NO_RESULTS",
    "accuracy_heatmap",
    "accuracy_vs_lr",
    "cost_comparison",
    "dropout_effect",
    "energy_captured",
    "learn_forget",
    "loss_curves",
    "memory_breakdown",
    "memory_vs_rank",
    "savefig_bytes",
    "singular_values",
    "timings",
    "trainable_vs_rank",
    "update_size_vs_rank",
]
