"""ssl4ecg_vqvae plugin (under construction)."""
