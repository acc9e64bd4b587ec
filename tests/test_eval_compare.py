"""compare_runs: Markdown, CSV and JSON agree, best marked per direction, mixed protocols refused; plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from ssl4ecg.errors import ConfigError
from ssl4ecg.eval.compare import build_table, compare_runs, format_number
from ssl4ecg.eval.plots import plot_tsne, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LP_PROTOCOL = {"evaluator": "linear_probe", "classes": ["NORM", "MI"], "split_sizes": {"train": 10, "val": 5, "test": 5}}
FR_PROTOCOL = {"evaluator": "feature_regression", "targets": ["heart_rate"]}


def make_run(root: Path, name: str, objective: str, auc: float, f1: float, hr_mae: float,
             lp_protocol=LP_PROTOCOL, losses=(1.0, 0.5, 0.3), embeddings=False) -> Path:
    run = root / name
    run.mkdir(parents=True)
    recipe = {"run": {"name": name}, "data": {"source": "ptbxl", "path": "/data/ptbxl-mini"},
              "encoder": {"name": "vit"}, "objective": {"name": objective}, "train": {"steps": 3},
              "eval": [{"name": "linear_probe", "id": "lp"}, {"name": "feature_regression", "id": "fr"}]}
    (run / "recipe.toml").write_text(tomli_w.dumps(recipe))
    metrics = {
        "pretrain": {"steps": 300, "final_loss": losses[-1], "samples_per_s": 10.0, "seconds": 90.0},
        "eval": {
            "lp": {"auc_macro": auc, "auc_macro_ci": [auc - 0.02, auc + 0.01], "f1_macro": f1,
                   "f1_macro_ci": [f1 - 0.05, f1 + 0.05], "epoch": 7, "headline": ["auc_macro", "f1_macro"],
                   "protocol": lp_protocol},
            "fr": {"mae@heart_rate": hr_mae, "mae@heart_rate_std": 0.8, "headline": ["mae@heart_rate"],
                   "protocol": FR_PROTOCOL},
        },
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "log.jsonl").write_text("".join(json.dumps({"step": i * 100, "loss": v, "lr": 1e-4}) + "\n"
                                           for i, v in enumerate(losses)))
    if embeddings:
        rng = np.random.default_rng(0)
        k = rng.integers(0, 2, 60)
        (run / "embeddings").mkdir()
        np.savez(run / "embeddings" / "clustering_test.npz", features=rng.normal(size=(60, 5)) + 3 * k[:, None],
                 labels=k, class_names=np.array(["NORM", "MI"]))
    return run


@pytest.fixture
def runs(tmp_path):
    a = make_run(tmp_path, "jepa-a", "jepa", auc=0.9123, f1=0.61, hr_mae=2.5, embeddings=True)
    b = make_run(tmp_path, "simclr-b", "simclr", auc=0.8512, f1=0.66, hr_mae=1.75, losses=(2.0, 1.5, 1.2))
    return [a, b]


def _md_rows(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[:1] + lines[2:]]


def test_md_csv_json_agree(runs):
    md, text_csv, text_json = (compare_runs(runs, f) for f in ("md", "csv", "json"))
    md_rows = _md_rows(md)
    header, body = md_rows[0], md_rows[1:]
    csv_rows = list(csv.DictReader(io.StringIO(text_csv)))
    doc = json.loads(text_json)
    keys = [c["key"] for c in doc["columns"]]
    assert keys == ["lp/auc_macro", "lp/f1_macro", "fr/mae@heart_rate"]
    assert header == ["run", "method", "encoder", "data", "steps", "minutes"] + keys
    assert [r["run"] for r in csv_rows] == [r[0] for r in body] == [r["run"] for r in doc["rows"]] == ["jepa-a", "simclr-b"]
    for md_row, csv_row, json_row in zip(body, csv_rows, doc["rows"]):
        assert md_row[1] == csv_row["method"] == json_row["method"]
        assert md_row[3] == csv_row["data"] == json_row["data"] == "ptbxl:ptbxl-mini"
        assert md_row[4] == csv_row["steps"] == str(json_row["steps"]) == "300"
        assert float(md_row[5]) == pytest.approx(float(csv_row["minutes"])) == json_row["minutes"] == 1.5
        for i, key in enumerate(keys):
            cell = json_row["metrics"][key]
            text = md_row[6 + i]
            assert float(csv_row[key]) == cell["value"]
            assert text.replace("**", "").startswith(format_number(cell["value"]))
            assert (text.startswith("**")) == cell["best"] == (csv_row[f"{key}_best"] == "*")
            if cell["ci"]:
                assert [float(csv_row[f"{key}_ci_lo"]), float(csv_row[f"{key}_ci_hi"])] == cell["ci"]
                assert f"[{format_number(cell['ci'][0])}, {format_number(cell['ci'][1])}]" in text
            else:
                assert float(csv_row[f"{key}_std"]) == cell["std"]
                assert f"± {format_number(cell['std'])}" in text


def test_best_is_marked_per_direction(runs):
    doc = json.loads(compare_runs(runs, "json"))
    best = {(r["run"], k) for r in doc["rows"] for k, c in r["metrics"].items() if c["best"]}
    assert best == {("jepa-a", "lp/auc_macro"), ("simclr-b", "lp/f1_macro"), ("simclr-b", "fr/mae@heart_rate")}
    assert [c["lower_is_better"] for c in doc["columns"]] == [False, False, True]
    md = compare_runs(runs, "md")
    assert "**0.9123**" in md and "**1.7500**" in md and "**2.5000**" not in md


def test_mixed_protocols_are_refused(tmp_path, runs):
    other = dict(LP_PROTOCOL, split_sizes={"train": 10, "val": 5, "test": 6})
    c = make_run(tmp_path, "stmem-c", "stmem", auc=0.9, f1=0.6, hr_mae=2.0, lp_protocol=other)
    with pytest.raises(ConfigError, match="'lp'.*jepa-a.*stmem-c.*split_sizes"):
        compare_runs(runs + [c], "md")


def test_missing_metrics_and_bad_format(tmp_path, runs):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="metrics.json|recipe.toml"):
        compare_runs([runs[0], tmp_path / "empty"], "md")
    with pytest.raises(ConfigError, match="format"):
        compare_runs(runs, "xlsx")


def test_run_without_an_eval_gets_empty_cells(tmp_path, runs):
    d = make_run(tmp_path, "partial", "cpc", auc=0.7, f1=0.2, hr_mae=9.0)
    m = json.loads((d / "metrics.json").read_text())
    del m["eval"]["fr"]
    (d / "metrics.json").write_text(json.dumps(m))
    table = build_table(runs + [d])
    assert "fr/mae@heart_rate" not in table.rows[2].cells
    assert "—" in compare_runs(runs + [d], "md").splitlines()[4]


def _assert_png(path: Path):
    import matplotlib.image

    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def test_write_plots_makes_valid_pngs(tmp_path, runs):
    files = write_plots(runs, tmp_path / "plots")
    names = sorted(p.name for p in files)
    assert names == sorted(["loss_curves.png", "metric_lp_auc_macro.png", "metric_lp_f1_macro.png",
                            "metric_fr_mae_heart_rate.png", "tsne_jepa-a_clustering_test.png"])
    for p in files:
        _assert_png(p)


def test_plot_tsne_direct(tmp_path):
    rng = np.random.default_rng(1)
    k = np.repeat([0, 1, 2], 15)
    out = plot_tsne(rng.normal(size=(45, 4)) + 4 * k[:, None], k, ["a", "b", "c"], tmp_path / "t.png", max_points=30)
    _assert_png(out)
