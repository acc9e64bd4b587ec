"""Objectives' ``loss()`` never reads a tensor back to the host: logs are 0-dim tensors.

On the CPU a host read is caught by making ``Tensor.item`` and ``Tensor.__float__`` raise
during ``loss()``; on a GPU, by ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch

from ssl4ecg.interfaces import STANDARD_LEADS, Batch, LossOutput, SignalSpec, StepInfo
from ssl4ecg.registry import get_registry

# each method's small config: (spec, encoder name and options, objective options, masker or None)
CONFIGS = {
    "cpc": (SignalSpec(STANDARD_LEADS, 100.0, 64), "cpc_encoder",
            {"features": [16, 16], "kernel_sizes": [1, 1], "strides": [1, 1], "context_dim": 16,
             "context_layers": 1},
            {"prediction_steps": 4, "crop_seconds": 0.5, "num_negatives": 20}, None),
    "cpc_all_negatives": (SignalSpec(STANDARD_LEADS, 100.0, 64), "cpc_encoder",
                          {"features": [16, 16], "kernel_sizes": [1, 1], "strides": [1, 1], "context_dim": 16,
                           "context_layers": 1, "context": "gru"},
                          {"prediction_steps": 3, "crop_seconds": 0.0, "num_negatives": 0, "temperature": 0.5,
                           "normalize": True}, None),
    "simclr": (SignalSpec(STANDARD_LEADS, 250.0, 250), "resnet1d", {"width": 8}, {"proj_dim": 16}, None),
    "cmsc": (SignalSpec(STANDARD_LEADS, 100.0, 400), "resnet1d", {"width": 8}, {}, None),
    "stmem": (SignalSpec(STANDARD_LEADS, 250.0, 100), "stmem_vit",
              {"dim": 16, "depth": 1, "heads": 2, "patch_size": 10, "crop_samples": 80},
              {"decoder_dim": 8, "decoder_depth": 1, "decoder_heads": 2}, ("stmem_random", {"ratio": 0.5})),
    "jepa": (SignalSpec(("I", "II", "V1", "V2"), 100.0, 200), "cropa_vit",
             {"dim": 32, "depth": 2, "heads": 4, "patch_size": 25, "drop_path": 0.0},
             {"predictor_dim": 16, "predictor_depth": 1, "predictor_heads": 2}, None),
    "vqvae": (SignalSpec(STANDARD_LEADS, 100.0, 400), "resnet1d", {"width": 8},
              {"codebook_size": 8, "code_dim": 4, "decoder_dim": 16}, None),
}
# logs each method reads from device tensors: they must come back as tensors
TENSOR_LOGS = {
    "cpc": {"accuracy"},
    "cpc_all_negatives": {"accuracy"},
    "simclr": {"pos_cos"},
    "cmsc": {"patient_pairs_per_sample"},
    "stmem": {"mask_ratio"},
    "jepa": {"target_std"},
    "vqvae": {"vq_recon", "vq_commit", "vq_perplexity", "vq_usage", "vq_perplexity_window", "vq_batch_usage",
              "vq_perplexity_per_position"},
}


def build(name: str):
    spec, encoder, encoder_options, options, masker = CONFIGS[name]
    registry = get_registry()
    torch.manual_seed(0)
    extra = {"encoder": registry.build("encoder", encoder, encoder_options, "encoder", spec=spec)}
    if masker is not None:
        extra["masker"] = registry.build("masker", masker[0], masker[1], "masker")
    method = "cpc" if name.startswith("cpc") else name
    if method == "simclr":
        extra["registry"] = registry
    return registry.build("objective", method, options, "objective", spec=spec, **extra).train(), spec


def make_batch(spec: SignalSpec, n: int = 6) -> Batch:
    x = torch.randn(n, spec.n_leads, spec.n_samples, generator=torch.Generator().manual_seed(5))
    return Batch(x, spec.leads, spec.sampling_rate, record_ids=[f"r{i}" for i in range(n)],
                 patient_ids=["a", "a", "b", "c", "b", "a"][:n])


def no_host_reads(monkeypatch) -> None:
    """Make ``Tensor.item`` and ``float(tensor)`` raise (a host sync on a GPU tensor)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"loss() read a {tuple(self.shape)} {self.dtype} tensor back to the host")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "__float__", refuse)


