"""ECG-JEPA plugin: CroPA encoder, time-slot maskers, predictor and objective."""

from __future__ import annotations

import pytest
import torch

from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.interfaces import Batch, Encoder, Masker, SignalSpec, StepInfo
from ssl4ecg.registry import collect

import ssl4ecg_jepa
from ssl4ecg_jepa import CroPAViT, JEPAObjective, MultiBlockSlotMasker, RandomSlotMasker, cropa_mask
from ssl4ecg_jepa.masking import equalise_visible_
from ssl4ecg_jepa.objective import layer_normed, masked_latent_loss

LEADS = ("I", "II", "V1", "V2")
SPEC = SignalSpec(leads=LEADS, sampling_rate=100.0, n_samples=200)  # patch 25 -> 8 slots


def small_encoder(**overrides) -> CroPAViT:
    options = dict(dim=32, depth=2, heads=4, patch_size=25, drop_path=0.0)
    options.update(overrides)
    return CroPAViT(SPEC, **options)


def small_objective(encoder=None, masker=None, **overrides) -> JEPAObjective:
    options = dict(predictor_dim=16, predictor_depth=1, predictor_heads=2)
    options.update(overrides)
    return JEPAObjective(encoder or small_encoder(), masker, **options)


def smooth_signals(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Sums of a few random sinusoids per lead: structured, predictable signals."""
    t = torch.arange(SPEC.n_samples) / SPEC.sampling_rate
    freq = 0.5 + 3 * torch.rand(batch, len(LEADS), 3, 1, generator=generator)
    phase = 6.28 * torch.rand(batch, len(LEADS), 3, 1, generator=generator)
    return torch.sin(6.28 * freq * t + phase).sum(dim=2)


def make_batch(batch: int = 4, seed: int = 0) -> Batch:
    return Batch(signal=smooth_signals(batch, torch.Generator().manual_seed(seed)), leads=LEADS, sampling_rate=100.0)


class FixedMasker(Masker):
    """Returns a given [B, S] slot mask (broadcast over leads)."""

    def __init__(self, slot_mask: torch.Tensor) -> None:
        self.slot_mask = slot_mask

    def sample(self, batch_size, n_leads, n_slots, generator):
        return self.slot_mask[:, None, :].expand(batch_size, n_leads, n_slots)


# ---------------------------------------------------------------------- CroPA
ALLOWED_3x4 = {  # query token -> keys it may attend; token = lead * 4 + slot
    0: {0, 1, 2, 3, 4, 8}, 1: {0, 1, 2, 3, 5, 9}, 2: {0, 1, 2, 3, 6, 10}, 3: {0, 1, 2, 3, 7, 11},
    4: {4, 5, 6, 7, 0, 8}, 5: {4, 5, 6, 7, 1, 9}, 6: {4, 5, 6, 7, 2, 10}, 7: {4, 5, 6, 7, 3, 11},
    8: {8, 9, 10, 11, 0, 4}, 9: {8, 9, 10, 11, 1, 5}, 10: {8, 9, 10, 11, 2, 6}, 11: {8, 9, 10, 11, 3, 7},
}


def test_cropa_mask_hand_listed_3_leads_4_slots():
    mask = cropa_mask(3, 4)
    assert mask.shape == (12, 12) and mask.dtype == torch.bool
    for query in range(12):
        assert set(mask[query].nonzero().flatten().tolist()) == ALLOWED_3x4[query]


def test_cropa_restricted_to_visible_slots_is_the_smaller_grid():
    visible_slots = [0, 2]
    visible_tokens = [lead * 4 + s for lead in range(3) for s in visible_slots]  # lead-major
    restricted = cropa_mask(3, 4)[visible_tokens][:, visible_tokens]
    # hand-listed for tokens (lead, slot): 0=(0,0) 1=(0,2) 2=(1,0) 3=(1,2) 4=(2,0) 5=(2,2)
    expected_allowed = {
        0: {0, 1, 2, 4}, 1: {0, 1, 3, 5}, 2: {2, 3, 0, 4}, 3: {2, 3, 1, 5}, 4: {4, 5, 0, 2}, 5: {4, 5, 1, 3},
    }
    for query, keys in expected_allowed.items():
        assert set(restricted[query].nonzero().flatten().tolist()) == keys
    assert torch.equal(restricted, cropa_mask(3, 2))


def test_cropa_blocks_other_lead_other_slot_in_one_block():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 200)
    y = x.clone()
    y[0, 1, 25:50] += 3.0  # lead II, slot 1
    for cropa in (True, False):
        enc = small_encoder(depth=1, cropa=cropa).eval()
        diff = (enc.tokens(x) - enc.tokens(y)).abs().amax(-1).view(4, 8)
        affected = diff > 1e-6
        if cropa:
            expected = torch.zeros(4, 8, dtype=torch.bool)
            expected[1, :] = True  # same lead
            expected[:, 1] = True  # same slot
            assert torch.equal(affected, expected)
        else:
            assert affected.all()


def test_cropa_mask_is_cached_per_geometry():
    enc = small_encoder()
    first = enc._attention_mask(4, 8, torch.device("cpu"))
    assert enc._attention_mask(4, 8, torch.device("cpu")) is first
    assert enc._attention_mask(4, 3, torch.device("cpu")).shape == (12, 12)
    assert small_encoder(cropa=False)._attention_mask(4, 8, torch.device("cpu")) is None


# ---------------------------------------------------------------------- encoder
def test_tokens_shapes_and_embed_is_token_mean():
    enc = small_encoder().eval()
    x = torch.randn(3, 4, 200)
    tokens = enc.tokens(x)
    assert tokens.shape == (3, 32, 32) and enc.n_slots == 8 and enc.embed_dim == 32
    torch.testing.assert_close(enc.embed(x), tokens.mean(dim=1))
    assert "pos_embed" not in enc.state_dict()


def test_reduced_lead_tokens_use_each_leads_own_position():
    enc = small_encoder().eval()
    x = torch.randn(2, 4, 200)
    single = enc.tokens(x[:, 1:2], leads=["II"])
    assert single.shape == (2, 8, 32)
    assert not torch.allclose(single, enc.tokens(x[:, 1:2], leads=["I"]), atol=1e-4)
    # permuting leads together with their names only permutes the token blocks
    a = enc.tokens(x[:, [2, 1]], leads=["V1", "II"]).view(2, 2, 8, 32)
    b = enc.tokens(x[:, [1, 2]], leads=["II", "V1"]).view(2, 2, 8, 32)
    torch.testing.assert_close(a, b.flip(1), atol=1e-5, rtol=1e-5)


def test_context_tokens_ignore_masked_slots_and_match_full_when_all_visible():
    enc = small_encoder().eval()
    x = torch.randn(2, 4, 200)
    visible = torch.tensor([0, 3, 5])
    context = enc.context_tokens(x, visible)
    assert context.shape == (2, 4 * 3, 32)
    y = x.clone()
    y[:, :, 25:75] += 10.0  # slots 1 and 2 are masked
    torch.testing.assert_close(enc.context_tokens(y, visible), context)
    torch.testing.assert_close(enc.context_tokens(x, torch.arange(8)), enc.tokens(x), atol=1e-5, rtol=1e-5)


def test_context_tokens_equal_reference_slicing_of_the_full_grid():
    """Embed all tokens, slice tokens/pos/CroPA to the visible ones, run the blocks (the reference)."""
    enc = small_encoder().eval()
    x = torch.randn(2, 4, 200)
    visible = torch.tensor([1, 2, 6])
    keep = torch.tensor([lead * 8 + s for lead in range(4) for s in visible.tolist()])
    h = enc.patch_embed(x.reshape(2, 32, 25))[:, keep]
    pos = enc.pos_embed.reshape(32, 32)[keep]
    mask = cropa_mask(4, 8)[keep][:, keep]
    for block in enc.blocks:
        h = block(h + pos, mask)
    torch.testing.assert_close(enc.context_tokens(x, visible), enc.norm(h), atol=1e-5, rtol=1e-5)


def test_per_sample_context_equals_each_sample_alone():
    enc = small_encoder().eval()
    x = torch.randn(3, 4, 200)
    visible = torch.tensor([[0, 1, 4], [2, 5, 7], [0, 6, 7]])
    batched = enc.context_tokens(x, visible)
    for b in range(3):
        torch.testing.assert_close(batched[b:b + 1], enc.context_tokens(x[b:b + 1], visible[b]), atol=1e-5, rtol=1e-5)


def test_encoder_input_errors():
    enc = small_encoder()
    with pytest.raises(ConfigError, match="aVR"):
        enc.tokens(torch.randn(1, 1, 200), leads=["aVR"])
    with pytest.raises(DataError, match="200 samples"):
        enc.tokens(torch.randn(1, 4, 150))
    with pytest.raises(ConfigError, match="patch_size=30"):
        CroPAViT(SPEC, dim=32, depth=1, heads=4, patch_size=30)
    with pytest.raises(ConfigError, match="heads"):
        CroPAViT(SPEC, dim=32, depth=1, heads=5, patch_size=25)
    with pytest.raises(ValueError, match="visible_slots"):
        enc.context_tokens(torch.randn(1, 4, 200), torch.tensor([0, 8]))


def test_drop_path_rises_linearly_over_blocks():
    enc = small_encoder(depth=3, drop_path=0.2)
    assert [b.drop_path.rate for b in enc.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_pos_every_block_changes_the_output():
    torch.manual_seed(0)
    every = small_encoder().eval()
    once = small_encoder(pos_every_block=False).eval()
    once.load_state_dict(every.state_dict())
    x = torch.randn(1, 4, 200)
    assert not torch.allclose(every.tokens(x), once.tokens(x), atol=1e-3)


# ---------------------------------------------------------------------- maskers
def _slot_rows(mask: torch.Tensor) -> torch.Tensor:
    assert mask.dtype == torch.bool
    assert torch.equal(mask, mask[:, :1].expand_as(mask)), "a masked slot must be masked in every lead"
    return mask[:, 0]


def test_random_masker_ratio_and_shared_mask():
    masker, gen = RandomSlotMasker(), torch.Generator().manual_seed(0)
    counts = []
    for _ in range(400):
        mask = masker.sample(3, 8, 50, gen)
        assert mask.shape == (3, 8, 50)
        rows = _slot_rows(mask)
        assert torch.equal(rows, rows[:1].expand_as(rows)), "per_sample=False shares the mask"
        counts.append(int(rows[0].sum()))
    assert set(counts) == {30, 31, 32, 33, 34}  # int(50 * U(0.6, 0.7))
    assert all(0.6 <= c / 50 <= 0.7 for c in counts)


def test_multiblock_single_block_lengths_and_starts():
    masker, gen = MultiBlockSlotMasker(n_blocks=1), torch.Generator().manual_seed(0)
    rows = masker.slot_masks(3000, 50, gen)
    lengths = rows.sum(dim=1)
    assert set(lengths.tolist()) == {8, 9, 10, 11}  # int(50 * U(0.175, 0.225))
    for row in rows[:200]:
        idx = row.nonzero().flatten()
        assert torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + len(idx))), "one contiguous block"
    starts = rows.float().argmax(dim=1)
    assert starts.min() == 0
    assert not rows[:, -1].any(), "the reference's start rule never reaches the last slot"


def test_multiblock_mean_ratio_and_shared_mask():
    masker, gen = MultiBlockSlotMasker(), torch.Generator().manual_seed(1)
    counts = []
    for _ in range(1500):
        rows = _slot_rows(masker.sample(2, 8, 50, gen))
        assert torch.equal(rows[0], rows[1])
        counts.append(int(rows[0].sum()))
    mean_ratio = sum(counts) / len(counts) / 50
    assert 0.52 < mean_ratio < 0.58, mean_ratio
    assert min(counts) >= 8 and max(counts) <= 44  # longest block .. 4 disjoint blocks of 11


@pytest.mark.parametrize("masker", [RandomSlotMasker(per_sample=True), MultiBlockSlotMasker(per_sample=True)])
def test_per_sample_masks_differ_but_have_equal_visible_counts(masker):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = _slot_rows(masker.sample(16, 8, 50, gen))
        visible = (~rows).sum(dim=1)
        assert (visible == visible[0]).all() and visible[0] > 0
        assert len({tuple(r.tolist()) for r in rows}) > 1


def test_equalise_visible_only_masks_extra_visible_slots():
    gen = torch.Generator().manual_seed(0)
    original = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    out = equalise_visible_(original.clone(), gen)
    assert ((~out).sum(dim=1) == 2).all()
    assert (out | ~original).all(), "originally masked slots stay masked"
    assert torch.equal(out[1], original[1]), "the row at the minimum is untouched"


def test_maskers_are_deterministic_given_the_generator():
    for masker in (RandomSlotMasker(), MultiBlockSlotMasker(per_sample=True)):
        a = masker.sample(4, 2, 50, torch.Generator().manual_seed(5))
        b = masker.sample(4, 2, 50, torch.Generator().manual_seed(5))
        assert torch.equal(a, b)


def test_masker_option_errors():
    with pytest.raises(ConfigError, match="ratio_max"):
        RandomSlotMasker(ratio_min=0.6, ratio_max=1.0)
    with pytest.raises(ConfigError, match="scale_min"):
        MultiBlockSlotMasker(scale_min=0.3, scale_max=0.2)
    with pytest.raises(ConfigError, match="n_blocks"):
        MultiBlockSlotMasker(n_blocks=0)


# ---------------------------------------------------------------------- objective
def test_objective_rejects_wrong_encoder_and_options():
    class PlainEncoder(Encoder):
        embed_dim = 4

        def tokens(self, x, leads=None):
            return x

    with pytest.raises(ConfigError, match="cropa_vit"):
        JEPAObjective(PlainEncoder())
    with pytest.raises(ConfigError, match="Did you mean 'teacher'"):
        small_objective(evaluate="teachr")
    with pytest.raises(ConfigError, match="ema_start"):
        small_objective(ema_start=1.5)


def test_ema_schedule_end_points():
    obj = small_objective(ema_start=0.99, ema_end=0.999)
    assert obj.momentum(StepInfo(step=0, total_steps=100, epoch=0)) == 0.99
    assert obj.momentum(StepInfo(step=50, total_steps=100, epoch=0)) == pytest.approx(0.9945)
    assert obj.momentum(StepInfo(step=100, total_steps=100, epoch=0)) == 0.999


def test_teacher_gets_no_gradient_and_changes_only_by_ema():
    torch.manual_seed(0)
    obj = small_objective(ema_start=0.9, ema_end=1.0).train()
    assert not obj.teacher.training, "the teacher stays in eval mode"
    trainable = {id(p) for p in obj.parameters() if p.requires_grad}
    assert all(id(p) not in trainable for p in obj.teacher.parameters())
    teacher_before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    step = StepInfo(step=0, total_steps=10, epoch=0)
    out = obj.loss(make_batch(), step)
    out.loss.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert obj.encoder.blocks[0].attn.qkv.weight.grad is not None
    torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.5).step()
    for k, v in obj.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"optimiser changed teacher {k}"
    obj.after_step(step)  # momentum 0.9 at step 0
    student = obj.encoder.state_dict()
    for k, v in obj.teacher.state_dict().items():
        torch.testing.assert_close(v, 0.9 * teacher_before[k] + 0.1 * student[k])
    assert obj.representation_encoder() is obj.encoder
    assert small_objective(evaluate="teacher").representation_encoder().__class__ is CroPAViT


def test_masked_latent_loss_hand_value_and_visible_targets_ignored():
    predictions = torch.tensor([0.5, 3.0, -1.0, 0.0]).view(1, 1, 2, 2)  # slots 1 and 3
    targets = torch.zeros(1, 4, 2)
    targets[0, 1] = torch.tensor([0.0, 1.0])
    targets[0, 3] = torch.tensor([0.0, 0.0])
    # smooth-L1 (beta 1): |0.5|->0.125, |2|->1.5, |1|->0.5, 0 -> 0 ; mean = 2.125 / 4
    loss = masked_latent_loss(predictions, targets, torch.tensor([1, 3]))
    assert loss.item() == pytest.approx(2.125 / 4)
    targets[0, 0] += 100.0
    targets[0, 2] -= 100.0
    assert masked_latent_loss(predictions, targets, torch.tensor([1, 3])).item() == pytest.approx(2.125 / 4)
    assert masked_latent_loss(predictions, targets, torch.tensor([1, 3]), beta=0.5).item() != pytest.approx(2.125 / 4)


def test_layer_normed_targets_have_no_affine():
    tokens = torch.randn(2, 5, 8) * 3 + 1
    normed = layer_normed(tokens)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    variance = tokens.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(normed, (tokens - tokens.mean(-1, keepdim=True)) / (variance + 1e-5).sqrt())


def _loss_with_hooks(teacher_slots=None, predictor_positions=None, seed=3):
    """Objective loss with a fixed mask; optionally perturb teacher tokens at slots /
    predictor hidden states at sequence positions."""
    torch.manual_seed(0)
    slot_mask = torch.zeros(1, 8, dtype=torch.bool)
    slot_mask[0, [1, 2, 6]] = True  # visible 0,3,4,5,7 ; masked 1,2,6
    obj = small_objective(masker=FixedMasker(slot_mask)).eval()
    if teacher_slots is not None:
        def perturb_teacher(module, args, out):
            out = out.view(out.shape[0], 4, 8, -1).clone()
            noise_gen = torch.Generator().manual_seed(seed)
            out[:, :, teacher_slots] += torch.randn(out[:, :, teacher_slots].shape, generator=noise_gen)
            return out.view(out.shape[0], 32, -1)
        obj.teacher.norm.register_forward_hook(perturb_teacher)
    if predictor_positions is not None:
        def perturb_predictor(module, args, out):
            out = out.clone()  # a random (not constant: the final LayerNorm removes constants) shift
            shift = torch.randn(out[:, predictor_positions].shape, generator=torch.Generator().manual_seed(seed))
            out[:, predictor_positions] += 5.0 * shift
            return out
        obj.predictor.blocks[-1].register_forward_hook(perturb_predictor)
    return obj.loss(make_batch(), StepInfo(step=0, total_steps=10, epoch=0)).loss.item()


def test_loss_uses_masked_positions_only():
    base = _loss_with_hooks()
    assert _loss_with_hooks(teacher_slots=[0, 3, 7]) == pytest.approx(base, abs=1e-7)
    assert _loss_with_hooks(teacher_slots=[2]) != pytest.approx(base, abs=1e-4)
    # predictor sequences are [5 visible..., 3 masked...]
    assert _loss_with_hooks(predictor_positions=[0, 1, 2, 3, 4]) == pytest.approx(base, abs=1e-7)
    assert _loss_with_hooks(predictor_positions=[6]) != pytest.approx(base, abs=1e-4)


def test_per_sample_loss_is_the_mean_of_each_sample_alone():
    torch.manual_seed(0)
    slot_mask = torch.tensor(
        [[1, 1, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool
    )
    obj = small_objective(masker=FixedMasker(slot_mask)).eval()
    batch = make_batch(3)
    step = StepInfo(step=0, total_steps=10, epoch=0)
    together = obj.loss(batch, step).loss
    alone = []
    for b in range(3):
        obj.masker = FixedMasker(slot_mask[b:b + 1])
        alone.append(obj.loss(Batch(batch.signal[b:b + 1], LEADS, 100.0), step).loss)
    torch.testing.assert_close(together, torch.stack(alone).mean(), atol=1e-6, rtol=1e-5)


def test_loss_logs_and_representation():
    obj = small_objective(masker=RandomSlotMasker()).train()
    out = obj.loss(make_batch(4), StepInfo(step=5, total_steps=10, epoch=0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.logs["mask_ratio"] in {4 / 8, 5 / 8}  # int(8 * U(0.6, 0.7)) is 4 or 5 slots
    assert out.logs["ema_momentum"] == pytest.approx(0.998)
    assert out.logs["target_std"] > 0
    assert out.representation.shape == (4, 32) and not out.representation.requires_grad


def test_loss_rejects_masks_that_differ_across_leads():
    class LeadwiseMasker(Masker):
        def sample(self, batch_size, n_leads, n_slots, generator):
            mask = torch.zeros(batch_size, n_leads, n_slots, dtype=torch.bool)
            mask[:, 0, :3] = True
            return mask

    obj = small_objective(masker=LeadwiseMasker())
    with pytest.raises(ConfigError, match="whole time slots"):
        obj.loss(make_batch(), StepInfo(step=0, total_steps=1, epoch=0))


def test_a_few_optimiser_steps_lower_the_loss():
    torch.manual_seed(0)
    obj = small_objective(masker=MultiBlockSlotMasker(n_blocks=2, scale_min=0.25, scale_max=0.3), ema_start=0.99)
    obj.train()
    optimiser = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=2e-3)
    batch = make_batch(8, seed=1)
    losses = []
    for i in range(30):
        step = StepInfo(step=i, total_steps=30, epoch=0, generator=torch.Generator().manual_seed(7))
        out = obj.loss(batch, step)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        obj.after_step(step)
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


# ---------------------------------------------------------------------- registration
def test_plugin_registers_components_buildable_from_recipes():
    registry = collect(load_entry_points=False, extra_plugins=(ssl4ecg_jepa,))
    assert "cropa_vit" in registry.names("encoder")
    assert {"random", "multiblock"} <= set(registry.names("masker"))
    assert "jepa" in registry.names("objective")
    assert registry.get("encoder", "cropa_vit").options()["depth"] == 12
    encoder = registry.build(
        "encoder", "cropa_vit", {"dim": 32, "depth": 1, "heads": 4, "patch_size": 25}, "encoder", spec=SPEC
    )
    masker = registry.build("masker", "random", {"per_sample": True}, "masker")
    objective = registry.build(
        "objective", "jepa", {"predictor_dim": 16, "predictor_depth": 1, "predictor_heads": 2},
        "objective", encoder=encoder, masker=masker,
    )
    assert objective.encoder is encoder and objective.masker is masker
    assert objective.loss(make_batch(2), StepInfo(step=0, total_steps=1, epoch=0)).loss.requires_grad


def test_across_record_std_matches_torch_std():
    from ssl4ecg_jepa.objective import across_record_std

    tokens = torch.randn(5, 7, 3)
    assert across_record_std(tokens) == pytest.approx(tokens.std(dim=0).mean().item(), rel=1e-5)
    same = torch.randn(1, 7, 3).expand(4, 7, 3)
    assert across_record_std(same) == pytest.approx(0.0, abs=1e-7)


def test_batch_standardized_targets_drop_what_all_records_share():
    from ssl4ecg_jepa.objective import batch_standardized

    shared = torch.randn(1, 6, 5)  # the position-only part
    specific = torch.randn(8, 6, 5)
    out = batch_standardized(shared + 0.01 * specific)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(6, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=0), torch.ones(6, 5), atol=1e-3, rtol=0)
    torch.testing.assert_close(out, batch_standardized(specific), atol=1e-3, rtol=0)


def test_target_norm_layer_batch_trains_on_record_specific_targets():
    with pytest.raises(ConfigError, match="target_norm"):
        small_objective(target_norm="batch")
    torch.manual_seed(0)
    paper, batch_norm = small_objective(), small_objective(target_norm="layer_batch")
    batch_norm.load_state_dict(paper.state_dict())
    step = StepInfo(step=0, total_steps=10, epoch=0, generator=torch.Generator().manual_seed(1))
    a = paper.loss(make_batch(6), step)
    b = batch_norm.loss(make_batch(6), StepInfo(step=0, total_steps=10, epoch=0,
                                                generator=torch.Generator().manual_seed(1)))
    assert a.logs["target_std"] == pytest.approx(b.logs["target_std"])  # logged on layer-normed targets
    assert not torch.isclose(a.loss, b.loss)
    with pytest.raises(ConfigError, match="at least 2 records"):
        batch_norm.loss(make_batch(1), step)
    # and it learns: 30 steps on one batch lower the loss
    optimiser = torch.optim.AdamW([p for p in batch_norm.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for i in range(30):
        info = StepInfo(step=i, total_steps=30, epoch=0, generator=torch.Generator().manual_seed(7))
        out = batch_norm.loss(make_batch(8, seed=1), info)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
        batch_norm.after_step(info)
        losses.append(out.loss.item())
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3, losses  # 0.398 -> 0.377
