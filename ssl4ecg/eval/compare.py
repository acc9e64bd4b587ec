"""Comparison tables over run directories (Markdown, CSV, JSON), one row per run.

A run directory holds ``recipe.toml`` (the fully resolved recipe), ``metrics.json``
(``{"pretrain": {...}, "eval": {"<eval id>": {metrics..., "protocol": {...}}}}``) and
``log.jsonl``. Each evaluation id gives one column per headline metric (the result's
``"headline"`` list, or every numeric top-level value when it has none). Runs whose results in
one column were produced under different protocols are refused: comparing them would be wrong.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ssl4ecg.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: metric names (the part before ``@``) for which lower is better
LOWER_IS_BETTER = frozenset({"mae", "rmse", "mse", "davies_bouldin", "loss", "final_loss"})
#: top-level result keys never shown as metrics when a result has no ``headline``
_NOT_METRICS = frozenset({"epoch", "epochs_run", "k", "lr", "weight_decay", "C", "n_records",
                          "n_train", "n_clusters", "seed", "seconds"})
FORMATS = ("md", "csv", "json")
ROW_FIELDS = ("run", "method", "encoder", "data", "steps", "minutes")


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` (e.g. ``mae@heart_rate``) are better."""
    return metric.split("@")[0] in LOWER_IS_BETTER


@dataclass
class Cell:
    """One metric of one run: value with its interval and whether it is the column's best."""

    value: float | None
    ci: list[float] | None = None
    std: float | None = None
    best: bool = False


