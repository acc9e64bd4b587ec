"""Conformance with the public ECG-JEPA reference (shared/fixtures/ecg-jepa-reference).

The fixture holds reference state_dicts (tiny encoder: dim 64, depth 2, 4 heads, 8 leads x
2500 samples, patch 50) and the reference's outputs. We import the weights through the
plugin's reference-import path and reproduce every output to 1e-5. Negative controls show
that the comparison would catch a wrong CroPA, positional-embedding placement or layout,
or token order.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from ssl4ecg.errors import CheckpointError

from ssl4ecg_jepa.encoder import CroPAViT
from ssl4ecg_jepa.objective import layer_normed, masked_latent_loss
from ssl4ecg_jepa.reference import (
    encoder_from_reference_state_dict,
    import_reference_checkpoint,
    predictor_from_reference_state_dict,
)

TOL = 1e-5
HEADS = 4  # the fixture's tiny encoder and predictor both use 4 heads


@functools.lru_cache(maxsize=1)
def _load_fixture(path: str) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture
def fixture(shared_fixtures: Path) -> dict:
    """The reference fixture (skipped with the reason when ../shared/fixtures is absent)."""
    path = shared_fixtures / "ecg-jepa-reference" / "fixture.pt"
    if not path.is_file():
        pytest.skip(f"ECG-JEPA reference fixture not found at {path}")
    return _load_fixture(str(path))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def imported(fixture: dict, variant: str, tmp_path: Path) -> CroPAViT:
    """The variant's encoder, read through the released-checkpoint import path."""
    path = tmp_path / f"{variant}.pth"
    torch.save({"encoder": fixture[variant]["state_dict"], "epoch": 3}, path)
    encoder, metadata = import_reference_checkpoint(path, heads=HEADS)
    assert metadata["epoch"] == 3 and metadata["format"] == "ecg-jepa-reference"
    assert (metadata["dim"], metadata["depth"], metadata["patch_size"], metadata["n_samples"]) == (64, 2, 50, 2500)
    assert metadata["leads"] == ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    return encoder


@pytest.mark.parametrize("variant", ["init", "stress"])
def test_encoder_reproduces_reference_outputs(fixture, variant, tmp_path):
    encoder = imported(fixture, variant, tmp_path)
    expected = fixture[variant]
    x = fixture["x"]
    captured = {}
    encoder.patch_embed.register_forward_hook(lambda m, a, out: captured.__setitem__("patch", out))
    for i, block in enumerate(encoder.blocks):
        block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(f"block{i}", out))
    with torch.no_grad():
        tokens = encoder.tokens(x)
        intermediates = dict(captured)
        pooled = encoder.embed(x)
        context = encoder.context_tokens(x, fixture["visible_slots"])
    assert torch.equal(encoder._attention_mask(8, 50, x.device), fixture["cropa_mask"])
    assert max_diff(intermediates["patch"], expected["intermediate_full_patch_embed"]) < TOL
    assert max_diff(intermediates["block0"], expected["intermediate_full_block0_out"]) < TOL
    assert max_diff(intermediates["block1"], expected["intermediate_full_block1_out"]) < TOL
    assert max_diff(tokens, expected["tokens"]) < TOL
    assert max_diff(pooled, expected["pooled"]) < TOL
    assert max_diff(context, expected["context_tokens"]) < TOL


def test_per_sample_context_path_reproduces_reference(fixture):
    encoder = encoder_from_reference_state_dict(fixture["stress"]["state_dict"], heads=HEADS)
    per_sample = fixture["visible_slots"].expand(2, -1).contiguous()
    with torch.no_grad():
        context = encoder.context_tokens(fixture["x"], per_sample)
    assert max_diff(context, fixture["stress"]["context_tokens"]) < TOL


