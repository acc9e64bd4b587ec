"""ssl4ecg_triplet plugin (under construction)."""
