"""A run from recipe to metrics: build components, pretrain, evaluate, write the run directory.

Run directory contract (other tools read it)::

    RUN_DIR/
      recipe.toml       the fully resolved recipe (every default written out)
      env.json          versions, device, git revision, command line
      log.jsonl         one JSON object per logged step (step, loss, lr, samples_per_s, ...)
      metrics.json      {"pretrain": {...}, "eval": {"<evaluator id>": {...}}}
      encoder.pt        the evaluated encoder (see ssl4ecg.artifacts)
      checkpoints/      last.pt and previous.pt (training state for --resume)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl4ecg.artifacts import save_encoder
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import Encoder, EvalContext
from ssl4ecg.io import atomic_write_json, atomic_write_text
from ssl4ecg.recipe import Recipe, parse_recipe, resolve
from ssl4ecg.train import distributed as dist
from ssl4ecg.train.device import resolve_precision, select_device


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_run_dir(recipe: Recipe) -> Path:
    """Create and return a new ``out_root/name/<timestamp>`` folder (``<timestamp>-2``, ... when taken).

    The folder is created atomically, so two runs started in the same second never share one.
    """
    from ssl4ecg.rundirs import claim_new_dir, stamp

    return claim_new_dir(Path(recipe.run.get("out_root", "runs")) / recipe.run.get("name", "run"), stamp()).path


def environment(device: torch.device, precision: str) -> dict[str, Any]:
    """Versions, device and git revision recorded with every run."""
    import ssl4ecg
    from ssl4ecg.registry import get_registry

    packages = {}
    for name in ("torch", "numpy", "scipy", "scikit-learn", "wfdb", "pluggy", "timm", "h5py"):
        try:
            from importlib.metadata import version

            packages[name] = version(name)
        except Exception:  # noqa: BLE001
            packages[name] = None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(ssl4ecg.__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    plugins = sorted({c.package for c in get_registry().components()})
    return {
        "ssl4ecg": ssl4ecg.__version__,
        "git_revision": rev,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": precision,
        "world_size": dist.world_size(),
        "packages": packages,
        "plugins": plugins,
        "argv": sys.argv,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }


class Run:
    """One recipe, resolved and ready: builds data and components, trains, evaluates."""

    def __init__(self, recipe: Recipe, run_dir: Path, registry=None, need_training: bool = True) -> None:
        from ssl4ecg.registry import get_registry

        self.registry = registry or get_registry()
        self.recipe = resolve(recipe, self.registry, need_training=need_training)
        self.run_dir = Path(run_dir)
        self.seed = int(self.recipe.run["seed"])
        self.device = select_device(self.recipe.run["device"])
        if dist.launched_by_torchrun():
            dist.init(self.device.type)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", dist.local_rank())
        self.precision = resolve_precision(self.recipe.train["precision"], self.device)
        eval_precision = self.recipe.run["eval_precision"]
        self.eval_precision = self.precision if eval_precision == "train" else eval_precision
        if int(self.recipe.train["num_threads"]) > 0:
            torch.set_num_threads(int(self.recipe.train["num_threads"]))

    # ------------------------------------------------------------------ building
    def load_data(self):
        """(records to pretrain on or None for a mixture, labelled records to evaluate on or None)."""
        from ssl4ecg.data.build import load_records

        data, eval_data = self.recipe.data, self.recipe.eval_data
        records = None if data.get("mixture") else load_records(data, self.registry)
        if eval_data:
            eval_records = load_records(eval_data, self.registry)
        elif records is None:
            if self.recipe.evals:
                raise ConfigError("[data] mixture pretrains on several caches; name the labelled data the "
                                  "evaluators use in an [eval_data] section (e.g. source = \"ptbxl\")")
            eval_records = None
        else:
            eval_records = records
        if self.recipe.evals and not eval_records.is_labelled:
            raise ConfigError(
                f"[[eval]] needs labelled data but source '{(eval_data or data)['source']}' "
                "has no labels; add an [eval_data] section naming a labelled source (e.g. ptbxl)")
        if records is not None and eval_records is not None and eval_records.spec != records.spec:
            raise ConfigError(f"[eval_data] gives signals {eval_records.spec} but the encoder is built for "
                              f"{records.spec}; use the same sampling_rate, seconds and leads")
        return records, eval_records

    def pretrain_loader(self, records):
        """The training loader over ``pretrain_splits`` (a view: memory-mapped caches stay mapped)."""
        from ssl4ecg.data.build import loader_options, pretrain_loader
        from ssl4ecg.data.loader import BatchLoader

        t = self.recipe.train
        common = dict(seed=self.seed, rank=dist.rank(), world_size=dist.world_size(),
                      **loader_options(t, self.device))
        if records is None:  # a weighted mixture of caches
            return pretrain_loader(self.recipe.data, self.registry, int(t["batch_size"]), **common)
        splits = self.recipe.data["pretrain_splits"]
        if np.all(records.splits == ""):
            index = np.arange(len(records))
        else:
            index = np.flatnonzero(np.isin(records.splits, splits))
        if len(index) == 0:
            raise ConfigError(f"[data] pretrain_splits = {splits} selects no records; "
                              f"the data has splits {sorted(set(records.splits.tolist()))}")
        return BatchLoader(records, int(t["batch_size"]), shuffle=True, drop_last=True, indices=index, **common)

    def build(self, spec):
        """The encoder, the masker (or None) and the objective for signals of ``spec``."""
        seed_everything(self.seed)
        r = self.recipe
        enc_opts = {k: v for k, v in r.encoder.items() if k != "name"}
        encoder = self.registry.build("encoder", r.encoder["name"], enc_opts, "encoder", spec=spec)
        masker = None
        if r.masker:
            masker = self.registry.build("masker", r.masker["name"],
                                         {k: v for k, v in r.masker.items() if k != "name"}, "masker", spec=spec)
        objective = self.registry.build(
            "objective", r.objective["name"], {k: v for k, v in r.objective.items() if k != "name"}, "objective",
            encoder=encoder, masker=masker, spec=spec, registry=self.registry)
        return encoder, masker, objective

    # ------------------------------------------------------------------ the run
    def execute(self, resume: bool = False, console=None) -> dict[str, Any]:
        """Pretrain (unless max_steps = 0), evaluate and write the run directory; returns metrics."""
        from ssl4ecg.train.loop import Trainer

        rank0 = dist.is_rank0()
        if rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "recipe.toml", self.recipe.to_toml())
            atomic_write_json(self.run_dir / "env.json", environment(self.device, self.precision))
        records, eval_records = self.load_data()
        t = self.recipe.train
        loader = self.pretrain_loader(records) if int(t["max_steps"]) != 0 else None
        spec = records.spec if records is not None else loader.spec
        encoder, _, objective = self.build(spec)
        metrics: dict[str, Any] = {"pretrain": {}, "eval": {}}
        metrics_path = self.run_dir / "metrics.json"
        if resume and metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
        if loader is not None:
            if len(loader) == 0:
                raise ConfigError(f"[train] batch_size = {t['batch_size']} is larger than the "
                                  f"pretraining records per process; lower it")
            trainer = Trainer(objective, loader, t, self.run_dir, self.device, self.precision, self.seed)
            if resume:
                trainer.resume()
            if not trainer.state.done:
                progress = _progress(console) if rank0 else None
                if progress is not None:
                    with progress:
                        summary = trainer.fit(progress)
                else:
                    summary = trainer.fit(None)
            else:
                summary = trainer.summary()
            metrics["pretrain"] = {**summary, "records": loader.n_records}
        else:
            metrics["pretrain"] = {"steps": 0, "final_loss": None, "samples_per_s": 0.0, "seconds": 0.0,
                                   "note": "max_steps = 0: random initialisation"}
        eval_encoder = objective.representation_encoder()
        # Training is the only collective work: leave the process group now, so that no rank
        # waits in a barrier (and times the job out) while rank 0 evaluates alone.
        dist.shutdown()
        if rank0:
            save_encoder(self.run_dir / "encoder.pt", eval_encoder, self.recipe.encoder["name"],
                         {k: v for k, v in self.recipe.encoder.items() if k != "name"}, self.recipe.data)
            atomic_write_json(metrics_path, metrics)
            if eval_records is not None:
                metrics["eval"].update(self.evaluate(eval_encoder, eval_records, metrics, metrics_path))
        return metrics

    def eval_protocol_data(self) -> dict[str, Any]:
        """What identifies the labelled task in a protocol: dataset, task and split rule.

        Input preprocessing (rate, leads, filters) belongs to the method and may differ
        between rows of one comparison; the labelled task may not.
        """
        section = self.recipe.eval_data or self.recipe.data
        keys = ("source", "task", "single_label", "train_folds", "val_folds", "test_folds", "n_records", "seed")
        out = {k: section[k] for k in keys if k in section}
        if section.get("path"):
            out["dataset"] = Path(str(section["path"])).name
        if section.get("cache"):
            out["dataset"] = Path(str(section["cache"])).name
        return out

    def evaluate(self, encoder: Encoder, records, metrics: dict[str, Any] | None = None,
                 metrics_path: Path | None = None) -> dict[str, Any]:
        """Run every [[eval]] entry; metrics.json is rewritten after each evaluator."""
        results: dict[str, Any] = {}
        encoder = encoder.to(self.device)
        for i, entry in enumerate(self.recipe.evals):
            eval_id = self.recipe.eval_id(i)
            if metrics is not None and eval_id in metrics.get("eval", {}):
                continue  # finished before an interruption
            options = {k: v for k, v in entry.items() if k not in ("name", "id")}
            evaluator = self.registry.build("evaluator", entry["name"], options, f"eval.{i}",
                                            registry=self.registry)
            seed_everything(self.seed)
            context = EvalContext(device=self.device, seed=self.seed, out_dir=self.run_dir,
                                  batch_size=max(64, int(self.recipe.train["batch_size"])),
                                  precision=self.eval_precision)
            result = evaluator.evaluate(encoder, records, context)
            result.setdefault("protocol", evaluator.protocol())
            result["protocol"].setdefault("data", self.eval_protocol_data())
            results[eval_id] = result
            if metrics is not None and metrics_path is not None:
                metrics["eval"][eval_id] = result
                atomic_write_json(metrics_path, metrics)
        return results


def _progress(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def run_recipe(recipe: Recipe, out_dir: str | Path | None = None, resume_dir: str | Path | None = None,
               registry=None, console=None, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Run ``recipe`` into ``out_dir`` (default ``runs/<name>/<timestamp>``), or resume ``resume_dir``.

    Everything is validated (values, components, model and data sizes) before a folder is
    created. A non-empty ``out_dir`` is refused unless ``overwrite``, which moves it to
    ``out_dir.old-<timestamp>``; nothing is ever deleted. Under torchrun rank 0 claims the
    folder and every rank uses its answer. A run that fails before training wrote anything
    leaves no folder behind (see :func:`ssl4ecg.rundirs.release_unstarted`).
    """
    from ssl4ecg.limits import check_run_resources

    if resume_dir is not None:
        if overwrite:
            raise ConfigError("--overwrite starts a run afresh and --resume continues one; give only one of them")
        resume_dir = Path(resume_dir)
        if out_dir is not None and Path(out_dir).absolute() != resume_dir.absolute():
            raise ConfigError(f"--resume {resume_dir} continues that run in its own folder; drop --out {out_dir}")
        saved = resume_dir / "recipe.toml"
        if not saved.exists():
            raise ConfigError(f"--resume {resume_dir}: no recipe.toml there; is it an ssl4ecg run directory?")
        recipe = parse_recipe(saved.read_text(encoding="utf-8"), str(saved))
        run = Run(recipe, resume_dir, registry)
        check_run_resources(run)
        return resume_dir, run.execute(resume=True, console=console)
    run = Run(recipe, Path(out_dir) if out_dir is not None else Path(recipe.run.get("out_root", "runs")), registry)
    check_run_resources(run)
    claim = _claim_run_dir(recipe, out_dir, overwrite)
    run.run_dir = claim.path
    try:
        return claim.path, run.execute(resume=False, console=console)
    except BaseException:
        if dist.is_rank0():
            from ssl4ecg.rundirs import release_unstarted

            release_unstarted(claim)
        raise


def _claim_run_dir(recipe: Recipe, out_dir: str | Path | None, overwrite: bool):
    """Rank 0 claims the run folder (see :mod:`ssl4ecg.rundirs`); every rank gets its claim or its error."""
    from ssl4ecg.rundirs import Claim, claim_out_dir

    answer: tuple[str, str | None, bool, str | None] = ("", None, False, None)
    if dist.is_rank0():
        try:
            if out_dir is not None:
                claim = claim_out_dir(out_dir, overwrite=overwrite)
            else:
                claim = Claim(default_run_dir(recipe), created=True)
            answer = ("", str(claim.path), claim.created, str(claim.moved_to) if claim.moved_to else None)
        except ConfigError as exc:
            answer = (str(exc), None, False, None)
        except OSError as exc:
            answer = (f"--out {out_dir}: {exc.strerror or exc}; choose a folder you can write to.", None, False, None)
    answer = dist.broadcast_object(answer)
    if answer[0]:
        raise ConfigError(answer[0])
    return Claim(Path(answer[1]), created=answer[2], moved_to=Path(answer[3]) if answer[3] else None)
