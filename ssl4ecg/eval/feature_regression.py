"""Feature regression: predict ECG measurements (heart rate, QRS duration) from frozen features."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

import numpy as np
from sklearn.linear_model import LinearRegression, Ridge

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.common import SPLITS, check_float, check_float_list, check_positive_int, hash_splits
from ssl4ecg.eval.features import extract_features
from ssl4ecg.eval.metrics import bootstrap_ci, mae
from ssl4ecg.interfaces import EvalContext, Encoder, Evaluator


def resolve_callable(path: str, key: str) -> Callable:
    """Import ``"package.module:function"`` (or ``"package.module.function"``)."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"evaluator 'feature_regression': key '{key}' = '{path}' cannot be imported ({exc}); "
            f"give 'package.module:function'."
        ) from None


class FeatureRegression(Evaluator):
    """Ridge / linear regression of per-record targets on frozen features; penalty chosen on val.

    Targets come from ``records.extra`` (e.g. ``heart_rate`` in bpm, ``qrs_ms``) or, for targets
    the data does not carry, from ``target_fn`` -- a function ``fn(records) -> {name: array[N]}``
    given as ``"package.module:function"`` (or a callable from Python). Records whose target is
    NaN are skipped and counted. Features are standardised on train; the ridge penalty is chosen
    from ``ridge_alphas`` by val MAE (``0`` = ordinary least squares, the ECG-JEPA protocol).
    Reports test ``mae@<target>`` with ``_std`` (std of the absolute errors) and a bootstrap
    ``_ci``, plus R^2 and the chosen penalty.
    """

    name = "feature_regression"

    def __init__(
        self,
        targets: tuple = ("heart_rate", "qrs_ms"),
        ridge_alphas: tuple = (0.0, 0.1, 1.0, 10.0, 100.0, 1000.0),
        standardize: bool = True,
        target_fn: Any = "",
        bootstrap: int = 1000,
        alpha: float = 0.05,
    ) -> None:
        n = self.name
        if (not isinstance(targets, (list, tuple)) or not targets
                or not all(isinstance(t, str) and t for t in targets) or len(set(targets)) != len(targets)):
            raise ConfigError(f"evaluator '{n}': key 'targets' must be a non-empty list of distinct names, got {targets!r}.")
        self.targets = tuple(targets)
        self.ridge_alphas = check_float_list(n, "ridge_alphas", ridge_alphas, 0.0, allow_empty=False)
        self.standardize = bool(standardize)
        if callable(target_fn):
            self._target_fn = target_fn
            self.target_fn = getattr(target_fn, "__module__", "") + ":" + getattr(target_fn, "__qualname__", repr(target_fn))
        elif isinstance(target_fn, str):
            self.target_fn = target_fn
            self._target_fn = resolve_callable(target_fn, "target_fn") if target_fn else None
        else:
            raise ConfigError(f"evaluator '{n}': key 'target_fn' must be 'package.module:function', got {target_fn!r}.")
        self.bootstrap = check_positive_int(n, "bootstrap", bootstrap, minimum=0)
        self.alpha = check_float(n, "alpha", alpha, 0.0, 0.5, low_open=True)

    def protocol(self) -> dict[str, Any]:
        """Evaluator name and options."""
        return {
            "evaluator": self.name, "targets": list(self.targets), "ridge_alphas": list(self.ridge_alphas),
            "standardize": self.standardize, "target_fn": self.target_fn,
            "bootstrap": self.bootstrap, "alpha": self.alpha, "selection": "val mae",
        }

    def _target_values(self, records) -> dict[str, np.ndarray]:
        computed: Mapping[str, np.ndarray] = {}
        missing = [t for t in self.targets if t not in records.extra]
        if missing and self._target_fn is not None:
            computed = self._target_fn(records)
        values = {}
        for t in self.targets:
            if t in records.extra:
                values[t] = np.asarray(records.extra[t], dtype=np.float64)
            elif t in computed:
                values[t] = np.asarray(computed[t], dtype=np.float64)
            else:
                raise ConfigError(
                    f"evaluator '{self.name}': key 'targets' names '{t}', which the data does not "
                    f"carry (per-record values: {sorted(records.extra) or 'none'})"
                    + ("" if self._target_fn is None else " and target_fn does not compute")
                    + ". Drop it or give a 'target_fn' that computes it."
                )
            if values[t].shape != (len(records),):
                raise ConfigError(f"evaluator '{self.name}': target '{t}' has shape {values[t].shape}, expected ({len(records)},).")
        return values

    def fit_target(self, feats: dict[str, np.ndarray], y: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
        """Fit one target: skip NaN targets, choose the penalty on val, score test once."""
        ok = {s: np.isfinite(y[s]) for s in SPLITS}
        skipped = {s: int((~ok[s]).sum()) for s in SPLITS}
        for s in SPLITS:
            if ok[s].sum() < (2 if s == "train" else 1):
                raise ValueError(f"only {int(ok[s].sum())} records of the '{s}' split have a value")
        x = {s: np.asarray(feats[s][ok[s]], np.float64) for s in SPLITS}
        t = {s: y[s][ok[s]] for s in SPLITS}
        if self.standardize:
            mean, std = x["train"].mean(axis=0), x["train"].std(axis=0)
            std = np.where(std > 1e-8, std, 1.0)
            x = {s: (v - mean) / std for s, v in x.items()}
        best = None
        val_maes = {}
        for a in self.ridge_alphas:
            model = LinearRegression() if a == 0 else Ridge(alpha=a, random_state=seed)
            model.fit(x["train"], t["train"])
            val_mae = mae(t["val"], model.predict(x["val"]))
            val_maes[f"{a:g}"] = val_mae
            if best is None or val_mae < best[1]:
                best = (a, val_mae, model)
        a, val_mae, model = best
        pred = model.predict(x["test"])
        err = np.abs(pred - t["test"])
        ss_tot = float(np.sum((t["test"] - t["test"].mean()) ** 2))
        out = {
            "mae": float(err.mean()), "mae_std": float(err.std()),
            "r2": 1.0 - float(np.sum(err ** 2)) / ss_tot if ss_tot > 0 else float("nan"),
            "ridge_alpha": float(a), "val_mae": float(val_mae), "val_mae_by_alpha": val_maes,
            "n_scored": {s: int(ok[s].sum()) for s in SPLITS}, "n_skipped_nan": skipped,
        }
        if self.bootstrap > 0:
            out["mae_ci"] = list(bootstrap_ci(mae, t["test"], pred, n_resamples=self.bootstrap,
                                              seed=seed, alpha=self.alpha))
        return out

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """Test MAE (+- std, bootstrap CI) per target, penalty chosen on val."""
        values = self._target_values(records)
        index = {s: np.flatnonzero(np.asarray(records.splits) == s) for s in SPLITS}
        for s, idx in index.items():
            if len(idx) == 0:
                raise ConfigError(
                    f"evaluator '{self.name}' needs records in the '{s}' split, found none. "
                    f"Assign train/val/test splits in [data]."
                )
        feats = {s: extract_features(encoder, records.subset(idx), context) for s, idx in index.items()}
        out: dict[str, Any] = {"headline": []}
        for target in self.targets:
            y = {s: values[target][idx] for s, idx in index.items()}
            try:
                res = self.fit_target(feats, y, context.seed)
            except ValueError as exc:
                raise ConfigError(f"evaluator '{self.name}': target '{target}': {exc}; drop it from 'targets'.") from None
            out[f"mae@{target}"] = res.pop("mae")
            out[f"mae@{target}_std"] = res.pop("mae_std")
            if "mae_ci" in res:
                out[f"mae@{target}_ci"] = res.pop("mae_ci")
            out[f"r2@{target}"] = res.pop("r2")
            out[f"details@{target}"] = res
            out["headline"].append(f"mae@{target}")
        out["protocol"] = {
            **self.protocol(),
            "split_sizes": {s: int(len(i)) for s, i in index.items()},
            "split_hash": hash_splits({s: np.asarray(records.record_ids)[i] for s, i in index.items()}),
            "n_scored": {t: out[f"details@{t}"]["n_scored"] for t in self.targets},
        }
        return out
