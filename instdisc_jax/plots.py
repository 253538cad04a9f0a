"""Pictures of a run, as PNG files: the nearest-neighbour retrieval grid (the paper's retrieval
figure), training loss against kNN accuracy (the paper's Fig. 4) and the Table-1 bar chart.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot, so nothing here touches global matplotlib state or needs a display. Every function
takes plain NumPy data and returns what it drew, so callers and tests can check the picture's
content without reading pixels back.
"""

from __future__ import annotations

import dataclasses
import math
import os
import textwrap
from typing import Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

SAME_CLASS = "#1a9641"        # frame of a neighbour of the query's class
OTHER_CLASS = "#d7191c"       # frame of a neighbour of another class
NO_LABEL = "#8c8c8c"          # frame when either label is unknown
QUERY = "#2b5fb4"             # frame of the query image
DPI = 100


def _new_figure(width_px: int, height_px: int) -> Figure:
  figure = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
  FigureCanvasAgg(figure)
  return figure


def _save(figure: Figure, path: str) -> None:
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  figure.savefig(path, dpi=DPI)


# ------------------------------------------------------------------------------------------------
# Retrieval grid.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GridLayout:
  """Pixel geometry of the retrieval grid: a header row, then one row per query.

  Each row holds the query, a gap, and the neighbours; every image sits in a square cell with a
  caption strip below it.
  """

  num_queries: int
  num_neighbors: int
  cell: int = 72          # side of an image cell, pixels
  caption: int = 14       # caption strip under each image, pixels
  header: int = 18        # column titles, pixels
  gap: int = 16           # between the query column and the neighbours, pixels

  @property
  def size(self) -> tuple[int, int]:
    """(width, height) of the PNG in pixels."""
    width = (self.num_neighbors + 1) * self.cell + self.gap
    height = self.header + self.num_queries * (self.cell + self.caption)
    return width, height

  def box(self, row: int, column: int) -> list[float]:
    """[left, bottom, width, height] of cell (row, column) in figure fractions; column 0 is
    the query."""
    width, height = self.size
    left = column * self.cell + (self.gap if column else 0)
    top = self.header + row * (self.cell + self.caption)
    pad = 3
    return [(left + pad) / width, 1 - (top + self.cell - pad) / height,
            (self.cell - 2 * pad) / width, (self.cell - 2 * pad) / height]


def _frame_colour(query_label: int, label: int) -> str:
  if query_label < 0 or label < 0:
    return NO_LABEL
  return SAME_CLASS if label == query_label else OTHER_CLASS


def _draw_cell(figure: Figure, box, image: np.ndarray, colour: str, caption: str,
               caption_colour: str) -> None:
  axes = figure.add_axes(box)
  if image.shape[-1] == 1:
    axes.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  else:
    axes.imshow(image, interpolation="nearest")
  axes.set_xticks([])
  axes.set_yticks([])
  for spine in axes.spines.values():
    spine.set_edgecolor(colour)
    spine.set_linewidth(3)
  axes.text(0.5, -0.04, caption, transform=axes.transAxes, ha="center", va="top", fontsize=6,
            color=caption_colour, clip_on=False)


def _name(label: int, class_names: Optional[Sequence[str]]) -> str:
  if label < 0:
    return ""
  if class_names is not None and label < len(class_names):
    return str(class_names[label])[:12]
  return f"class {label}"


def retrieval_grid(path: str, query_images: np.ndarray, query_labels: np.ndarray,
                   neighbor_images: np.ndarray, neighbor_labels: np.ndarray,
                   similarities: np.ndarray,
                   class_names: Optional[Sequence[str]] = None, *,
                   title: Optional[str] = None,
                   query_captions: Optional[Sequence[str]] = None) -> GridLayout:
  """Draws each query (left) with its neighbours, best first, and writes the PNG to `path`.

  Args:
    path: the PNG to write.
    query_images: uint8 (Q, H, W, C), C = 1 or 3.
    query_labels: (Q,) int labels; -1 when unknown.
    neighbor_images: uint8 (Q, k, H, W, C).
    neighbor_labels: (Q, k) int labels; -1 when unknown.
    similarities: (Q, k) cosine similarities, shown when labels are unknown.
    class_names: names of the labels, when known.
    title: the neighbours' column title (default: the top-k and what the frames mean).
    query_captions: captions of the queries (default: their class names).

  Neighbours of the query's class get a green frame, others red; grey when a label is unknown.
  Returns the layout (its `size` is the PNG's size in pixels).
  """
  num_queries, k = neighbor_labels.shape
  layout = GridLayout(num_queries, k)
  figure = _new_figure(*layout.size)
  width, height = layout.size
  figure.text((layout.cell / 2) / width, 1 - 4 / height, "query", ha="center", va="top",
              fontsize=8)
  figure.text((layout.gap + layout.cell * (1 + k / 2)) / width, 1 - 4 / height,
              title or f"top-{k} nearest training images (green: same class, red: other class)",
              ha="center", va="top", fontsize=8)
  for row in range(num_queries):
    query_label = int(query_labels[row])
    caption = (query_captions[row] if query_captions is not None
               else _name(query_label, class_names))
    _draw_cell(figure, layout.box(row, 0), query_images[row], QUERY, caption, "black")
    for column in range(k):
      label = int(neighbor_labels[row, column])
      colour = _frame_colour(query_label, label)
      caption = _name(label, class_names) or f"{similarities[row, column]:.2f}"
      _draw_cell(figure, layout.box(row, column + 1), neighbor_images[row, column], colour,
                 caption, colour if colour != NO_LABEL else "black")
  _save(figure, path)
  return layout


