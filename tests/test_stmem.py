"""Tests of the ST-MEM plugin: masking, encoder layout, loss, multi-crop embedding, training."""

from __future__ import annotations

import pytest
import torch

import ssl4ecg_stmem
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import STANDARD_LEADS, Batch, SignalSpec, StepInfo
from ssl4ecg.registry import Registry
from ssl4ecg_stmem import STMEMEncoder, STMEMObjective, STMEMRandomMasker, masked_patch_mse
from ssl4ecg_stmem.encoder import crop_starts

# tiny geometry: 8 patches of 10 samples per lead (80-sample crops), records of 100 samples
PATCH, CROP, LENGTH = 10, 80, 100
N = CROP // PATCH
SPEC = SignalSpec(STANDARD_LEADS, 250.0, LENGTH)


def tiny_encoder(**kw) -> STMEMEncoder:
    torch.manual_seed(0)
    opts = dict(dim=16, depth=2, heads=2, patch_size=PATCH, crop_samples=CROP, n_test_crops=3)
    opts.update(kw)
    return STMEMEncoder(spec=SPEC, **opts)


def tiny_objective(encoder=None, **kw) -> STMEMObjective:
    torch.manual_seed(1)
    opts = dict(decoder_dim=8, decoder_depth=1, decoder_heads=2)
    opts.update(kw)
    return STMEMObjective(encoder=encoder or tiny_encoder(), masker=STMEMRandomMasker(0.75), **opts)


def signal(batch=3, leads=12, length=LENGTH, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32)
    base = torch.sin(2 * torch.pi * t / 25.0)
    return base + 0.3 * torch.randn(batch, leads, length, generator=g)


# ----------------------------------------------------------------------------- masker
def test_mask_counts_and_independence():
    masker = STMEMRandomMasker(0.75)
    mask = masker.sample(4, 12, 8, torch.Generator().manual_seed(0))
    assert mask.shape == (4, 12, 8) and mask.dtype == torch.bool
    assert (mask.sum(-1) == 6).all()  # exactly 75 % of 8 per lead and sample
    rows = {tuple(r.tolist()) for r in mask.reshape(-1, 8)}
    assert len(rows) > 20  # differs across leads and samples (48 rows of C(8,6)=28 patterns)
    assert not torch.equal(mask[0, 0], mask[0, 1]) or not torch.equal(mask[0, 1], mask[0, 2])
    assert not torch.equal(mask[0], mask[1])
    # paper geometry: 30 patches -> 7 visible, 23 masked (MAE rounding)
    assert (masker.sample(2, 12, 30, torch.Generator().manual_seed(1)).sum(-1) == 23).all()


def test_mask_is_reproducible_from_generator_and_ratio_checked():
    masker = STMEMRandomMasker(0.75)
    a = masker.sample(2, 12, 8, torch.Generator().manual_seed(5))
    b = masker.sample(2, 12, 8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="ratio"):
        STMEMRandomMasker(1.0)


# ----------------------------------------------------------------------------- encoder
def test_patchify_and_patch_embedding_shapes():
    enc = tiny_encoder()
    x = signal(length=CROP)
    patches = enc.patchify(x)
    assert patches.shape == (3, 12, N, PATCH)
    assert torch.equal(patches[1, 4, 3], x[1, 4, 3 * PATCH:4 * PATCH])
    assert enc.patch_embed(patches).shape == (3, 12, N, 16)
    assert enc.tokens(x).shape == (3, 12 * (N + 2), 16)
    assert enc.embed(x).shape == (3, 16)


def test_sep_tokens_at_both_ends_of_each_lead():
    enc = tiny_encoder(depth=0)  # no blocks: tokens = norm(input sequence)
    with torch.no_grad():
        t1 = enc.tokens(signal(seed=1, length=CROP)).reshape(3, 12, N + 2, 16)
        t2 = enc.tokens(signal(seed=2, length=CROP)).reshape(3, 12, N + 2, 16)
    # SEP slots do not depend on the signal, patch slots do
    assert torch.allclose(t1[:, :, 0], t2[:, :, 0]) and torch.allclose(t1[:, :, -1], t2[:, :, -1])
    assert not torch.allclose(t1[:, :, 1:-1], t2[:, :, 1:-1])
    # SEP = shared sep vector + its own position + lead embedding
    expected_left = enc.norm(enc.sep_embed + enc.pos_embed[0] + enc.lead_embed[5])
    assert torch.allclose(t1[0, 5, 0], expected_left, atol=1e-6)
    assert not torch.allclose(t1[0, 5, 0], t1[0, 5, -1])  # "ends": left and right SEP differ
    assert not torch.allclose(t1[0, 5, 0], t1[0, 6, 0])  # lead embeddings differ
    zero = tiny_encoder(depth=0, sep_position="zero")
    with torch.no_grad():
        tz = zero.tokens(signal(length=CROP)).reshape(3, 12, N + 2, 16)
    assert torch.allclose(tz[:, :, 0], tz[:, :, -1])  # reference convention: both SEP rows zero


