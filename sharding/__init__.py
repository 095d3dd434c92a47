"""Meshes, logical-axis rules and expert-parallel MoE (see sharding/*.py)."""
