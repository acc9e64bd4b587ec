"""The command line end to end on tiny runs: run, eval, compare, plugins and its error messages."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ssl4ecg.cli import app
from ssl4ecg.eval.compare import format_number

runner = CliRunner()
RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
TINY = ["--set", "data.n_records=120", "--set", "data.sampling_rate=100.0", "--set", "encoder.dim=32",
        "--set", "encoder.depth=1", "--set", "encoder.heads=2", "--set", "objective.predictor_dim=16",
        "--set", "objective.predictor_depth=1", "--set", "objective.predictor_heads=2",
        "--set", "train.batch_size=16", "--set", "train.max_minutes=0.0", "--set", "train.precision='fp32'",
        "--set", "eval.0.epochs=3", "--set", "eval.1.name='knn'"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    dirs = []
    for name, steps in (("pretrained", 6), ("random", 0)):
        out = base / name
        result = runner.invoke(app, ["run", RECIPE, *TINY, "--set", f"train.max_steps={steps}",
                                     "--set", f"run.name='{name}'", "--out", str(out)])
        assert result.exit_code == 0, result.output
        dirs.append(out)
    return dirs


def test_run_directory_contract(two_runs):
    run_dir = two_runs[0]
    for name in ("recipe.toml", "env.json", "log.jsonl", "metrics.json", "encoder.pt", "checkpoints/last.pt"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pretrain"]["steps"] == 6
    assert {"steps", "final_loss", "samples_per_s"} <= set(metrics["pretrain"])
    probe = metrics["eval"]["linear_probe"]
    assert {"auc_macro", "f1_macro", "auc_per_class", "auc_macro_ci"} <= set(probe)
    assert probe["auc_macro_ci"][0] <= probe["auc_macro"] <= probe["auc_macro_ci"][1]
    assert set(probe["auc_per_class"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
    assert "knn" in metrics["eval"]
    env = json.loads((run_dir / "env.json").read_text())
    assert env["packages"]["torch"] and env["device"] == "cpu" and "ssl4ecg" in env
    recipe = (run_dir / "recipe.toml").read_text()
    assert "patch_size = 50" in recipe and "max_steps = 6" in recipe  # defaults written out
    random_metrics = json.loads((two_runs[1] / "metrics.json").read_text())
    assert random_metrics["pretrain"]["steps"] == 0 and not (two_runs[1] / "log.jsonl").exists()


def test_compare_formats_agree(two_runs, tmp_path):
    outputs = {}
    for fmt in ("md", "csv", "json"):
        out = tmp_path / f"table.{fmt}"
        result = runner.invoke(app, ["compare", *map(str, two_runs), "--format", fmt, "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs[fmt] = out.read_text()
    table = json.loads(outputs["json"])
    rows = list(csv.DictReader(io.StringIO(outputs["csv"])))
    assert [r["run"] for r in rows] == [r["run"] for r in table["rows"]] == ["pretrained", "random"]
    for row_csv, row_json in zip(rows, table["rows"]):
        for column in table["columns"]:
            cell = row_json["metrics"].get(column["key"])
            value = None if cell is None else cell["value"]
            text = row_csv[column["key"]]
            if value is None:
                assert text in ("", "nan")
            else:
                assert float(text) == pytest.approx(value, abs=1e-4)
                assert format_number(value) in outputs["md"]


def test_eval_saved_encoder_reproduces_the_run(two_runs, tmp_path):
    out = tmp_path / "re-eval"
    result = runner.invoke(app, ["eval", str(two_runs[0]), "--recipe", RECIPE, *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    again = json.loads((out / "metrics.json").read_text())["eval"]["linear_probe"]
    original = json.loads((two_runs[0] / "metrics.json").read_text())["eval"]["linear_probe"]
    assert again["auc_macro"] == pytest.approx(original["auc_macro"], abs=1e-6)  # deterministic evaluation
    pretrain = json.loads((out / "metrics.json").read_text())["pretrain"]
    assert pretrain["steps"] == 6 and pretrain["method"] == "jepa"  # carried from the run
    table = tmp_path / "t.json"
    assert runner.invoke(app, ["compare", str(out), "--format", "json", "--out", str(table)]).exit_code == 0
    assert json.loads(table.read_text())["rows"][0]["method"] == "jepa"


def test_plugins_lists_components_by_kind():
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    for name in ("cropa_vit", "jepa", "multiblock", "random", "linear_probe", "synthetic", "ptbxl"):
        assert name in result.output


def test_typo_in_recipe_key_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["run", RECIPE, "--set", "encoder.dpeth=2", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "[encoder] unknown key 'dpeth'" in result.output and "Did you mean 'depth'?" in result.output
    assert "Traceback" not in result.output


def test_missing_dataset_path_names_it(tmp_path):
    jepa_mb = RECIPE.replace("quickstart", "jepa_mb")
    result = runner.invoke(app, ["run", jepa_mb, "--set", "data.source='ptbxl'",
                                 "--set", f"data.path='{tmp_path / 'nowhere'}'", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "nowhere" in result.output and "physionet.org" in result.output.replace("\n", "")