def test_reduced_leads_use_their_own_embeddings():
    enc = tiny_encoder(depth=0)
    x = signal(length=CROP)
    sub = [STANDARD_LEADS.index("II"), STANDARD_LEADS.index("V1")]
    with torch.no_grad():
        full = enc.tokens(x).reshape(3, 12, N + 2, 16)
        part = enc.tokens(x[:, sub], leads=("II", "V1"))
    assert part.shape == (3, 2 * (N + 2), 16)
    assert torch.allclose(part.reshape(3, 2, N + 2, 16), full[:, sub], atol=1e-6)
    deep = tiny_encoder()
    assert deep.embed(x[:, sub], leads=("II", "V1")).shape == (3, 16)
    with pytest.raises(ConfigError, match="XYZ"):
        enc.tokens(x[:, :1], leads=("XYZ",))
    with pytest.raises(ConfigError, match="crop_samples"):
        enc.tokens(x[..., :40])


def test_multi_crop_embed_is_mean_of_crop_embeds():
    enc = tiny_encoder().eval()
    x = signal(length=LENGTH)
    starts = crop_starts(LENGTH, CROP, 3)
    assert starts == [0, 10, 20]
    with torch.no_grad():
        singles = [enc.embed(x[..., s:s + CROP]) for s in starts]
        multi = enc.embed(x)
        centre = enc.tokens(x)
    assert torch.allclose(multi, torch.stack(singles).mean(0), atol=1e-5)
    assert not torch.allclose(singles[0], singles[2])
    with torch.no_grad():
        assert torch.allclose(centre, enc.tokens(x[..., 10:10 + CROP]), atol=1e-6)


def test_embed_pools_non_sep_tokens():
    enc = tiny_encoder(pool="norm_mean").eval()
    x = signal(length=CROP)
    with torch.no_grad():
        tok = enc.tokens(x).reshape(3, 12, N + 2, 16)
        assert torch.allclose(enc.embed(x), tok[:, :, 1:-1].mean(dim=(1, 2)), atol=1e-5)
        assert not torch.allclose(enc.embed(x), tok.mean(dim=(1, 2)), atol=1e-5)
        ref = tiny_encoder(pool="mean_norm").eval()
        hidden = ref._encode_crop(x, list(range(12)))
        assert torch.allclose(ref.embed(x), ref.norm(hidden[:, :, 1:-1].mean(dim=(1, 2))), atol=1e-5)


def test_encode_visible_matches_full_encoder_when_nothing_masked():
    enc = tiny_encoder().eval()
    x = signal(length=CROP)
    visible = torch.ones(3, 12, N, dtype=torch.bool)
    with torch.no_grad():
        out = enc.encode_visible(enc.patchify(x), visible)
        assert torch.allclose(out.tokens.flatten(1, 2), enc.tokens(x), atol=1e-5)
        assert torch.allclose(out.pooled, enc.embed(x), atol=1e-5)


def test_encode_visible_pads_unequal_rows_without_leaking():
    """Rows with fewer visible patches are padded; padding must not change real tokens."""
    enc = tiny_encoder().eval()
    x = signal(batch=2, length=CROP)
    visible = torch.zeros(2, 12, N, dtype=torch.bool)
    visible[:, :, :2] = True
    visible[0, 3, 2:5] = True  # one row with 5 visible, the others 2
    with torch.no_grad():
        out = enc.encode_visible(enc.patchify(x), visible)
        assert out.tokens.shape == (2, 12, 5 + 2, 16)
        assert out.valid.sum().item() == 2 * 12 * 2 + 3
        # sample 1 has equal rows: same result as encoding it alone (no padding)
        alone = enc.encode_visible(enc.patchify(x[1:]), visible[1:, :, :])
        keep = alone.tokens.shape[2] - 2
        assert keep == 2
        assert torch.allclose(out.tokens[1, :, 1:1 + keep], alone.tokens[0, :, 1:-1], atol=1e-5)
        assert torch.allclose(out.tokens[1, :, 0], alone.tokens[0, :, 0], atol=1e-5)
        assert torch.allclose(out.tokens[1, :, -1], alone.tokens[0, :, -1], atol=1e-5)
        assert torch.allclose(out.pooled[1], alone.pooled[0], atol=1e-5)


def test_bad_encoder_options_raise_config_error_naming_key():
    with pytest.raises(ConfigError, match="patch_size"):
        STMEMEncoder(spec=SPEC, dim=16, depth=1, heads=2, patch_size=7, crop_samples=CROP)
    with pytest.raises(ConfigError, match="crop_samples"):
        STMEMEncoder(spec=SignalSpec(STANDARD_LEADS, 250.0, 50), dim=16, depth=1, heads=2,
                     patch_size=PATCH, crop_samples=CROP)
    with pytest.raises(ConfigError, match="sep_position"):
        tiny_encoder(sep_position="middle")


