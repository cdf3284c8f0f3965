"""Splitting byte streams into chunks (content-defined now; format-aware splitters later)."""

from .cdc import AVG_SIZE, MAX_SIZE, MIN_SIZE, is_zero, split, split_file

__all__ = ["AVG_SIZE", "MAX_SIZE", "MIN_SIZE", "is_zero", "split", "split_file"]
