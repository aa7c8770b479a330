"""Evaluation of a frozen or fine-tuned encoder: features, kNN, linear protocol, fine-tuning, baselines."""