def pair_grid(path: str, first_images: np.ndarray, second_images: np.ndarray,
              first_captions: Sequence[str], second_captions: Sequence[str],
              title: str = "most similar pairs", columns: int = 4) -> tuple[int, int]:
  """Draws pairs of images side by side, `columns` pairs per row, and writes the PNG to `path`.

  first_images, second_images: uint8 (P, H, W, C), C = 1 or 3, P >= 0; each image is framed in
  grey and captioned below. The cells are the retrieval grid's. Returns the PNG's (width, height).
  """
  cell = GridLayout(1, 1)
  columns = max(1, min(columns, len(first_images)))
  rows = max(1, -(-len(first_images) // columns))
  width = max(320, columns * 2 * cell.cell + (columns - 1) * cell.gap)   # room for the title
  height = cell.header + rows * (cell.cell + cell.caption)
  figure = _new_figure(width, height)
  figure.text(0.5, 1 - 4 / height, title, ha="center", va="top", fontsize=8)
  pad = 3
  for p in range(len(first_images)):
    row, column = divmod(p, columns)
    top = cell.header + row * (cell.cell + cell.caption)
    for side, (images, captions) in enumerate(((first_images, first_captions),
                                               (second_images, second_captions))):
      left = column * (2 * cell.cell + cell.gap) + side * cell.cell
      box = [(left + pad) / width, 1 - (top + cell.cell - pad) / height,
             (cell.cell - 2 * pad) / width, (cell.cell - 2 * pad) / height]
      _draw_cell(figure, box, images[p], NO_LABEL, captions[p], "black")
  _save(figure, path)
  return width, height


# ------------------------------------------------------------------------------------------------
# Training curves.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Curves:
  """The series drawn by `training_curves`, each as (steps, values) arrays."""

  loss: tuple[np.ndarray, np.ndarray]
  knn_bank: tuple[np.ndarray, np.ndarray]
  knn_recomputed: tuple[np.ndarray, np.ndarray]


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key`, sorted by step; a step logged twice (a resumed run) keeps its
  last value."""
  by_step = {int(r["step"]): float(r[key]) for r in records if key in r}
  steps = np.asarray(sorted(by_step), dtype=np.int64)
  return steps, np.asarray([by_step[s] for s in steps], dtype=np.float64)


def curves_from_metrics(records: Sequence[dict]) -> Curves:
  """The training loss at every logged step, kNN top-1 on bank features at each evaluation and
  on recomputed features at the end, from the records of `metrics.jsonl`."""
  return Curves(loss=_series(records, "loss"), knn_bank=_series(records, "knn_bank/top1"),
                knn_recomputed=_series(records, "knn_recomputed/top1"))


def training_curves(path: str, records: Sequence[dict], title: str = "") -> Curves:
  """Training loss (left axis) and kNN top-1 (right axis) against step; writes the PNG.

  Raises ValueError when the records hold no training loss.
  """
  curves = curves_from_metrics(records)
  if not len(curves.loss[0]):
    raise ValueError("the metrics hold no training loss to plot")
  figure = _new_figure(800, 480)
  loss_axes = figure.add_subplot(1, 1, 1)
  loss_axes.plot(*curves.loss, color="#2b5fb4", linewidth=1.2, label="training loss")
  loss_axes.set_xlabel("step")
  loss_axes.set_ylabel("training loss", color="#2b5fb4")
  loss_axes.tick_params(axis="y", colors="#2b5fb4")
  loss_axes.grid(alpha=0.3)
  accuracy_axes = loss_axes.twinx()
  handles = loss_axes.get_lines()
  if len(curves.knn_bank[0]):
    handles += accuracy_axes.plot(*curves.knn_bank, color="#e66101", marker="o", markersize=4,
                                  linewidth=1.2, label="kNN top-1, bank features")
  if len(curves.knn_recomputed[0]):
    handles += accuracy_axes.plot(*curves.knn_recomputed, color="#5e3c99", marker="*",
                                  markersize=11, linestyle="none",
                                  label="kNN top-1, recomputed features")
  accuracy_axes.set_ylabel("test kNN top-1 (%)", color="#e66101")
  accuracy_axes.tick_params(axis="y", colors="#e66101")
  loss_axes.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3,
                   fontsize=8, frameon=False)
  loss_axes.set_title(title or "training loss vs testing accuracy", fontsize=10)
  figure.tight_layout()
  _save(figure, path)
  return curves


# ------------------------------------------------------------------------------------------------
# Table 1.
# ------------------------------------------------------------------------------------------------


def table1_bars(path: str, names: Sequence[str], bank_top1: Sequence[float],
                recomputed_top1: Sequence[float], title: str,
                bank_std: Optional[Sequence[float]] = None,
                recomputed_std: Optional[Sequence[float]] = None) -> None:
  """Grouped bars of kNN top-1 per objective, on bank and on recomputed features (NaN: none),
  with error bars of one standard deviation over seeds where the stds are given."""
  figure = _new_figure(max(640, 110 * len(names)), 420)
  axes = figure.add_subplot(1, 1, 1)
  x = np.arange(len(names))
  width = 0.38
  for offset, values, errors, colour, label in (
      (-width / 2, bank_top1, bank_std, "#e66101", "bank features"),
      (width / 2, recomputed_top1, recomputed_std, "#5e3c99", "recomputed features")):
    bars = axes.bar(x + offset, values, width, color=colour, label=label,
                    yerr=None if errors is None else np.nan_to_num(errors), capsize=3)
    for bar, value in zip(bars, values):
      if not math.isnan(value):
        axes.text(bar.get_x() + bar.get_width() / 2, value + 0.5, f"{value:.1f}",
                  ha="center", va="bottom", fontsize=7)
  _finish_bars(figure, axes, path, x, names, ylabel="kNN top-1 (%)", top=112, title=title)


SEEDS_COLOURS = ("#5e3c99", "#e66101", "#1a9641", "#8c8c8c", "#2b5fb4", "#d7191c")


def seeds_bars(path: str, rows: Sequence[str], columns: Sequence[str], means: np.ndarray,
               stds: np.ndarray, title: str) -> None:
  """Grouped bars: one group per column (an evaluation), one bar per row (a method), each the
  mean over seeds with an error bar of one standard deviation. means, stds: (rows, columns),
  NaN where a row has no value in a column (no bar)."""
  means, stds = np.asarray(means, float), np.asarray(stds, float)
  figure = _new_figure(max(720, 130 * len(columns)), 440)
  axes = figure.add_subplot(1, 1, 1)
  x = np.arange(len(columns))
  width = 0.8 / max(len(rows), 1)
  for i, name in enumerate(rows):
    offset = (i - (len(rows) - 1) / 2) * width
    values = np.nan_to_num(means[i], nan=0.0)
    errors = np.where(np.isnan(means[i]), 0.0, np.nan_to_num(stds[i]))
    shown = ~np.isnan(means[i])
    axes.bar((x + offset)[shown], values[shown], width, yerr=errors[shown], capsize=3,
             color=SEEDS_COLOURS[i % len(SEEDS_COLOURS)], label=name)
    for position, value, error in zip((x + offset)[shown], values[shown], errors[shown]):
      axes.text(position, value + error + 1.0, f"{value:.1f}", ha="center", va="bottom", fontsize=6,
                rotation=90)
  # The y range leaves room for the legend above the bars.
  _finish_bars(figure, axes, path, x, columns, ylabel="top-1 (%), mean and std over seeds",
               top=135, title=title)


def _finish_bars(figure, axes, path: str, x, names: Sequence[str], *, ylabel: str, top: float,
                 title: str) -> None:
  """Labels, 0-100 % ticks, legend, title and grid of a grouped bar chart; saves it."""
  axes.set_xticks(x)
  axes.set_xticklabels([textwrap.fill(name, 14) for name in names], fontsize=8)
  axes.set_ylabel(ylabel)
  axes.set_ylim(0, top)
  axes.set_yticks(range(0, 101, 20))
  axes.legend(fontsize=8, loc="upper left", ncol=2, frameon=False)
  axes.set_title(title, fontsize=10)
  axes.grid(axis="y", alpha=0.3)
  figure.tight_layout()
  _save(figure, path)
