"""ssl4ecg_hybrid plugin (under construction)."""