@dataclass
class Column:
    """A metric column: evaluation id, metric name, direction and the shared protocol."""

    eval_id: str
    metric: str
    lower_is_better: bool
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The column name, ``<eval id>/<metric>``."""
        return f"{self.eval_id}/{self.metric}"


@dataclass
class Row:
    """One run: what was trained and its cells by column key."""

    run: str
    method: str
    encoder: str
    data: str
    steps: int | None
    minutes: float | None
    path: str
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass
class Table:
    """A comparison of runs: columns and rows (see :func:`build_table`)."""

    columns: list[Column]
    rows: list[Row]


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The parsed ``recipe.toml`` and ``metrics.json`` of a run directory."""
    run_dir = Path(run_dir)
    recipe_path, metrics_path = run_dir / "recipe.toml", run_dir / "metrics.json"
    for p in (recipe_path, metrics_path):
        if not p.is_file():
            raise ConfigError(f"{run_dir} is not a finished run directory: {p.name} is missing.")
    try:
        recipe = tomllib.loads(recipe_path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{recipe_path} is not valid TOML: {exc}") from None
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{metrics_path} is not valid JSON: {exc}") from None
    if not isinstance(metrics, dict):
        raise ConfigError(f"{metrics_path} must hold a JSON object.")
    return recipe, metrics


def _headline(result: dict[str, Any]) -> list[str]:
    if isinstance(result.get("headline"), list):
        return [m for m in result["headline"] if m in result]
    return [k for k, v in result.items()
            if _finite(v) is not None and k not in _NOT_METRICS and not k.startswith(("n_", "val_"))
            and not k.endswith(("_std", "_ci"))]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _protocol_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(set(a) | set(b))
    diffs = [f"{k}: {_canonical(a.get(k, '<absent>'))} vs {_canonical(b.get(k, '<absent>'))}"
             for k in keys if _canonical(a.get(k)) != _canonical(b.get(k))]
    return "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "")


def build_table(run_dirs: Iterable[Path]) -> Table:
    """Read the runs and build the comparison; :class:`ConfigError` when protocols differ."""
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise ConfigError("compare needs at least one run directory.")
    rows: list[Row] = []
    results: list[dict[str, Any]] = []
    for run_dir in run_dirs:
        recipe, metrics = load_run(run_dir)
        data = recipe.get("data", {}) or {}
        source = str(data.get("source", ""))
        if data.get("path"):
            source = f"{source}:{Path(str(data['path'])).name}" if source else Path(str(data["path"])).name
        pre = metrics.get("pretrain", {}) or {}
        seconds = _finite(pre.get("seconds"))
        steps = pre.get("steps")
        rows.append(Row(
            run=str((recipe.get("run", {}) or {}).get("name") or run_dir.name),
            method=str((recipe.get("objective", {}) or {}).get("name") or pre.get("method") or ""),
            encoder=str((recipe.get("encoder", {}) or {}).get("name", "")),
            data=source,
            steps=int(steps) if isinstance(steps, int) and not isinstance(steps, bool) else None,
            minutes=None if seconds is None else seconds / 60.0,
            path=str(run_dir),
        ))
        evals = metrics.get("eval", {}) or {}
        if not isinstance(evals, dict):
            raise ConfigError(f"{run_dir / 'metrics.json'}: 'eval' must map evaluation ids to results.")
        results.append(evals)
    names = [r.run for r in rows]
    for row in rows:  # runs sharing a recipe name are told apart by their directory
        if names.count(row.run) > 1:
            row.run = f"{row.run} ({Path(row.path).name})"

    columns: list[Column] = []
    eval_ids: list[str] = []
    for evals in results:
        for eval_id in evals:
            if eval_id not in eval_ids:
                eval_ids.append(eval_id)
    for eval_id in eval_ids:
        holders = [(row, ev[eval_id]) for row, ev in zip(rows, results)
                   if isinstance(ev.get(eval_id), dict)]
        ref_row, ref = holders[0]
        ref_protocol = ref.get("protocol", {}) or {}
        for row, res in holders[1:]:
            protocol = res.get("protocol", {}) or {}
            if _canonical(protocol) != _canonical(ref_protocol):
                raise ConfigError(
                    f"cannot put evaluation '{eval_id}' of runs '{ref_row.run}' and '{row.run}' in one "
                    f"column: they were evaluated under different protocols "
                    f"({_protocol_difference(ref_protocol, protocol)}). Re-evaluate them with the same "
                    f"[[eval]] settings and data, or compare them separately."
                )
        metrics: list[str] = []
        for _, res in holders:
            for m in _headline(res):
                if m not in metrics:
                    metrics.append(m)
        for m in metrics:
            col = Column(eval_id, m, lower_is_better(m), dict(ref_protocol))
            columns.append(col)
            for row, ev in zip(rows, results):
                res = ev.get(eval_id)
                if not isinstance(res, dict):
                    continue
                value = _finite(res.get(m))
                ci = res.get(f"{m}_ci")
                ci = [float(ci[0]), float(ci[1])] if (
                    isinstance(ci, (list, tuple)) and len(ci) == 2
                    and all(_finite(v) is not None for v in ci)) else None
                row.cells[col.key] = Cell(value, ci, _finite(res.get(f"{m}_std")))
            values = [row.cells[col.key].value for row in rows
                      if col.key in row.cells and row.cells[col.key].value is not None]
            if values:
                best = min(values) if col.lower_is_better else max(values)
                for row in rows:
                    cell = row.cells.get(col.key)
                    if cell is not None and cell.value is not None and cell.value == best:
                        cell.best = True
    return Table(columns, rows)


def format_number(v: float | None) -> str:
    """Fixed precision by magnitude: 4 decimals below 10, 2 below 1000, else 1; ``—`` for none."""
    if v is None:
        return "—"
    a = abs(v)
    return f"{v:.4f}" if a < 10 else f"{v:.2f}" if a < 1000 else f"{v:.1f}"


def _cell_text(cell: Cell | None) -> str:
    if cell is None or cell.value is None:
        return "—"
    text = format_number(cell.value)
    if cell.best:
        text = f"**{text}**"
    if cell.ci is not None:
        text += f" [{format_number(cell.ci[0])}, {format_number(cell.ci[1])}]"
    elif cell.std is not None:
        text += f" ± {format_number(cell.std)}"
    return text


def _row_fields(row: Row) -> list[Any]:
    return [row.run, row.method, row.encoder, row.data, row.steps, row.minutes]


def to_markdown(table: Table) -> str:
    """A Markdown table; the best value per column in bold, intervals in brackets or ± std."""
    header = list(ROW_FIELDS) + [c.key for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
    for row in table.rows:
        fields = [row.run, row.method, row.encoder, row.data,
                  "—" if row.steps is None else str(row.steps),
                  "—" if row.minutes is None else f"{row.minutes:.1f}"]
        cells = [_cell_text(row.cells.get(c.key)) for c in table.columns]
        lines.append("| " + " | ".join(f.replace("|", "\\|") for f in fields + cells) + " |")
    lower = [c.key for c in table.columns if c.lower_is_better]
    note = "Best value per column in **bold**; [lo, hi] = 95% bootstrap interval, ± = std."
    if lower:
        note += " Lower is better for: " + ", ".join(lower) + "."
    return "\n".join(lines) + "\n\n" + note + "\n"


def csv_header(table: Table) -> list[str]:
    """CSV column names: run fields, then per metric ``key, key_ci_lo, key_ci_hi, key_std, key_best``."""
    out = list(ROW_FIELDS)
    for c in table.columns:
        out += [c.key, f"{c.key}_ci_lo", f"{c.key}_ci_hi", f"{c.key}_std", f"{c.key}_best"]
    return out


def to_csv(table: Table) -> str:
    """CSV with full-precision values; the best per column flagged ``*`` in ``<key>_best``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(csv_header(table))
    blank = lambda v: "" if v is None else repr(v) if isinstance(v, float) else v  # noqa: E731
    for row in table.rows:
        line = [blank(v) for v in _row_fields(row)]
        for c in table.columns:
            cell = row.cells.get(c.key) or Cell(None)
            line += [blank(cell.value), blank(cell.ci[0] if cell.ci else None),
                     blank(cell.ci[1] if cell.ci else None), blank(cell.std), "*" if cell.best else ""]
        writer.writerow(line)
    return buf.getvalue()


def to_json(table: Table) -> str:
    """JSON: ``columns`` (key, eval, metric, direction, protocol) and ``rows`` with their cells."""
    doc = {
        "columns": [{"key": c.key, "eval": c.eval_id, "metric": c.metric,
                     "lower_is_better": c.lower_is_better, "protocol": c.protocol} for c in table.columns],
        "rows": [
            {**dict(zip(ROW_FIELDS, _row_fields(r))), "path": r.path,
             "metrics": {c.key: {"value": cell.value, "ci": cell.ci, "std": cell.std, "best": cell.best}
                         for c in table.columns if (cell := r.cells.get(c.key)) is not None}}
            for r in table.rows
        ],
    }
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def compare_runs(run_dirs: list[Path], fmt: str = "md") -> str:
    """The comparison of ``run_dirs`` as ``"md"``, ``"csv"`` or ``"json"`` text."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown compare format '{fmt}'; use one of {list(FORMATS)}.")
    table = build_table(run_dirs)
    return {"md": to_markdown, "csv": to_csv, "json": to_json}[fmt](table)
