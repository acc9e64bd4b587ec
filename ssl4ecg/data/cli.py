"""``ssl4ecg data ...``: prepare dataset caches and inspect them.

The lead CLI mounts :data:`data_app` as the ``data`` sub-command::

    ssl4ecg data prepare ptbxl /data/ptb-xl --out caches/ptbxl-250 --set sampling_rate=250
    ssl4ecg data info caches/ptbxl-250
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ssl4ecg.errors import ConfigError, Ssl4ecgError

data_app = typer.Typer(help="Prepare dataset caches and inspect them.", no_args_is_help=True,
                       add_completion=False)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _fail(exc: Ssl4ecgError) -> typer.Exit:
    """Print one red line; exit code 2 for configuration errors, 1 for data errors."""
    err_console.print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(code=2 if isinstance(exc, ConfigError) else 1)


def parse_set(items: List[str]) -> dict[str, Any]:
    """``key=value`` options; values are TOML (numbers, true/false, lists) or else plain strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set '{item}' is not key=value (e.g. --set sampling_rate=500).")
        if key.startswith("data."):
            key = key[len("data."):]
        try:
            out[key] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value.strip()
    return out


@data_app.command("prepare")
def prepare_command(
    source: str = typer.Argument(..., help="source name: ptbxl, cinc, cpsc2018, code15, folder, ..."),
    path: str = typer.Argument("", help="the dataset folder ('-' or nothing for generated sources)"),
    out: Path = typer.Option(..., "--out", "-o", help="cache folder to create"),
    set_: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                             help="[data] option key=value (repeatable)"),
    workers: int = typer.Option(0, "--workers", "-w", help="worker processes (0 = every core)"),
    force: bool = typer.Option(False, "--force", help="replace a cache prepared with other options"),
) -> None:
    """Read and preprocess a dataset into a memory-mappable cache (resumable)."""
    from ssl4ecg.data.build import prepare, resolve_data_section
    from ssl4ecg.registry import get_registry

    try:
        if workers < 0:
            raise ConfigError(f"--workers {workers} is invalid: give a number of processes >= 0 (0 = every core).")
        options = parse_set(set_ or [])
        for key in ("source", "path", "cache", "mixture"):
            if key in options:
                raise ConfigError(f"--set {key}=... is not allowed here: give the source and path as "
                                  f"arguments and the cache as --out.")
        registry = get_registry()
        given = {"source": source, **options}
        if path not in ("", "-"):
            given["path"] = path
        section = resolve_data_section(given, registry)
        manifest = prepare(section, registry, out, workers=workers, progress=True, force=force)
    except Ssl4ecgError as exc:
        raise _fail(exc) from None
    counts = manifest["counts"]
    console.print(f"[green]cache ready[/green] {escape(str(out))}: {counts['records']} records "
                  f"({counts['dropped']} dropped), shape {manifest['shape']}, "
                  f"{manifest.get('prepare_seconds', 0):.1f} s")
    for note in manifest.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {escape(note)}")


@data_app.command("info")
def info_command(
    cache: Path = typer.Argument(..., help="a cache folder made by `ssl4ecg data prepare`"),
    verify: bool = typer.Option(False, "--verify", help="recompute the full SHA-256 checksums and scan "
                                                         "the signals for NaN/inf"),
    dropped: int = typer.Option(5, "--dropped", help="dropped records to list"),
) -> None:
    """Summarise a prepared cache: source, preprocessing, splits, classes, drops.

    Always checks the files' sizes and sampled-page digests (a missing or damaged file fails);
    ``--verify`` reads every byte.
    """
    from ssl4ecg.data.cache import check_cache, read_manifest, verify_cache

    try:
        m = read_manifest(cache)
        bad = verify_cache(cache) if verify else []
        if not bad:
            check_cache(cache, m)
    except Ssl4ecgError as exc:
        raise _fail(exc) from None
    counts = m["counts"]
    table = Table(title=f"cache {cache}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("source", f"{m['source']}  {escape(_fmt(m.get('options', {})))}")
    table.add_row("records", f"{counts['records']} of {counts['listed']} listed, {counts['dropped']} dropped")
    table.add_row("shape", f"{m['shape']} {m['dtype']} ({_size(m['shape'], m['dtype'])})")
    table.add_row("signal", f"{m['sampling_rate']:g} Hz, {m['preprocessing']['seconds']:g} s, "
                            f"leads {' '.join(m['leads'])}")
    table.add_row("preprocessing", escape(_fmt({k: v for k, v in m["preprocessing"].items()
                                               if k not in ("sampling_rate", "seconds", "leads")})))
    table.add_row("splits", "  ".join(f"{s or 'unassigned'} {n}" for s, n in counts["splits"].items() if n))
    if counts.get("classes"):
        table.add_row("classes", "  ".join(f"{c} {n}" for c, n in counts["classes"].items()))
    else:
        table.add_row("classes", "unlabelled")
    table.add_row("created", f"{m.get('created', '?')}  ssl4ecg {m['versions'].get('ssl4ecg', '?')}, "
                             f"{m.get('prepare_seconds', 0):.1f} s with {m.get('workers', '?')} workers")
    if verify:
        table.add_row("checksums", "[green]ok[/green]" if not bad else f"[red]mismatch: {', '.join(bad)}[/red]")
    console.print(table)
    for note in m.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if m.get("dropped"):
        reasons = Counter(reason_kind(r) for _, r in m["dropped"])
        console.print(f"dropped {len(m['dropped'])} records: "
                      + "; ".join(f"{escape(k)} x{n}" for k, n in reasons.most_common(5)))
        for rid, reason in m["dropped"][:dropped]:
            console.print(f"  {escape(str(rid))}: {escape(reason)}")
    if bad:
        raise typer.Exit(code=1)


def _fmt(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _size(shape, dtype: str = "float32") -> str:
    n = 2 if dtype == "float16" else 4
    for s in shape:
        n *= int(s)
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def reason_kind(reason: str) -> str:
    """A drop reason without record-specific details (paths, numbers, code lists), for grouping."""
    text = re.sub(r"\S*[/\\]\S*", "<file>", reason)
    text = re.sub(r"\(.*?\)|\{.*?\}", "(...)", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text if len(text) <= 90 else text[:87] + "..."
