"""The FUSE side: pyfuse3 Operations on trio, the write spool and the virtual views."""
