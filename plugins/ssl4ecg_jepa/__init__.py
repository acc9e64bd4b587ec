"""ssl4ecg_jepa plugin (under construction)."""
