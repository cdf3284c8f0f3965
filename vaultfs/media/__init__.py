"""Image understanding: metadata, sidecars, tiers. Pure functions over bytes, names and
records; no FUSE, no LMDB."""
