"""VQ-VAE on encoder tokens, with the cures for codebook collapse, as an ssl4ecg plugin.

Registers the objective ``vqvae`` (see ``docs/methods/vqvae.md``): any registered encoder's
tokens -> projection -> vector quantiser (k-means initialisation, EMA codebook updates,
dead-code restarts, commitment loss) -> cross-attention decoder reconstructing signal segments.
"""

from __future__ import annotations

from ssl4ecg import hookimpl

from ssl4ecg_vqvae.objective import MixerDecoder, QuantizedEncoder, VQVAEObjective, token_time_map
from ssl4ecg_vqvae.quantizer import VectorQuantizer, kmeans, nearest_codes, perplexity

__all__ = ["MixerDecoder", "QuantizedEncoder", "VQVAEObjective", "VectorQuantizer", "kmeans",
           "nearest_codes", "perplexity", "token_time_map"]


@hookimpl
def ssl4ecg_register(registry) -> None:
    """Register the ``vqvae`` objective."""
    registry.add("objective", "vqvae", VQVAEObjective)
