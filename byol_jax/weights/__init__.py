"""Encoder weights: the Pretrained type, loading any source, the authors' release, exports."""
