"""ssl4ecg_cmsc plugin (under construction)."""
