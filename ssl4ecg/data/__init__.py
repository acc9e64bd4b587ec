"""Data layer: sources, preprocessing, record sets and batch loaders."""
