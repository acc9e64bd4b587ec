"""The ``ssl4ecg`` command line (also ``python -m ssl4ecg``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ssl4ecg.errors import Ssl4ecgError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Self-supervised learning for 12-lead ECG: pretrain, evaluate, compare.")
console = Console(stderr=False)
err_console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def run(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe TOML file (omit with --resume)."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe value: section.key=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<name>/<timestamp>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Resume an interrupted run directory."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="If --out is not empty, move it to OUT.old-<timestamp> first (never deletes)."),
) -> None:
    """Pretrain the recipe's encoder with its objective, then run its evaluators."""
    from ssl4ecg.recipe import load_recipe
    from ssl4ecg.run import run_recipe
    from ssl4ecg.train import distributed as dist

    try:
        if resume is None and recipe is None:
            raise typer.BadParameter("give a RECIPE file or --resume RUN_DIR")
        if resume is not None and recipe is not None and not _same_file(recipe, resume / "recipe.toml"):
            raise Ssl4ecgError(f"--resume {resume} continues with that run's own recipe.toml, which is fixed; "
                               f"RECIPE {recipe} would be ignored: give only --resume {resume}")
        parsed = None if resume is not None else load_recipe(recipe, set_)
        if resume is not None and set_:
            raise Ssl4ecgError("--set cannot change a resumed run; its recipe.toml is fixed")
        run_dir, metrics = run_recipe(parsed, out_dir=out, resume_dir=resume, console=console, overwrite=overwrite)
    except Ssl4ecgError as exc:
        _fail(exc)
        return
    if dist.is_rank0():
        print_metrics(metrics, run_dir)
    dist.shutdown()


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one existing file (links and relative paths resolved)."""
    try:
        return a.samefile(b)
    except OSError:
        return False


@app.command("eval")
def eval_(
    encoder: Path = typer.Argument(..., help="A run directory or an encoder file (encoder.pt / imported)."),
    recipe: Path = typer.Option(..., "--recipe", help="Recipe whose [data]/[eval_data] and [[eval]] are used."),
    set_: List[str] = typer.Option([], "--set", help="Override a recipe value: section.key=value."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for metrics.json (default: a new run dir)."),
    overwrite: bool = typer.Option(False, "--overwrite",
                                   help="If --out is not empty, move it to OUT.old-<timestamp> first (never deletes)."),
) -> None:
    """Evaluate an existing encoder without retraining; writes the same metrics.json shape."""
    from ssl4ecg.evaluate import evaluate_saved_encoder

    try:
        run_dir, metrics = evaluate_saved_encoder(encoder, recipe, set_, out, overwrite=overwrite)
    except Ssl4ecgError as exc:
        _fail(exc)
        return
    print_metrics(metrics, run_dir)


@app.command()
def plugins() -> None:
    """List every registered component by kind, with the package it came from."""
    import warnings

    from ssl4ecg.registry import KINDS, get_registry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            registry = get_registry()
        except Ssl4ecgError as exc:
            _fail(exc)
            return
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {escape(str(w.message))}", highlight=False)
    table = Table(title="ssl4ecg components")
    table.add_column("kind")
    table.add_column("name", style="bold")
    table.add_column("package (module)")
    table.add_column("description")
    for kind in KINDS:
        for component in registry.components(kind):
            module = getattr(component.factory, "__module__", "").split(".")[0]
            summary = Text(component.summary.replace("``", ""))
            table.add_row(kind, component.name, f"{component.package} ({module})", summary)
    console.print(table)


@app.command()
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories to compare."),
    fmt: str = typer.Option("md", "--format", help="md, csv or json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the table to this file."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG plots into this directory."),
) -> None:
    """Head-to-head table of several runs (one row per run, one column per metric)."""
    from ssl4ecg.eval.compare import compare_runs
    from ssl4ecg.io import atomic_write_text

    try:
        text = compare_runs(list(run_dirs), fmt)
        if plots is not None:
            from ssl4ecg.eval.plots import write_plots

            written = write_plots(list(run_dirs), plots)
            for path in written:
                err_console.print(f"wrote {path}")
    except Ssl4ecgError as exc:
        _fail(exc)
        return
    if out is not None:
        atomic_write_text(out, text)
        err_console.print(f"wrote {out}")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


@app.command()
def embed(
    encoder: Path = typer.Argument(..., help="A run directory or an encoder file."),
    data: Path = typer.Argument(..., help="A prepared cache, a dataset release folder or a folder of WFDB records."),
    out: Path = typer.Option(..., "--out", help="Output .npz (embeddings + ids) or .npy (+ .csv of ids)."),
    set_: List[str] = typer.Option([], "--set", help="Override a [data] key, e.g. --set task=rhythm."),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Embeddings for every record, written with their record ids."""
    from ssl4ecg.embed import embed_records

    try:
        summary = embed_records(encoder, data, out, set_, batch_size=batch_size, device=device)
    except Ssl4ecgError as exc:
        _fail(exc)
        return
    err_console.print(f"wrote {summary['records']} embeddings of dimension {summary['dim']} to {summary['out']}",
                      markup=False, highlight=False)
    if summary["dropped"]:
        n = summary["dropped"]
        err_console.print(f"{n} record{' could not be used and is' if n == 1 else 's could not be used and are'} "
                          f"not embedded "
                          f"(e.g. {'; '.join(summary['dropped_examples'])}); every record and its reason: "
                          f"{summary['dropped_file']}", markup=False, highlight=False, soft_wrap=True)


