"""Benchmarks and the augmentation preview."""
