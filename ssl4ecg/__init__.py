"""ssl4ecg: self-supervised learning for 12-lead ECG, every method a plugin.

Public entry points for plugin authors:

* :mod:`ssl4ecg.interfaces` -- ``Encoder``, ``Objective``, ``Masker``, ``Evaluator``,
  ``Augmentation``, ``DataSource``, ``Batch``, ``SignalSpec``
* :data:`hookimpl` -- the marker for ``ssl4ecg_register(registry)``
* :mod:`ssl4ecg.nn` -- shared building blocks (transformer blocks, sin-cos embeddings, losses)
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # OpenMP threads that spin while waiting are 4-7x slower than one thread when another process
    # holds a core (docs/performance.md); sleeping waiters cost little on an idle machine. Only
    # possible before torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY is kept.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ssl4ecg.hooks import hookimpl  # noqa: E402

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
