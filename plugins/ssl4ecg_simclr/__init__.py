"""ssl4ecg_simclr plugin (under construction)."""
