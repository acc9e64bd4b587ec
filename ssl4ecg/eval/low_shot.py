"""Low-shot linear evaluation on nested, stratified fractions of the train split."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.common import check_float_list, check_positive_int, derive_seed, prepare_task
from ssl4ecg.eval.features import extract_features
from ssl4ecg.eval.linear_probe import LinearProbe
from ssl4ecg.interfaces import EvalContext, Encoder


def nested_stratified_subsets(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> dict[float, np.ndarray]:
    """Nested subsets of the rows of ``labels`` ``[N, C]``, one per fraction, stratified by label.

    Multi-label aware iterative stratification (after Sechidis et al., 2011), grown one record at
    a time: the records are put in one stratified order and the subset of fraction ``f`` is its
    first ``max(1, round(f * N))`` records, so every smaller subset is contained in every larger
    one and a subset does not depend on which other fractions are asked for. After ``k`` draws
    each class ``c`` should hold ``k / N * count_c`` records. While some class is short of that
    share, the class furthest behind (then the one with the fewest records left) is served first,
    with a random record carrying it, preferring label combinations that also serve other short classes
    and do not over-fill full ones. When no class is short, the subset is filled with the records
    that over-fill the fewest classes (records without labels first). Records with the same label
    combination are drawn in a random order fixed by the seed; ties between combinations are
    broken at random (also seeded). Deterministic for a given ``seed``.
    """
    y = np.asarray(labels) > 0.5
    n, n_classes = y.shape
    rng = np.random.default_rng(seed)
    order = sorted(set(float(f) for f in fractions))
    # records are grouped by label combination: the choice depends only on the labels, and
    # within a group records are drawn in a random order fixed by the seed
    combos, inverse = np.unique(y, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    combos_f = combos.astype(np.float64)
    queues = [rng.permutation(np.flatnonzero(inverse == g)) for g in range(len(combos))]
    heads = np.zeros(len(combos), dtype=np.int64)  # next position in each queue
    sizes = np.array([len(q) for q in queues])
    group_key = rng.random(len(combos))  # random tie-break between equally good groups
    counts = np.zeros(n_classes)
    totals = y.sum(axis=0).astype(np.float64)
    sizes_wanted = {f: min(n, max(1, int(round(f * n)))) for f in order}
    chosen: list[int] = []
    for k in range(max(sizes_wanted.values())):
        # after k + 1 draws each class should hold (k + 1) / n of its records
        deficit = (k + 1) / n * totals - counts
        left = totals - counts  # records of each class not yet drawn
        available = heads < sizes
        short = (deficit > 0) & (left > 0)
        if short.any():
            # the class furthest behind its share, then the one with the fewest records left
            cand = np.flatnonzero(short)
            c = cand[np.lexsort((left[cand], -deficit[cand]))[0]]
            eligible = available & combos[:, c]
        else:
            eligible = available
        gain = combos_f @ np.where(deficit > 0, np.minimum(deficit, 1.0), -1.0)
        groups = np.flatnonzero(eligible)
        g = groups[np.lexsort((group_key[groups], -gain[groups]))[0]]
        chosen.append(int(queues[g][heads[g]]))
        heads[g] += 1
        counts += combos_f[g]
    ordered = np.array(chosen, dtype=np.int64)
    out = {f: ordered[:size] for f, size in sizes_wanted.items()}
    return {float(f): out[float(f)] for f in fractions}


class LowShot(LinearProbe):
    """Linear probe trained on nested stratified fractions of train; ``trials`` seeded repeats.

    For each trial ``t`` the subsets come from a seed derived from the evaluation seed and ``t``
    (so every method sees the same records), the probe is fitted on the subset, its hyper-parameters chosen
    on the full val split, and test is scored. Reports, per fraction ``f``, the mean and std over
    trials as ``auc_macro@f`` / ``auc_macro@f_std`` (and the same for ``f1_macro``).
    """

    name = "low_shot"

    def __init__(
        self,
        fractions: tuple = (0.01, 0.1),
        trials: int = 5,
        solver: str = "lbfgs",
        l2_grid: tuple = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        max_iter: int = 1000,
        multi_label: bool = True,
        standardize: bool = True,
        epochs: int = 10,
        lr: float = 5e-4,
        weight_decay: float = 0.05,
        batch_size: int = 32,
        warmup_epochs: int = 3,
        lr_grid: tuple = (),
        weight_decay_grid: tuple = (),
        head_init: str = "zero",
        threshold: float = 0.5,
    ) -> None:
        super().__init__(
            solver=solver, l2_grid=l2_grid, max_iter=max_iter, multi_label=multi_label, standardize=standardize, epochs=epochs, lr=lr,
            weight_decay=weight_decay, batch_size=batch_size, warmup_epochs=warmup_epochs,
            lr_grid=lr_grid, weight_decay_grid=weight_decay_grid, head_init=head_init, threshold=threshold, bootstrap=0,
        )
        self.fractions = check_float_list(self.name, "fractions", fractions, 0.0, 1.0,
                                          low_open=True, allow_empty=False)
        if len(set(self.fractions)) != len(self.fractions):
            raise ConfigError(f"evaluator 'low_shot': key 'fractions' has duplicates: {list(fractions)}.")
        self.trials = check_positive_int(self.name, "trials", trials)

    def protocol(self) -> dict[str, Any]:
        """Probe options plus fractions and trials (no bootstrap: spread is over trials)."""
        proto = super().protocol()
        for key in ("bootstrap", "alpha"):
            proto.pop(key, None)
        return {**proto, "fractions": list(self.fractions), "trials": self.trials,
                "subsets": "nested iterative stratification"}

    def evaluate(self, encoder: Encoder, records, context: EvalContext) -> dict[str, Any]:
        """Mean and std of test metrics over trials, per fraction of the train split."""
        task = prepare_task(records, self.multi_label, self.name)
        feats = {s: extract_features(encoder, records.subset(task.index[s]), context) for s in task.index}
        per_fraction: dict[float, list[dict[str, Any]]] = {f: [] for f in self.fractions}
        for trial in range(self.trials):
            subsets = nested_stratified_subsets(
                task.targets["train"], self.fractions, derive_seed(context.seed, "low_shot", trial))
            for f in self.fractions:
                res = self.score_features(task, feats, derive_seed(context.seed, "probe", trial),
                                          bootstrap=0, train_rows=subsets[f])
                per_fraction[f].append(res)
        out: dict[str, Any] = {"headline": []}
        for f in self.fractions:
            tag = f"{f:g}"
            for metric in ("auc_macro", "f1_macro"):
                values = np.array([r[metric] for r in per_fraction[f]], dtype=np.float64)
                out[f"{metric}@{tag}"] = float(np.mean(values))
                out[f"{metric}@{tag}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                out["headline"].append(f"{metric}@{tag}")
            out[f"trials@{tag}"] = [
                {k: r[k] for k in ("auc_macro", "f1_macro", "val_auc_macro", "epoch", "l2", "n_train") if k in r}
                for r in per_fraction[f]
            ]
        out["protocol"] = {**self.protocol(), **task.protocol()}
        return out
