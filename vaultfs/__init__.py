"""vaultfs: a FUSE filesystem that is the backup."""

__version__ = "0.1.0"
