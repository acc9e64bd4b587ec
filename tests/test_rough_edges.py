"""Rough edges a new user hits: embed keeps unlabelled records and says where drops are listed,
no warnings from embed on a cache, t-SNE of multi-label embeddings, a directory given as the
recipe, and a RECIPE given together with --resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from typer.testing import CliRunner

from ssl4ecg.cli import app

REPO = Path(__file__).resolve().parents[1]
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
runner = CliRunner()


def _text(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def encoder_file(tmp_path) -> Path:
    """A small untrained cropa_vit saved as `ssl4ecg embed` reads it (2 leads, 100 Hz, 10 s)."""
    from ssl4ecg.artifacts import save_encoder
    from ssl4ecg.interfaces import SignalSpec
    from ssl4ecg.registry import get_registry

    spec = SignalSpec(("I", "II"), 100.0, 1000)
    options = {"dim": 16, "depth": 1, "heads": 2, "patch_size": 50}
    encoder = get_registry().build("encoder", "cropa_vit", options, "encoder", spec=spec)
    return save_encoder(tmp_path / "encoder.pt", encoder, "cropa_vit", options,
                        {"sampling_rate": 100.0, "leads": ["I", "II"], "seconds": 10.0})


def _challenge_record(root: Path, name: str, dx: str, rng: np.random.Generator) -> None:
    """One PhysioNet/CinC challenge record: 12 leads, 500 Hz, 10 s, MAT v4 'val', '# Dx:' codes."""
    val = (rng.normal(size=(12, 5000)) * 300).astype(np.int16)
    scipy.io.savemat(root / f"{name}.mat", {"val": val}, format="4")
    lines = [f"{name} 12 500 5000"]
    lines += [f"{name}.mat 16+24 1000/mV 16 0 {val[j, 0]} 0 0 {lead}" for j, lead in enumerate(LEADS)]
    lines += ["# Age: 60", "# Sex: Female", f"# Dx: {dx}"]
    (root / f"{name}.hea").write_text("\n".join(lines) + "\n")


@pytest.fixture
def challenge_folder(tmp_path) -> Path:
    """Five challenge records: three with diagnoses outside the cpsc2018 map, one sinus rhythm
    (NORM), one whose signal file is truncated (unreadable)."""
    root = tmp_path / "challenge"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, dx in (("R000", "164934002"), ("R001", "426783006"), ("R002", "55930002,713426002"),
                     ("R003", "427084000"), ("R004", "426783006")):
        _challenge_record(root, name, dx, rng)
    mat = root / "R004.mat"
    mat.write_bytes(mat.read_bytes()[:2000])
    return root


def test_embed_keeps_every_readable_record_and_lists_the_dropped_ones(tmp_path, encoder_file,
                                                                      challenge_folder):
    out = tmp_path / "emb.npz"
    result = runner.invoke(app, ["embed", str(encoder_file), str(challenge_folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as data:
        ids = data["record_ids"].tolist()
        assert sorted(ids) == ["R000", "R001", "R002", "R003"]  # unlabelled ones too, not R004
        assert data["embeddings"].shape == (4, 16)
        names = data["class_names"].tolist()
        labels = dict(zip(ids, data["labels"]))
    assert names[0] == "NORM" and labels["R001"].tolist() == [1.0] + [0.0] * (len(names) - 1)
    for rid in ("R000", "R002", "R003"):  # outside the label map: embedded with an all-zero row
        assert not labels[rid].any()
    # the message points at a file that exists and lists the dropped record with its reason
    dropped = tmp_path / "emb.dropped.csv"
    text = _text(result)
    assert "1 record could not be used and is not embedded" in text and str(dropped) in text and "R004" in text
    rows = dropped.read_text().splitlines()
    assert rows[0] == "record_id,reason" and len(rows) == 2
    assert rows[1].startswith("R004,") and "truncated" in rows[1]
    assert "cache manifest" not in text


def test_embed_npy_lists_labels_and_an_explicit_keep_unlabelled_is_respected(tmp_path, encoder_file,
                                                                             challenge_folder):
    from ssl4ecg.embed import embed_records

    out = tmp_path / "emb.npy"
    summary = embed_records(encoder_file, challenge_folder, out, progress=False)
    assert summary["records"] == 4 and summary["dropped"] == 1
    rows = {r.split(",")[1]: r.split(",") for r in out.with_suffix(".csv").read_text().splitlines()[1:]}
    assert rows["R001"][-1] == "NORM" and rows["R000"][-1] == ""
    # asking for labelled records only still drops the others, each listed with its reason
    summary = embed_records(encoder_file, challenge_folder, out, ["keep_unlabelled=false"], progress=False)
    assert summary["records"] == 1 and summary["dropped"] == 4
    listed = Path(summary["dropped_file"]).read_text()
    assert "R003,no code of label map 'cpsc2018' (Dx 427084000)" in listed
    # a later run with nothing dropped does not leave the old list describing other embeddings
    (challenge_folder / "R004.mat").unlink()
    (challenge_folder / "R004.hea").unlink()
    summary = embed_records(encoder_file, challenge_folder, out, progress=False)
    assert summary["dropped"] == 0 and summary["dropped_file"] == ""
    assert (tmp_path / "emb.dropped.csv").read_text().splitlines() == ["record_id,reason"]


def test_embed_from_a_cache_prints_no_warning(tmp_path, encoder_file):
    """torch.from_numpy on the cache's read-only memory map warned; a fresh process shows it."""
    from ssl4ecg.data.build import prepare, resolve_data_section
    from ssl4ecg.registry import get_registry

    registry = get_registry()
    section = resolve_data_section({"source": "synthetic", "n_records": 24, "sampling_rate": 100.0,
                                    "leads": ["I", "II"]}, registry)
    prepare(section, registry, tmp_path / "cache", workers=1)
    out = tmp_path / "emb.npz"
    import ssl4ecg

    here = str(Path(ssl4ecg.__file__).resolve().parents[1])  # the same ssl4ecg as this process
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-W", "error", "-m", "ssl4ecg", "embed", str(encoder_file),
                           str(tmp_path / "cache"), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "non-writable" not in proc.stderr, proc.stderr
    with np.load(out) as data:
        assert data["embeddings"].shape == (24, 16) and np.isfinite(data["embeddings"]).all()


