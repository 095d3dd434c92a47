"""Pretraining: optimizer, train step, DSA stages, data pipeline, metrics (spec §4-§6)."""
