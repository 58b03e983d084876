"""Model presets (one file per family) and their registry."""
