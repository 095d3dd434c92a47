"""Flax Linen layers of DeepSeek-V3.2: norms, RoPE, MLA, lightning indexer, MLP, MoE, block, MTP."""
