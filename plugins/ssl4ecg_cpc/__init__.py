"""ssl4ecg_cpc plugin (under construction)."""