def test_predictor_and_loss_reproduce_reference(fixture):
    reference = fixture["stress_predictor"]
    predictor = predictor_from_reference_state_dict(reference["state_dict"], heads=HEADS)
    visible, masked = fixture["visible_slots"], fixture["masked_slots"]
    context = fixture["stress"]["context_tokens"]
    with torch.no_grad():
        full = predictor(context, visible, masked, n_leads=8, only_masked=False)
        at_masked = predictor(context, visible, masked, n_leads=8)
    assert max_diff(full.reshape(2, 400, 64), reference["predictor_out"]) < TOL
    assert max_diff(at_masked.reshape(2, 240, 64), reference["z_pred_masked"]) < TOL
    targets = layer_normed(fixture["stress"]["tokens"])
    masked_targets = targets.view(2, 8, 50, 64)[:, :, masked].reshape(2, 240, 64)
    assert max_diff(masked_targets, reference["target_masked_layernormed"]) < TOL
    loss = masked_latent_loss(at_masked, targets, masked)
    assert abs(loss.item() - reference["smooth_l1_loss"].item()) < TOL


# ---------------------------------------------------------------------- negative controls
def stress_encoder(fixture, **overrides) -> CroPAViT:
    """The stress weights in an encoder that may deviate from the reference in one detail."""
    reference = encoder_from_reference_state_dict(fixture["stress"]["state_dict"], heads=HEADS)
    options = dict(dim=64, depth=2, heads=HEADS, patch_size=50, drop_path=0.0)
    options.update(overrides)
    encoder = CroPAViT(reference.spec, **options)
    encoder.load_state_dict(reference.state_dict())
    return encoder.eval()


def test_control_full_attention_is_detected(fixture):
    with torch.no_grad():
        tokens = stress_encoder(fixture, cropa=False).tokens(fixture["x"])
    assert max_diff(tokens, fixture["stress"]["tokens"]) > 0.1


def test_control_pos_added_once_is_detected(fixture):
    with torch.no_grad():
        tokens = stress_encoder(fixture, pos_every_block=False).tokens(fixture["x"])
    assert max_diff(tokens, fixture["stress"]["tokens"]) > 0.1


def test_control_lead_first_pos_layout_is_detected(fixture):
    encoder = stress_encoder(fixture)
    encoder.pos_embed.copy_(encoder.pos_embed.roll(32, dims=-1))  # lead half first, time half second
    with torch.no_grad():
        tokens = encoder.tokens(fixture["x"])
    assert max_diff(tokens, fixture["stress"]["tokens"]) > 0.1


def test_control_time_major_token_order_is_detected(fixture):
    """Feed the patches time-major (token k = slot * 8 + lead) into the lead-major grid."""
    x = fixture["x"]
    time_major = x.view(2, 8, 50, 50).transpose(1, 2).reshape(2, 8, 2500)
    with torch.no_grad():
        tokens = stress_encoder(fixture).tokens(time_major)
    assert max_diff(tokens, fixture["stress"]["tokens"]) > 0.1


# ---------------------------------------------------------------------- import errors
def test_import_errors_name_the_problem(fixture, tmp_path):
    state = dict(fixture["init"]["state_dict"])
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        import_reference_checkpoint(tmp_path / "absent.pth")
    torch.save({"model": state}, tmp_path / "wrong_layout.pth")
    with pytest.raises(CheckpointError, match="wrong_layout.pth.*'encoder'"):
        import_reference_checkpoint(tmp_path / "wrong_layout.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        import_reference_checkpoint(tmp_path / "garbage.pth")

    missing = {k: v for k, v in state.items() if k != "encoder_blocks.blocks.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.mlp.fc2.bias'\]"):
        encoder_from_reference_state_dict(missing, heads=HEADS)
    extra = dict(state, **{"mask_token": torch.zeros(1, 1, 64)})
    with pytest.raises(CheckpointError, match="unexpected keys.*mask_token"):
        encoder_from_reference_state_dict(extra, heads=HEADS)
    learned_pos = dict(state, pos_embed=torch.randn(400, 64) * 0.02)
    with pytest.raises(CheckpointError, match="sin-cos"):
        encoder_from_reference_state_dict(learned_pos, heads=HEADS)
    with pytest.raises(CheckpointError, match="missing"):
        predictor_from_reference_state_dict(state, heads=HEADS)
