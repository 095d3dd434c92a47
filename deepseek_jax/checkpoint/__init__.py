"""Checkpoints: HF safetensors import/export (hf.py, safetensors_io.py) and Orbax runs/exports (orbax.py)."""
