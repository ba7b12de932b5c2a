"""The run folder every trainer shares: lock, saved state and resume checks, metrics, info file."""
