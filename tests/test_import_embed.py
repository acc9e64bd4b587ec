"""`ssl4ecg import ecg-jepa` and `ssl4ecg embed`, end to end through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ssl4ecg.artifacts import load_encoder
from ssl4ecg.cli import app

runner = CliRunner()


@pytest.fixture
def reference_checkpoint(tmp_path, shared_fixtures):
    fixture = torch.load(shared_fixtures / "ecg-jepa-reference" / "fixture.pt", weights_only=True)
    path = tmp_path / "released.pth"
    torch.save({"encoder": fixture["stress"]["state_dict"], "epoch": 99}, path)
    return path, fixture


def test_import_reproduces_reference_outputs(tmp_path, reference_checkpoint):
    ckpt, fixture = reference_checkpoint
    out = tmp_path / "jepa_encoder.pt"
    result = runner.invoke(app, ["import", "ecg-jepa", str(ckpt), "--out", str(out), "--heads", "4"])
    assert result.exit_code == 0, result.output
    encoder, meta = load_encoder(out)
    assert meta["component"] == "cropa_vit" and meta["options"]["heads"] == 4
    assert meta["preprocess"]["sampling_rate"] == 250.0 and meta["preprocess"]["normalize"] == "none"
    assert meta["preprocess"]["leads"] == ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert meta["reference"]["epoch"] == 99
    with torch.no_grad():
        tokens = encoder.tokens(fixture["x"])
        pooled = encoder.embed(fixture["x"])
    assert torch.allclose(tokens, fixture["stress"]["tokens"], atol=1e-5)
    assert torch.allclose(pooled, fixture["stress"]["pooled"], atol=1e-5)


def test_import_with_wrong_heads_fails_the_fixture(tmp_path, reference_checkpoint):
    ckpt, fixture = reference_checkpoint
    out = tmp_path / "wrong.pt"
    assert runner.invoke(app, ["import", "ecg-jepa", str(ckpt), "--out", str(out), "--heads", "2"]).exit_code == 0
    encoder, _ = load_encoder(out)
    with torch.no_grad():
        diff = (encoder.tokens(fixture["x"]) - fixture["stress"]["tokens"]).abs().max()
    assert diff > 0.05


def test_import_rejects_a_foreign_file(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {}}, bad)
    result = runner.invoke(app, ["import", "ecg-jepa", str(bad), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2
    assert "expected an ECG-JEPA checkpoint" in result.output


@pytest.mark.slow
def test_embed_real_records_with_ids(tmp_path, reference_checkpoint, shared_data):
    ckpt, _ = reference_checkpoint
    enc = tmp_path / "enc.pt"
    assert runner.invoke(app, ["import", "ecg-jepa", str(ckpt), "--out", str(enc), "--heads", "4"]).exit_code == 0
    out = tmp_path / "emb.npz"
    result = runner.invoke(app, ["embed", str(enc), str(shared_data / "ptbxl-mini"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = np.load(out)
    assert data["embeddings"].shape == (1819, 64)
    assert len(set(data["record_ids"].tolist())) == 1819
    assert np.isfinite(data["embeddings"]).all()
    # .npy + .csv variant, on the challenge-format folder
    out2 = tmp_path / "emb.npy"
    result = runner.invoke(app, ["embed", str(enc), str(shared_data / "cinc-sample" / "ptbxl-hr"), "--out", str(out2)])
    assert result.exit_code == 0, result.output
    assert np.load(out2).shape == (10, 64)
    rows = (tmp_path / "emb.csv").read_text().splitlines()
    assert rows[0] == "row,record_id,patient_id,split,labels" and len(rows) == 11
