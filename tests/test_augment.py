"""ECG augmentations: each does what it says, keeps shape/dtype, honours p and the generator."""

from __future__ import annotations

import pytest
import torch

from ssl4ecg import augment
from ssl4ecg.augment import (
    AUGMENTATIONS,
    Compose,
    build_augmentations,
    default_ecg_augmentations,
)
from ssl4ecg.errors import ConfigError
from ssl4ecg.interfaces import STANDARD_LEADS, SignalSpec
from ssl4ecg.registry import Registry


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    augment.register(reg)
    return reg


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ecg_like(b: int = 4, leads: int = 3, n: int = 500, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, leads, n, generator=g)


def test_all_augmentations_are_registered(registry):
    assert set(registry.names("augmentation")) == set(AUGMENTATIONS) == {
        "baseline_shift", "baseline_wander", "gaussian_noise", "powerline_noise",
        "amplitude_scale", "random_crop_resize", "jump_noise", "time_mask",
    }


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_dtype_and_change(name, dtype):
    x = ecg_like().to(dtype)
    out = AUGMENTATIONS[name](p=1.0)(x, 500.0, gen())
    assert out.shape == x.shape and out.dtype == dtype
    assert not torch.equal(out, x)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_p_zero_is_identity_and_seeded_generator_is_deterministic(name):
    x = ecg_like()
    assert torch.equal(AUGMENTATIONS[name](p=0.0)(x, 500.0, gen()), x)
    aug = AUGMENTATIONS[name](p=1.0)
    a, b, c = aug(x, 500.0, gen(3)), aug(x, 500.0, gen(3)), aug(x, 500.0, gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_probability_is_per_sample():
    x = ecg_like(b=400, leads=1, n=50)
    out = augment.GaussianNoise(p=0.3, std=1.0)(x, 100.0, gen())
    changed = (out != x).flatten(1).any(dim=1)
    unchanged = (out == x).flatten(1).all(dim=1)
    assert torch.equal(changed, ~unchanged)  # a sample is either untouched or fully augmented
    assert 0.22 < changed.float().mean() < 0.38


def test_bad_probability_is_a_config_error_through_registry(registry):
    with pytest.raises(ConfigError, match=r"objective\.augmentations\[0\].*p must be a probability"):
        build_augmentations(registry, [{"name": "gaussian_noise", "p": 1.5}], "objective.augmentations")


def test_baseline_shift_adds_a_constant():
    x = ecg_like()
    d = augment.BaselineShift(p=1.0, max_shift=0.3)(x, 100.0, gen()) - x
    assert torch.allclose(d, d[:, :1, :1].expand_as(d), atol=1e-6)  # same offset for every lead and time
    assert (d.abs() <= 0.3 + 1e-6).all()
    per_lead = augment.BaselineShift(p=1.0, per_lead=True)(x, 100.0, gen()) - x
    assert torch.allclose(per_lead, per_lead[:, :, :1].expand_as(per_lead), atol=1e-6)
    assert per_lead[0, :, 0].unique().numel() == x.shape[1]  # leads differ


def test_baseline_wander_is_low_frequency_and_bounded():
    fs, seconds = 100.0, 60.0
    x = torch.zeros(8, 2, int(fs * seconds))
    d = augment.BaselineWander(p=1.0, amplitude=0.4, max_freq=0.5)(x, fs, gen())
    assert d.abs().max() <= 0.4 + 1e-6
    spectrum = torch.fft.rfft(d.double(), dim=-1).abs() ** 2
    freqs = torch.fft.rfftfreq(d.shape[-1], 1 / fs)
    low = spectrum[..., freqs <= 0.6].sum()  # leakage of non-integer-period sinusoids stays near the band
    assert low / spectrum.sum() > 0.97
    assert not torch.allclose(d[:, 0], d[:, 1])  # per-lead amplitudes / phases


def test_gaussian_noise_std():
    x = torch.zeros(16, 4, 2000)
    d = augment.GaussianNoise(p=1.0, std=0.2)(x, 100.0, gen())
    assert abs(d.std().item() - 0.2) < 0.005
    assert abs(d.mean().item()) < 0.005


@pytest.mark.parametrize("freq", [50.0, 60.0])
def test_powerline_noise_is_a_sinusoid_at_exactly_the_mains_frequency(freq):
    fs, n = 500.0, 5000  # 10 s: 0.1 Hz bins, 50 and 60 Hz fall on a bin
    x = torch.zeros(3, 2, n)
    d = augment.PowerlineNoise(p=1.0, amplitude=0.2, frequency=freq)(x, fs, gen())
    spectrum = torch.fft.rfft(d.double(), dim=-1).abs()
    freqs = torch.fft.rfftfreq(n, 1 / fs)
    peak = freqs[spectrum.argmax(dim=-1)]
    assert torch.all(peak == freq)
    power = spectrum**2
    assert (power[..., freqs == freq].sum(-1) / power.sum(-1)).min() > 0.9999
    assert d.abs().max() <= 0.2 + 1e-6


def test_powerline_noise_above_nyquist_is_refused(registry):
    spec = SignalSpec(STANDARD_LEADS, 100.0, 1000)
    with pytest.raises(ConfigError, match=r"augmentations\[0\].*Nyquist"):
        build_augmentations(registry, [{"name": "powerline_noise"}], "objective.augmentations", spec=spec)
    with pytest.raises(ConfigError, match="Nyquist frequency"):
        augment.PowerlineNoise(p=1.0)(torch.zeros(1, 1, 100), 100.0, gen())


def test_amplitude_scale_multiplies_each_lead():
    x = ecg_like(b=50, leads=3) + 5.0  # nonzero everywhere
    out = augment.AmplitudeScale(p=1.0, min_scale=0.5, max_scale=2.0)(x, 100.0, gen())
    ratio = out / x
    assert torch.allclose(ratio, ratio[:, :, :1].expand_as(ratio), atol=1e-5)
    assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 2.0 + 1e-5
    assert ratio.min() < 0.8 and ratio.max() > 1.4  # the range is used


def test_random_crop_resize_stretches_a_window():
    n = 400
    ramp = torch.arange(n, dtype=torch.float32).expand(6, 2, n).clone()
    out = augment.RandomCropResize(p=1.0, min_fraction=0.5, max_fraction=0.7)(ramp, 100.0, gen())
    slope = out[..., 1:] - out[..., :-1]
    # linear interpolation of a ramp is a ramp whose slope is the window fraction
    assert torch.allclose(slope, slope[..., :1].expand_as(slope), atol=1e-3)
    frac = slope[:, 0, 0]  # slope = window span / (n - 1) = fraction
    assert (frac >= 0.5 - 1e-4).all() and (frac <= 0.7 + 1e-4).all()
    assert torch.equal(out[:, 0], out[:, 1])  # all leads share the window
    assert out.min() >= 0 and out.max() <= n - 1
    full = augment.RandomCropResize(p=1.0, min_fraction=1.0, max_fraction=1.0)(ramp, 100.0, gen())
    assert torch.allclose(full, ramp, atol=1e-3)


def test_jump_noise_adds_persistent_steps():
    x = torch.zeros(20, 3, 300)
    d = augment.JumpNoise(p=1.0, amplitude=0.5, max_jumps=3)(x, 100.0, gen())
    assert (d[..., 0] == 0).all()  # steps start after the first sample
    changes = (d[..., 1:] != d[..., :-1]).sum(dim=-1)
    assert changes.min() >= 1 and changes.max() <= 3
    assert (d[..., 1:] - d[..., :-1]).abs().max() <= 0.5 + 1e-6


def test_time_mask_zeros_one_span_in_every_lead():
    n = 1000
    x = ecg_like(b=30, leads=3, n=n) + 10.0  # no natural zeros
    out = augment.TimeMask(p=1.0, min_fraction=0.1, max_fraction=0.2)(x, 100.0, gen())
    zero = out == 0
    assert torch.equal(zero[:, 0], zero[:, 1]) and torch.equal(zero[:, 0], zero[:, 2])
    lengths = zero[:, 0].sum(dim=1)
    assert lengths.min() >= 100 and lengths.max() <= 200
    edges = (zero[:, 0, 1:] != zero[:, 0, :-1]).sum(dim=1)
    assert (edges <= 2).all()  # one contiguous span
    assert torch.equal(out[~zero], x[~zero])


def test_compose_from_recipe_tables_applies_in_order(registry):
    pipeline = build_augmentations(
        registry,
        [{"name": "amplitude_scale", "p": 1.0, "min_scale": 2.0, "max_scale": 2.0},
         {"name": "baseline_shift", "p": 0.0}],
        "objective.augmentations",
    )
    assert isinstance(pipeline, Compose) and len(pipeline) == 2
    x = ecg_like()
    assert torch.allclose(pipeline(x, 100.0, gen()), 2 * x)


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ([{"name": "gausian_noise"}], r"augmentations\[0\].*Did you mean 'gaussian_noise'"),
        ([{"name": "gaussian_noise"}, {"name": "time_mask", "max_frac": 0.1}],
         r"\[objective\.augmentations\[1\]\] unknown key 'max_frac'.*Did you mean 'max_fraction'"),
        ([{"p": 0.5}], r"augmentations\[0\]\] needs name"),
        ({"name": "gaussian_noise"}, "must be a list of tables"),
        (["gaussian_noise"], r"augmentations\[0\]\] must be a table"),
        ([{"name": "gaussian_noise", "std": "big"}], "key 'std' should be float"),
    ],
)
def test_bad_tables_give_one_clear_config_error(registry, tables, message):
    with pytest.raises(ConfigError, match=message):
        build_augmentations(registry, tables, "objective.augmentations")


