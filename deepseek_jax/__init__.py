"""deepseek_jax: DeepSeek-V3.2 (MLA + DeepSeek Sparse Attention + DeepSeekMoE + MTP) in JAX/Flax."""

from deepseek_jax.checkpoint.hf import load_hf, save_hf
from deepseek_jax.config import ModelConfig
from deepseek_jax.generate import generate
from deepseek_jax.model import Transformer, forward

__all__ = ["ModelConfig", "Transformer", "forward", "generate", "load_hf", "save_hf"]
