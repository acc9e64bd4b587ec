"""ssl4ecg_stmem plugin (under construction)."""
