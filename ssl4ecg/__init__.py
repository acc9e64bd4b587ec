"""ssl4ecg: self-supervised learning for 12-lead ECG, every method a plugin.

Public entry points for plugin authors:

* :mod:`ssl4ecg.interfaces` -- ``Encoder``, ``Objective``, ``Masker``, ``Evaluator``,
  ``Augmentation``, ``DataSource``, ``Batch``, ``SignalSpec``
* :data:`hookimpl` -- the marker for ``ssl4ecg_register(registry)``
* :mod:`ssl4ecg.nn` -- shared building blocks (transformer blocks, sin-cos embeddings, losses)
"""

from ssl4ecg.hooks import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
