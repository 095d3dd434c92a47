"""Checkpoint import/export: HF safetensors (hf.py)."""
