"""PNG plots of runs: t-SNE of embeddings, pretraining loss curves, metric bars with intervals.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.compare import Table, build_table, load_run


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "plot"


#: colour index of records without any positive class in multi-label data
NO_LABEL = -1


def rarest_positive_class(labels: np.ndarray) -> np.ndarray:
    """One class index per record of multi-hot ``labels`` ``[N, C]`` (values > 0.5 are positive).

    A record's colour is its positive class that is rarest in the whole set (ties: the lower
    index), so a class that mostly co-occurs with a common one (PTB-XL's MI and HYP with
    NORM/STTC/CD) still shows; records without a positive class get :data:`NO_LABEL`.
    """
    y = np.asarray(labels, dtype=np.float64) > 0.5
    counts = y.sum(axis=0)
    # rank each record's positives by the set-wide count; argmax keeps the first of equals
    score = np.where(y, -counts[None, :], -np.inf)
    out = np.argmax(score, axis=1)
    return np.where(y.any(axis=1), out, NO_LABEL)


def plot_tsne(
    features: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: Path,
    seed: int = 0, perplexity: float = 30.0, max_points: int = 2000, title: str = "",
) -> Path:
    """2-D t-SNE (scikit-learn) of ``features`` ``[N, D]`` coloured by class index ``labels`` ``[N]``.

    Multi-hot ``labels`` ``[N, C]`` (multi-label data) colour each record by its rarest positive
    class (:func:`rarest_positive_class`), which the legend title says. At most ``max_points`` records (a
    seeded random subset) are embedded; the perplexity is capped below the number of points.
    """
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    multi_label = y.ndim == 2 and y.shape[1] > 1
    if y.ndim == 2:
        y = rarest_positive_class(y) if multi_label else y[:, 0]
    if y.ndim != 1:
        raise ConfigError(f"t-SNE labels must be class indices [N] or multi-hot [N, C]; got shape {y.shape}.")
    if len(x) != len(y) or len(x) < 3:
        raise ConfigError(f"t-SNE needs at least 3 records with one label each; got {len(x)} features, {len(y)} labels.")
    if len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
        x, y = x[keep], y[keep]
    perp = float(min(perplexity, max(1.0, (len(x) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed).fit_transform(x)
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10" if len(np.unique(y)) <= 10 else "tab20"]
    for c in np.unique(y):
        sel = y == c
        if multi_label and int(c) == NO_LABEL:
            name, color = "no positive class", "lightgrey"
        else:
            name = class_names[int(c)] if 0 <= int(c) < len(class_names) else str(c)
            color = cmap(int(c) % cmap.N)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, label=f"{name} ({int(sel.sum())})", color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "t-SNE of embeddings")
    ax.legend(markerscale=2, fontsize=8, loc="best",
              title="multi-label: rarest positive class" if multi_label else None, title_fontsize=8)
    return _save(fig, path)


def read_log(run_dir: Path) -> list[dict]:
    """The records of ``log.jsonl`` (malformed lines skipped); ``[]`` when absent."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def plot_loss_curves(run_dirs: Sequence[Path], path: Path, labels: Sequence[str] | None = None) -> Path:
    """Pretraining loss against step for several runs (log scale when all losses are positive)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    all_positive, drawn = True, 0
    for i, run_dir in enumerate(run_dirs):
        recs = [r for r in read_log(run_dir) if isinstance(r.get("step"), (int, float))
                and isinstance(r.get("loss"), (int, float)) and np.isfinite(r["loss"])]
        if not recs:
            continue
        steps = np.array([r["step"] for r in recs], dtype=float)
        loss = np.array([r["loss"] for r in recs], dtype=float)
        all_positive &= bool((loss > 0).all())
        label = labels[i] if labels is not None else Path(run_dir).name
        ax.plot(steps, loss, lw=1.2, label=label)
        drawn += 1
    if not drawn:
        raise ConfigError("none of the runs has a log.jsonl with 'step' and 'loss' entries to plot.")
    if all_positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("pretraining loss")
    ax.set_title("Pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_metric_bars(table: Table, column_key: str, path: Path) -> Path:
    """Bar chart of one comparison column across runs, with CI (or ± std) error bars."""
    col = next((c for c in table.columns if c.key == column_key), None)
    if col is None:
        raise ConfigError(f"no column '{column_key}' in the comparison; columns: {[c.key for c in table.columns]}.")
    names, values, lo_err, hi_err, best = [], [], [], [], []
    for row in table.rows:
        cell = row.cells.get(column_key)
        if cell is None or cell.value is None:
            continue
        names.append(f"{row.run}\n({row.method})" if row.method else row.run)
        values.append(cell.value)
        if cell.ci is not None:
            lo_err.append(max(0.0, cell.value - cell.ci[0]))
            hi_err.append(max(0.0, cell.ci[1] - cell.value))
        elif cell.std is not None:
            lo_err.append(cell.std)
            hi_err.append(cell.std)
        else:
            lo_err.append(0.0)
            hi_err.append(0.0)
        best.append(cell.best)
    if not values:
        raise ConfigError(f"no run has a value for '{column_key}'.")
    fig = Figure(figsize=(max(4.0, 1.1 * len(values) + 2), 4.2))
    ax = fig.add_subplot()
    pos = np.arange(len(values))
    colors = ["tab:orange" if b else "tab:blue" for b in best]
    ax.bar(pos, values, color=colors, yerr=np.array([lo_err, hi_err]), capsize=4)
    ax.set_xticks(pos, names, fontsize=8)
    arrow = " (lower is better)" if col.lower_is_better else ""
    ax.set_title(f"{column_key}{arrow}")
    ax.set_ylabel(col.metric)
    lows = [v - e for v, e in zip(values, lo_err)]
    if col.metric.split("@")[0] in ("auc_macro", "f1_macro") and min(lows) > 0.3:
        ax.set_ylim(min(lows) - 0.05, min(1.0, max(v + e for v, e in zip(values, hi_err)) + 0.03))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def write_plots(run_dirs: Sequence[Path], out_dir: Path, tsne: bool = True) -> list[Path]:
    """All plots for ``run_dirs`` into ``out_dir``; returns the files written.

    ``loss_curves.png`` (runs with a ``log.jsonl``), ``metric_<column>.png`` for every comparison
    column, and with ``tsne`` a ``tsne_<run>_<file>.png`` for each saved embedding file
    (``<run dir>/embeddings/*.npz`` with ``features``, ``labels``, ``class_names``).
    """
    run_dirs = [Path(p) for p in run_dirs]
    out_dir = Path(out_dir)
    table = build_table(run_dirs)
    written: list[Path] = []
    if any(read_log(d) for d in run_dirs):
        written.append(plot_loss_curves(run_dirs, out_dir / "loss_curves.png",
                                        labels=[r.run for r in table.rows]))
    for col in table.columns:
        if any(col.key in r.cells and r.cells[col.key].value is not None for r in table.rows):
            written.append(plot_metric_bars(table, col.key, out_dir / f"metric_{_safe(col.key)}.png"))
    if tsne:
        for run_dir, row in zip(run_dirs, table.rows):
            for npz in sorted((run_dir / "embeddings").glob("*.npz")):
                with np.load(npz, allow_pickle=False) as data:
                    if not {"features", "labels"} <= set(data.files):
                        continue
                    names = [str(n) for n in data["class_names"]] if "class_names" in data.files else []
                    written.append(plot_tsne(
                        data["features"], data["labels"], names,
                        out_dir / f"tsne_{_safe(row.run)}_{_safe(npz.stem)}.png",
                        title=f"{row.run}: {npz.stem}",
                    ))
    return written


__all__ = ["plot_tsne", "rarest_positive_class", "plot_loss_curves", "plot_metric_bars", "write_plots", "read_log", "load_run"]