def test_embed_of_an_unlabelled_cpsc2018_folder_raises_no_python_warning(tmp_path, encoder_file):
    """Embedding needs no REFERENCE.csv: the source's note is enough, no UserWarning on top."""
    root = tmp_path / "cpsc"
    root.mkdir()
    rng = np.random.default_rng(1)
    for name in ("A0001", "A0002", "A0003"):
        data = (rng.normal(size=(12, 5000)) * 100).astype(np.int16)
        scipy.io.savemat(root / f"{name}.mat", {"ECG": {"sex": "Male", "age": 50, "data": data}})
    from ssl4ecg.embed import embed_records

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = embed_records(encoder_file, root, tmp_path / "emb.npz", progress=False)
    assert summary["records"] == 3
    assert [str(w.message) for w in caught] == []


def _fake_run(root: Path, name: str, labels: np.ndarray, class_names: list[str]) -> Path:
    run = root / name
    (run / "embeddings").mkdir(parents=True)
    (run / "recipe.toml").write_text(f'[run]\nname = "{name}"\n')
    (run / "metrics.json").write_text(json.dumps({"eval": {}}))
    rng = np.random.default_rng(0)
    np.savez(run / "embeddings" / "clustering_test.npz", features=rng.normal(size=(len(labels), 8)),
             labels=labels, class_names=np.array(class_names))
    return run


def test_tsne_of_multi_label_embeddings_colours_by_rarest_positive_class(tmp_path):
    multi = np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=np.float32)
    labels = np.tile(multi, (5, 1))
    run = _fake_run(tmp_path, "multi", labels, ["NORM", "MI", "STTC"])
    result = runner.invoke(app, ["compare", str(run), "--plots", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    png = tmp_path / "plots" / "tsne_multi_clustering_test.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    from ssl4ecg.eval.plots import NO_LABEL, rarest_positive_class

    # class counts 3, 2, 3: a record takes its positive class rarest in the set (ties: lower
    # index), so MI, never alone here, still has a colour; no positive class is its own group
    assert rarest_positive_class(multi).tolist() == [0, 2, 1, NO_LABEL, 0, 1]


def test_tsne_rejects_labels_of_another_shape(tmp_path):
    from ssl4ecg.errors import ConfigError
    from ssl4ecg.eval.plots import plot_tsne

    with pytest.raises(ConfigError, match=r"class indices \[N\] or multi-hot \[N, C\]; got shape \(6, 2, 2\)"):
        plot_tsne(np.zeros((6, 4)), np.zeros((6, 2, 2)), ["a", "b"], tmp_path / "t.png")


def test_a_directory_given_as_recipe_is_named_as_such(tmp_path, encoder_file):
    recipes = REPO / "recipes"
    result = runner.invoke(app, ["run", str(recipes)])
    text = _text(result)
    assert result.exit_code == 2 and f"recipe {recipes} is a directory, not a recipe file" in text
    assert "give one of its recipe files, e.g." in text and "not found" not in text
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.toml").write_text((recipes / "quickstart.toml").read_text())
    result = runner.invoke(app, ["eval", str(encoder_file), "--recipe", str(run_dir)])
    text = _text(result)
    assert result.exit_code == 2 and f"e.g. {run_dir / 'recipe.toml'}" in text
    assert f"ssl4ecg run --resume {run_dir}" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    text = _text(runner.invoke(app, ["run", str(empty)]))
    assert "is a directory, not a recipe file: give a recipe .toml file" in text


def test_resume_refuses_another_recipe_but_accepts_its_own(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # a damaged recipe.toml: resuming with it fails at once, after the check under test
    (run_dir / "recipe.toml").write_text("[run\n")
    other = REPO / "recipes" / "quickstart.toml"
    result = runner.invoke(app, ["run", str(other), "--resume", str(run_dir)])
    text = _text(result)
    assert result.exit_code == 2
    assert (f"--resume {run_dir} continues with that run's own recipe.toml, which is fixed; RECIPE {other} "
            f"would be ignored: give only --resume {run_dir}") in text
    # the run's own recipe.toml, even spelled relatively, passes this check (and the resume
    # then reads it: this one is not valid TOML)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", "run/../run/recipe.toml", "--resume", "run"])
    text = _text(result)
    assert "would be ignored" not in text
    assert result.exit_code == 2 and "not valid TOML" in text
