"""Reference DiT trained here as the output-quality yardstick for chipmunk_compile (see README.md)."""