def check_logs(name: str, out: LossOutput) -> None:
    for key in TENSOR_LOGS[name]:
        value = out.logs[key]
        assert isinstance(value, torch.Tensor), f"{name}: logs[{key!r}] is {type(value).__name__}, not a tensor"
        assert value.dim() == 0 and not value.requires_grad, (name, key, value)
    for key, value in out.logs.items():  # the rest: Python numbers from shapes and settings
        assert isinstance(value, (torch.Tensor, float, int)), (name, key, type(value))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_loss_reads_nothing_back_and_logs_tensors(name, monkeypatch):
    obj, spec = build(name)
    batch = make_batch(spec)
    with monkeypatch.context() as patch:
        no_host_reads(patch)
        out = obj.loss(batch, StepInfo(0, 10, 0, torch.Generator().manual_seed(3)))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    check_logs(name, out)
    # the loop converts them at log steps
    assert all(isinstance(float(v), float) for v in out.logs.values())


def test_tensor_logs_keep_their_values():
    """The logs that became tensors hold what the floats held (checked on the definitions)."""
    obj, spec = build("cmsc")
    out = obj.loss(make_batch(spec), StepInfo(0, 10, 0))
    # patients a, a, b, c, b, a: 3 x 2 + 1 x 2 same-patient pairs off the diagonal, over 6 records
    assert out.logs["patient_pairs_per_sample"].dtype == torch.float64
    assert float(out.logs["patient_pairs_per_sample"]) == 8 / 6
    obj, spec = build("stmem")
    assert float(obj.loss(make_batch(spec), StepInfo(0, 10, 0)).logs["mask_ratio"]) == 0.5
    obj, spec = build("vqvae")
    out = obj.loss(make_batch(spec), StepInfo(0, 10, 0))
    from ssl4ecg_vqvae import perplexity

    window = obj.quantizer.hits.sum(0)
    assert float(out.logs["vq_usage"]) == obj.quantizer.usage()
    assert float(out.logs["vq_perplexity_window"]) == pytest.approx(perplexity(window), rel=1e-6)


def test_count_perplexity_matches_the_quantizer_definition():
    from ssl4ecg_vqvae import perplexity
    from ssl4ecg_vqvae.objective import count_perplexity

    for counts in (torch.tensor([3.0, 0.0, 1.0, 4.0]), torch.tensor([0.0, 5.0, 0.0]), torch.zeros(4),
                   torch.ones(16)):
        got = count_perplexity(counts)
        assert got.dim() == 0 and float(got) == pytest.approx(perplexity(counts), rel=1e-6, abs=1e-12)
    assert float(count_perplexity(torch.ones(16))) == pytest.approx(16.0)
    assert float(count_perplexity(torch.zeros(4))) == 0.0


# objectives whose whole loss() path (encoder included) is free of host syncs on a GPU
CUDA_SYNC_FREE = ("cpc", "cpc_all_negatives", "simclr", "cmsc", "stmem", "jepa")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CUDA_SYNC_FREE)
def test_loss_does_not_sync_on_cuda(name):
    obj, spec = build(name)
    obj = obj.cuda()
    batch = make_batch(spec).to("cuda")

    def step() -> StepInfo:
        return StepInfo(0, 10, 0, torch.Generator().manual_seed(3),
                        torch.Generator(device="cuda").manual_seed(3))

    obj.loss(batch, step())  # first call: library initialisation may synchronise
    info = step()
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = obj.loss(batch, info)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert out.loss.dtype == torch.float32 and bool(torch.isfinite(out.loss))
    check_logs(name, out)