def test_default_set_drops_powerline_only_below_nyquist():
    names_100 = [t["name"] for t in default_ecg_augmentations(100.0)]
    names_500 = [t["name"] for t in default_ecg_augmentations(500.0)]
    assert "powerline_noise" not in names_100
    assert names_500 == names_100[:5] + ["powerline_noise"] + names_100[5:]
    pipeline = build_augmentations(None, default_ecg_augmentations(250.0), "objective.augmentations",
                                   spec=SignalSpec(STANDARD_LEADS, 250.0, 2500))
    assert len(pipeline) == 7
    x = ecg_like(leads=12, n=2500)
    assert pipeline(x, 250.0, gen()).shape == x.shape


def test_baseline_wander_single_component_has_the_drawn_frequency():
    aug = augment.BaselineWander(p=1.0, amplitude=1.0, min_freq=0.25, max_freq=0.25, n_components=1)
    fs, n = 100.0, 4000  # 40 s = 10 periods of 0.25 Hz
    d = aug(torch.zeros(2, 1, n), fs, gen())
    spectrum = torch.fft.rfft(d.double(), dim=-1).abs()
    freqs = torch.fft.rfftfreq(n, 1 / fs)
    assert torch.all(freqs[spectrum.argmax(-1)] == 0.25)


# Outputs pinned before augmentations drew on their generator's device: on the CPU (where the
# loop's device generator is its CPU generator) the views of a seeded run must not change.
# x = randn(3, 2, 64) from seed 1, 250 Hz, generator seed 7; (sum, values at PINNED_INDEX).
PINNED_INDEX = [0, 17, 63, 69, 168, 383]
PINNED = {
    "baseline_shift": ({"p": 0.7, "max_shift": 0.5, "per_lead": True}, -20.52818464487791,
                       [-1.3687056, -1.0038712, -0.590982, -0.274786, 0.2346377, 0.8538828]),
    "baseline_wander": ({"p": 0.7, "amplitude": 0.5}, -1.1403411426581442,
                        [-1.2435987, -0.8936218, -0.5382229, 0.0160276, 0.306951, 0.9143394]),
    "gaussian_noise": ({"p": 0.7, "std": 0.05}, 9.949560219421983,
                       [-1.5950161, -1.1508392, -0.6672699, 0.0699334, 0.3211337, 1.011776]),
    "powerline_noise": ({"p": 0.7, "amplitude": 0.1, "frequency": 50.0}, 10.207179196178913,
                        [-1.5428606, -1.1535157, -0.727183, -0.0600485, 0.3458939, 0.9972062]),
    "amplitude_scale": ({"p": 0.7}, 4.920595459814649,
                        [-1.8962556, -1.4427807, -0.9295757, -0.0052109, 0.2790296, 0.820197]),
    "random_crop_resize": ({"p": 0.7}, 17.09785665012896,
                           [-0.8815598, -0.8461942, 1.5309358, 1.0407856, 0.3944911, -1.1884937]),
    "jump_noise": ({"p": 0.7}, 22.936801651492715,
                   [-1.5255959, -1.1607615, -0.7407889, -0.0075475, 0.378649, 1.1531309]),
    "time_mask": ({"p": 0.7}, 6.754181660886388,
                  [-1.5255959, 0.0, -0.7478722, -0.0075475, 0.0, 0.9885666]),
}
PINNED_DEFAULT_PIPELINE = [  # default_ecg_augmentations(250), one generator (seed 11), two views
    (3.3898380622267723, [0.1613456, -0.6338883, 1.1585975, -0.3802506, -1.0947275, 0.8140619]),
    (37.84169709123671, [-1.4599804, -1.2955586, -0.9659632, -0.2025368, 0.7638975, 1.3624048]),
]


