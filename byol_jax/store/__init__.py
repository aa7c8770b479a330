"""Storage: every user path as a URL, atomic writes, checkpoints, run configs, metric writers."""