# ----------------------------------------------------------------------------- loss
def hand_loss(pred, patches, mask):
    """Direct loop over every masked patch: mean over masked patches of the per-patch MSE."""
    total, count = 0.0, 0
    for b in range(mask.shape[0]):
        for lead in range(mask.shape[1]):
            for k in range(mask.shape[2]):
                if mask[b, lead, k]:
                    t = patches[b, lead, k].double()
                    m = t.sum() / t.numel()
                    var = ((t - m) ** 2).sum() / (t.numel() - 1)
                    t = (t - m) / torch.sqrt(var + 1e-6)
                    total += ((pred[b, lead, k].double() - t) ** 2).mean().item()
                    count += 1
    return total / count


def test_loss_equals_hand_computation():
    obj = tiny_objective()
    x = signal(batch=2)
    out = obj.loss(Batch(x, STANDARD_LEADS, 250.0), StepInfo(0, 10, 0, torch.Generator().manual_seed(3)))
    g = torch.Generator().manual_seed(3)  # replay the same crop and mask
    crop = obj.random_crop(x, g)
    mask = obj.sample_mask(2, 12, g)
    with torch.no_grad():
        pred, _ = obj.predict(crop, mask)
    expected = hand_loss(pred, obj.encoder.patchify(crop), mask)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.logs["mask_ratio"] == pytest.approx(6 / 8)
    assert out.representation.shape == (2, 16) and not out.representation.requires_grad


def test_loss_ignores_visible_patch_predictions():
    torch.manual_seed(0)
    pred = torch.randn(2, 12, N, PATCH, requires_grad=True)
    patches = torch.randn(2, 12, N, PATCH)
    mask = STMEMRandomMasker(0.75).sample(2, 12, N, torch.Generator().manual_seed(0))
    loss = masked_patch_mse(pred, patches, mask)
    changed = pred.detach().clone()
    changed[~mask] += 100.0
    assert masked_patch_mse(changed, patches, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert (pred.grad[~mask] == 0).all() and (pred.grad[mask].abs().sum(-1) > 0).all()
    # without normalisation the raw patch is the target
    assert masked_patch_mse(patches, patches, mask, norm_target=False).item() == 0.0


def test_random_crop_uses_step_generator_and_checks_length():
    obj = tiny_objective()
    x = torch.arange(LENGTH, dtype=torch.float32).expand(4, 12, LENGTH).clone()
    a = obj.random_crop(x, torch.Generator().manual_seed(7))
    b = obj.random_crop(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (4, 12, CROP)
    starts = a[:, 0, 0]
    assert (a[:, :, :] == starts[:, None, None] + torch.arange(CROP)).all()  # contiguous, same for all leads
    with pytest.raises(ConfigError, match="crop_samples"):
        obj.random_crop(x[..., :CROP - 1], torch.Generator())


def test_objective_rejects_foreign_encoder():
    from ssl4ecg_stmem.objective import STMEMDecoder

    with pytest.raises(ConfigError, match="stmem_vit"):
        STMEMObjective(encoder=STMEMDecoder(4, 4, 1, 1, 2, 2, 1))


def test_registered_and_built_through_registry():
    registry = Registry()
    ssl4ecg_stmem.ssl4ecg_register(registry=registry)
    enc = registry.build("encoder", "stmem_vit", dict(dim=16, depth=1, heads=2, patch_size=PATCH,
                                                      crop_samples=CROP), "encoder", spec=SPEC)
    masker = registry.build("masker", "stmem_random", {"ratio": 0.5}, "masker")
    obj = registry.build("objective", "stmem", dict(decoder_dim=8, decoder_depth=1, decoder_heads=2),
                         "objective", spec=SPEC, encoder=enc, masker=masker)
    assert obj.masker is masker and obj.encoder is enc
    assert registry.get("encoder", "stmem_vit").options()["dim"] == 768
    out = obj.loss(Batch(signal(batch=2), STANDARD_LEADS, 250.0), StepInfo(0, 1, 0))
    assert out.logs["mask_ratio"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="unknown key 'ration'"):
        registry.build("masker", "stmem_random", {"ration": 0.5}, "masker")


def test_objective_with_decoder_lead_embedding_and_reduced_leads():
    obj = tiny_objective(decoder_lead_embed=True)
    x = signal(batch=2)[:, [1, 6]]
    out = obj.loss(Batch(x, ("II", "V1"), 250.0), StepInfo(0, 1, 0))
    out.loss.backward()
    assert obj.decoder.lead_embed[1].grad is not None and obj.decoder.lead_embed[0].grad is None
    assert obj.encoder.lead_embed[6].grad is not None and obj.encoder.lead_embed[0].grad is None


def test_a_few_steps_learn_beyond_the_trivial_prediction():
    """Fresh masks every step; the target patch depends on its position only, so it is learnable.

    Predicting zeros scores (p - 1) / p = 0.9 with normalised targets; a model that learnt
    nothing stays there.
    """
    obj = tiny_objective()
    t = torch.arange(CROP, dtype=torch.float32)
    batch = Batch(torch.sin(2 * torch.pi * t / 25.0).expand(4, 12, CROP).clone(), STANDARD_LEADS, 250.0)
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(80):
        out = obj.loss(batch, StepInfo(step, 80, 0, generator))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[0] > 1.0
    assert max(losses[-5:]) < 0.3