@app.command("import")
def import_(
    kind: str = typer.Argument(..., help="Checkpoint format, e.g. ecg-jepa (see `ssl4ecg plugins`, kind importer)."),
    checkpoint: Path = typer.Argument(..., help="The published checkpoint file."),
    out: Path = typer.Option(..., "--out", help="Where to write the ssl4ecg encoder file."),
    heads: int = typer.Option(16, "--heads", help="Attention heads (weights do not store it; 16 as released)."),
    sampling_rate: float = typer.Option(250.0, "--sampling-rate", help="Sampling rate the weights expect."),
    leads: str = typer.Option("I,II,V1,V2,V3,V4,V5,V6", "--leads", help="Comma-separated lead order."),
    normalize: str = typer.Option("none", "--normalize", help="Normalisation the weights expect."),
) -> None:
    """Convert a published checkpoint into an encoder file that `eval` and `embed` use."""
    import inspect

    from ssl4ecg.artifacts import save_encoder
    from ssl4ecg.registry import get_registry

    try:
        importer = get_registry().get("importer", kind).factory
        given = {"heads": heads, "sampling_rate": sampling_rate, "normalize": normalize,
                 "leads": tuple(x.strip() for x in leads.split(",") if x.strip())}
        accepted = inspect.signature(importer).parameters
        result = importer(checkpoint, **{k: v for k, v in given.items() if k in accepted})
        save_encoder(out, result["encoder"], result["component"], result["options"], result["preprocess"],
                     extra={"imported_from": str(checkpoint), **result.get("extra", {})})
    except Ssl4ecgError as exc:
        _fail(exc)
        return
    err_console.print(f"wrote {out}: {result['component']} {result['options']}", markup=False)





def _mount_optional_apps() -> None:
    """Sub-commands that live in their own modules."""
    try:
        from ssl4ecg.data.cli import data_app
    except ImportError:  # pragma: no cover - data layer missing in a broken install
        return
    app.add_typer(data_app, name="data", help="Prepare and inspect dataset caches.")


def print_metrics(metrics: dict, run_dir: Path) -> None:
    """The rich table printed at the end of a run."""
    table = Table(title=f"results: {run_dir}")
    table.add_column("evaluator")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    pre = metrics.get("pretrain", {})
    if pre:
        loss = pre.get("final_loss")
        table.add_row("pretrain", "steps", str(pre.get("steps")), "")
        if isinstance(loss, (int, float)) and not math.isnan(loss):
            table.add_row("pretrain", "final_loss", f"{loss:.4f}", "")
        if pre.get("samples_per_s"):
            table.add_row("pretrain", "samples/s", f"{pre['samples_per_s']:.1f}", "")
    for eval_id, result in metrics.get("eval", {}).items():
        for key, value in result.items():
            if key.endswith("_ci") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            ci = result.get(f"{key}_ci")
            ci_text = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
            table.add_row(eval_id, key, f"{value:.4f}" if isinstance(value, float) else str(value), ci_text)
    console.print(table)


_mount_optional_apps()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