def pinned_input() -> torch.Tensor:
    return torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(1))


def assert_pinned(out: torch.Tensor, total: float, values: list[float]) -> None:
    assert float(out.double().sum()) == pytest.approx(total, rel=1e-6, abs=1e-5)
    got = out.flatten()[PINNED_INDEX].tolist()
    assert got == pytest.approx(values, abs=2e-6)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_cpu_outputs_are_unchanged(name):
    options, total, values = PINNED[name]
    out = AUGMENTATIONS[name](**options)(pinned_input(), 250.0, gen(7))
    assert_pinned(out, total, values)


def test_default_pipeline_cpu_outputs_are_unchanged():
    pipeline = build_augmentations(None, default_ecg_augmentations(250.0), "objective.augmentations")
    g = gen(11)
    for total, values in PINNED_DEFAULT_PIPELINE:
        assert_pinned(pipeline(pinned_input(), 250.0, g), total, values)


def test_draws_come_from_the_generator_in_order():
    """Which samples are hit first, then the transform's draws: Gaussian noise is x + std * randn."""
    x = ecg_like()
    out = AUGMENTATIONS["gaussian_noise"](p=0.5, std=0.1)(x, 500.0, gen(1))
    g = gen(1)
    hit = torch.rand(x.shape[0], generator=g) < 0.5
    expected = torch.where(hit.view(-1, 1, 1), x + 0.1 * torch.randn(tuple(x.shape), generator=g), x)
    assert 0 < int(hit.sum()) < x.shape[0]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_every_draw_is_made_on_the_generators_device(name, monkeypatch):
    """Random numbers are drawn where the generator lives (no CPU draw copied to a GPU batch)."""
    x, calls = ecg_like(), []
    for fn in ("rand", "randn", "randint"):
        original = getattr(torch, fn)

        def spy(*args, _original=original, _fn=fn, **kwargs):
            calls.append((_fn, kwargs.get("generator"), kwargs.get("device")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, fn, spy)
    g = gen(2)
    AUGMENTATIONS[name](p=1.0)(x, 500.0, g)
    assert len(calls) >= 2  # which samples are hit, then the transform's own draws
    for fn, generator, device in calls:
        assert generator is g and device == g.device, (fn, generator, device)


def run_on_cuda(augmentation, x: torch.Tensor, seed: int) -> torch.Tensor:
    """``augmentation`` on ``x`` with a CUDA generator, failing on any host sync or blocking copy."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return augmentation(x, 500.0, g)
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_cuda_generator_draws_on_the_gpu(name):
    x = ecg_like().cuda()
    augmentation = AUGMENTATIONS[name](p=1.0)
    run_on_cuda(augmentation, x, 0)  # first call: kernels load
    a, b, c = run_on_cuda(augmentation, x, 3), run_on_cuda(augmentation, x, 3), run_on_cuda(augmentation, x, 4)
    assert a.device.type == "cuda" and a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a CPU generator still works for a batch on the GPU (its draws are copied over)
    on_gpu = augmentation(x, 500.0, gen(5))
    on_cpu = augmentation(x.cpu(), 500.0, gen(5))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_pipeline_on_cuda_is_sync_free_and_deterministic():
    pipeline = build_augmentations(None, default_ecg_augmentations(500.0), "objective.augmentations")
    x = ecg_like().cuda().to(torch.bfloat16)
    run_on_cuda(pipeline, x, 0)
    a, b = run_on_cuda(pipeline, x, 9), run_on_cuda(pipeline, x, 9)
    assert a.device.type == "cuda" and a.dtype == torch.bfloat16 and torch.equal(a, b)
