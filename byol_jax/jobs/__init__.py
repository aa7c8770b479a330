"""Host-side jobs: the pretraining loop and sweeps."""
