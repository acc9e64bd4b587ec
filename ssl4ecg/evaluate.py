"""``ssl4ecg eval``: score a saved encoder (run directory or encoder file) without retraining."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssl4ecg.artifacts import load_encoder
from ssl4ecg.io import atomic_write_json, atomic_write_text
from ssl4ecg.recipe import load_recipe
from ssl4ecg.run import Run, environment


def evaluate_saved_encoder(encoder_path: Path, recipe_path: Path, overrides: list[str],
                           out: Path | None = None, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Evaluate the encoder at ``encoder_path`` with the data and [[eval]] entries of a recipe.

    The preprocessing the encoder was trained with (sampling rate, seconds, leads,
    normalisation, band-pass) overrides the recipe's, so the encoder is fed what it expects.
    Writes ``metrics.json`` (same shape as a run's) into ``out``: a new folder, or an empty one.
    ``out`` never is (or holds, or lies among the files of) the evaluated run or another training
    run; a non-empty ``out`` is refused unless ``overwrite``, which moves it aside first.
    Nothing is created until the encoder, the recipe and the data sizes passed their checks.
    """
    from ssl4ecg.limits import check_run_resources
    from ssl4ecg.rundirs import check_eval_out, claim_new_dir, claim_out_dir, release_unstarted, stamp
    from ssl4ecg.registry import get_registry

    registry = get_registry()
    encoder, meta = load_encoder(encoder_path, registry)
    recipe = load_recipe(recipe_path, overrides)
    preprocess = meta.get("preprocess", {})
    recipe.data = {**recipe.data, **preprocess}
    if recipe.eval_data:
        recipe.eval_data = {**recipe.eval_data, **preprocess}
    recipe.encoder = {"name": meta["component"], **meta.get("options", {})}
    recipe.objective = {}
    recipe.masker = {}
    recipe.train = {**recipe.train, "max_steps": 0}
    default_parent = Path(recipe.run.get("out_root", "runs")) / f"{recipe.run.get('name', 'run')}-eval"
    if out is not None:
        check_eval_out(out, encoder_path)
    run = Run(recipe, out if out is not None else default_parent, registry, need_training=False)
    check_run_resources(run)
    claim = claim_out_dir(out, overwrite, command="eval") if out is not None else claim_new_dir(default_parent, stamp())
    out = run.run_dir = claim.path
    try:
        return _evaluate_into(run, encoder, Path(encoder_path), out)
    except BaseException:
        release_unstarted(claim)
        raise


def _evaluate_into(run: Run, encoder, encoder_path: Path, out: Path) -> tuple[Path, dict[str, Any]]:
    """Write the evaluation of ``encoder`` into the claimed folder ``out``."""
    atomic_write_text(out / "recipe.toml", run.recipe.to_toml())
    atomic_write_json(out / "env.json", environment(run.device, run.precision))
    _, eval_records = run.load_data()
    pretrain: dict[str, Any] = {"steps": None}
    source_metrics = Path(encoder_path) / "metrics.json"
    if source_metrics.is_file():  # a run directory: carry its pretraining summary along
        pretrain = dict(json.loads(source_metrics.read_text()).get("pretrain", {}))
    source_recipe = Path(encoder_path) / "recipe.toml"
    if source_recipe.is_file() and "method" not in pretrain:  # the run's objective, for tables
        import tomllib

        objective = tomllib.loads(source_recipe.read_text()).get("objective", {}) or {}
        if objective.get("name"):
            pretrain["method"] = str(objective["name"])
    pretrain.update(encoder=str(encoder_path), note="evaluated from a saved encoder")
    metrics: dict[str, Any] = {"pretrain": pretrain, "eval": {}}
    metrics_path = out / "metrics.json"
    atomic_write_json(metrics_path, metrics)
    run.evaluate(encoder, eval_records, metrics, metrics_path)
    return out, metrics

