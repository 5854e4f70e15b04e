"""Extraction's stages as Dask work. This package's own namespace stays free of Dask, so the
CLI's light commands can import from it."""

STAGES = ("decode", "detect", "align", "embed", "write")  # the order of extract's summary
