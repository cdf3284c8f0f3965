"""Splitting byte streams into chunks: content-defined (cdc.py) between the hard cut points
that an image format's structure gives (formats.py)."""

from .cdc import AVG_SIZE, MAX_SIZE, MIN_SIZE, is_zero, split, split_file
from .formats import boundaries, structure
from .reads import read_at

__all__ = ["AVG_SIZE", "MAX_SIZE", "MIN_SIZE", "boundaries", "is_zero", "read_at", "split",
           "split_file", "structure"]
