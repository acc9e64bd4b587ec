"""An unlimited unlabelled corpus: 10 s, 8-lead ECGs from the DeepFake-ECG generator.

The `deepfake-ecg` package (Thambawita et al., "DeepFake electrocardiograms using generative
adversarial networks are the beginning of the end for privacy issues in medicine", Scientific
Reports 2021) ships a Pulse2Pulse GAN generator trained on real 12-lead ECGs. It draws 10 s at
500 Hz of the 8 independent leads I, II, V1-V6 -- the leads ECG-JEPA uses -- scaled to
microvolts by the package (output x 6000); this source converts to millivolts.

Install with ``pip install deepfake-ecg`` (or ``pip install -e ".[deepfake]"``). Records are
drawn from seeded noise, so ``seed`` makes the corpus reproducible; prepare it once into a cache
(``ssl4ecg data prepare deepfake - --out caches/deepfake --set n_records=20000``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ssl4ecg.data.records import RecordSet
from ssl4ecg.errors import ConfigError, DataError
from ssl4ecg.interfaces import JEPA_LEADS, DataSource

#: the generator's output rate and length (fixed by its architecture)
NATIVE_RATE = 500.0
NATIVE_SAMPLES = 5000
#: the package scales its output by this factor to microvolts
MICROVOLT_SCALE = 6000.0


def load_generator():
    """The package's generator with its released weights, on the CPU, in eval mode."""
    try:
        import deepfakeecg
        from deepfakeecg.models import Generator
    except ImportError:
        raise DataError("source 'deepfake' needs the deepfake-ecg package: pip install deepfake-ecg") from None
    path = Path(deepfakeecg.__file__).parent / "checkpoints" / "g_stat.pt"
    if not path.exists():
        raise DataError(f"deepfake-ecg is installed but its generator weights are missing at {path}; reinstall it")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the package's own deprecated init call
        generator = Generator()
    # the checkpoint was saved on a GPU: map it to the CPU
    state = torch.load(path, map_location="cpu", weights_only=True)
    generator.load_state_dict(state["stat_dict"])
    return generator.eval()


class DeepfakeSource(DataSource):
    """Unlabelled synthetic 8-lead ECGs (I, II, V1-V6, 500 Hz, 10 s) from the DeepFake-ECG GAN."""

    def __init__(self, n_records: int = 2000, seed: int = 0, batch_size: int = 16,
                 val_fraction: float = 0.0) -> None:
        if int(n_records) < 1:
            raise ConfigError(f"[data] n_records = {n_records} must be at least 1 for source 'deepfake'")
        if int(batch_size) < 1:
            raise ConfigError(f"[data] batch_size = {batch_size} must be at least 1 for source 'deepfake'")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"[data] val_fraction = {val_fraction} must lie in [0, 1)")
        self.n_records = int(n_records)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)

    def load(self) -> RecordSet:
        """Generate every record (about 25 records/s on 2 CPU cores)."""
        generator = load_generator()
        rng = torch.Generator().manual_seed(self.seed)
        signals = np.empty((self.n_records, len(JEPA_LEADS), NATIVE_SAMPLES), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, self.n_records, self.batch_size):
                n = min(self.batch_size, self.n_records - start)
                noise = torch.rand(n, len(JEPA_LEADS), NATIVE_SAMPLES, generator=rng) * 2 - 1
                out = generator(noise) * MICROVOLT_SCALE / 1000.0  # microvolts -> millivolts
                signals[start:start + n] = out.numpy()
        n_val = int(round(self.val_fraction * self.n_records))
        splits = np.array(["train"] * (self.n_records - n_val) + ["val"] * n_val)
        ids = np.array([f"deepfake{self.seed:03d}_{i:06d}" for i in range(self.n_records)])
        return RecordSet(signals=signals, leads=JEPA_LEADS, sampling_rate=NATIVE_RATE, record_ids=ids,
                         splits=splits)
