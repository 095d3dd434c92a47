"""ModelConfig: every hyper-parameter of DeepSeek-V3.2 that changes the math (spec §1).

Field names follow the HF `config.json` of `deepseek-ai/DeepSeek-V3.2`; RoPE settings are
flattened into `rope_*` fields and read from either `rope_scaling` (DeepSeek's files) or
`rope_parameters` (transformers 5). The config is a frozen, hashable dataclass so it can be a
static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "dots", "full")

# HF keys we read that have no field of their own, or that must take one value.
_HF_FIXED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "moe_layer_freq": 1,
    "mlp_bias": False,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3.2 architecture. Defaults are the official 671B values."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    # Norms and RoPE (YaRN)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "yarn"  # "yarn" or "default"
    rope_factor: float = 40.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 1.0
    max_position_embeddings: int = 163840
    # Lightning indexer (DSA)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    index_fp8: bool = False  # Hadamard + e4m3/ue8m0 simulated scoring, as DeepSeek's kernels
    # MTP
    num_nextn_predict_layers: int = 1
    # Tokens and embeddings
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Numerics (not in HF's config): compute dtype and parameter storage dtype
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    # Storage, not math beyond FP8 rounding: linear weights DeepSeek ships in FP8 are kept as e4m3
    # + 128x128 block scales and dequantised at use (~1 byte per parameter)
    weight_fp8: bool = False
    # Memory knob, not math: queries scored/attended per chunk on the sparse path
    attention_chunk_size: int = 256
    # DSA kernels (pallas_kernels.ops): "auto" (Triton on GPU, Mosaic on TPU, reference elsewhere),
    # "reference", "pallas" (the kernel for this backend; interpreted on CPU)
    attention_impl: str = "auto"
    # Expert parallelism only (an "expert" mesh axis > 1): per-shard buffer capacity as a multiple
    # of the balanced load; copies past it are dropped and counted in aux["dropped_tokens"].
    # <= 0: capacity for the worst case, never dropping (equals the single-device MoE).
    moe_capacity_factor: float = 0.0
    # Memory knob, not math: what a block keeps for its backward pass. "none" keeps every
    # intermediate, "dots" keeps matmul outputs and recomputes the rest, "full" keeps only the
    # block's input and recomputes the whole block.
    remat: str = "none"

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def yarn_mscale(self, mscale: float) -> float:
        if self.rope_type != "yarn" or self.rope_factor <= 1:
            return 1.0
        return 0.1 * mscale * math.log(self.rope_factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale: qk_head_dim^-1/2 times YaRN's m^2 (spec §2)."""
        m = self.yarn_mscale(self.rope_mscale_all_dim) if self.rope_mscale_all_dim else 1.0
        return self.qk_head_dim**-0.5 * m * m

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(field, expected, actual):
            raise ValueError(f"ModelConfig.{field}: expected {expected}, got {actual!r}")

        positive = (
            "vocab_size hidden_size intermediate_size moe_intermediate_size num_hidden_layers "
            "num_attention_heads q_lora_rank kv_lora_rank qk_nope_head_dim qk_rope_head_dim "
            "v_head_dim n_routed_experts num_experts_per_tok n_group topk_group "
            "max_position_embeddings index_n_heads index_head_dim index_topk "
            "attention_chunk_size"
        ).split()
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "a positive int", value)
        for name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "a non-negative int", value)
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"<= num_hidden_layers ({self.num_hidden_layers})",
                 self.first_k_dense_replace)
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "an even number (RoPE rotates pairs)", self.qk_rope_head_dim)
        if self.index_head_dim < self.qk_rope_head_dim:
            fail("index_head_dim", f">= qk_rope_head_dim ({self.qk_rope_head_dim})", self.index_head_dim)
        if self.n_routed_experts % self.n_group:
            fail("n_routed_experts", f"divisible by n_group ({self.n_group})", self.n_routed_experts)
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            fail("n_routed_experts", "at least 2 experts per group (group score = sum of top 2)",
                 self.n_routed_experts)
        if self.topk_group > self.n_group:
            fail("topk_group", f"<= n_group ({self.n_group})", self.topk_group)
        experts_kept = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > experts_kept:
            fail("num_experts_per_tok", f"<= experts in the kept groups ({experts_kept})",
                 self.num_experts_per_tok)
        if self.rope_type not in ("yarn", "default"):
            fail("rope_type", "'yarn' or 'default'", self.rope_type)
        if self.rope_type == "yarn":
            if self.rope_factor < 1:
                fail("rope_factor", ">= 1", self.rope_factor)
            if self.rope_original_max_position_embeddings <= 0:
                fail("rope_original_max_position_embeddings", "> 0",
                     self.rope_original_max_position_embeddings)
        if self.rope_theta <= 0:
            fail("rope_theta", "> 0", self.rope_theta)
        if self.rms_norm_eps <= 0:
            fail("rms_norm_eps", "> 0", self.rms_norm_eps)
        if self.tie_word_embeddings:
            fail("tie_word_embeddings", "False (DeepSeek-V3.2 has an untied head)", True)
        if not self.norm_topk_prob:
            fail("norm_topk_prob", "True (sigmoid routing normalises its weights)", False)
        if self.index_fp8 and self.index_head_dim != 128:
            fail("index_head_dim", "128 when index_fp8 (one e4m3 scale per token and head)",
                 self.index_head_dim)
        if self.remat not in REMAT_POLICIES:
            fail("remat", f"one of {tuple(REMAT_POLICIES)}", self.remat)
        if self.attention_impl not in ("auto", "reference", "pallas"):
            fail("attention_impl", "'auto', 'reference' or 'pallas'", self.attention_impl)
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                fail(name, f"one of {_DTYPES}", getattr(self, name))

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """`tiny` (CPU tests), `small` (~200M params, CPU demo), `v32-671b` (official)."""
        if name not in _PRESETS:
            raise ValueError(f"ModelConfig.preset: unknown preset {name!r}; expected one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    # --------------------------------------------------------------- HF config
    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | dict, **overrides) -> "ModelConfig":
        """Reads an HF `config.json` (a file, a checkpoint directory, or a dict)."""
        if isinstance(path_or_dict, dict):
            hf = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"from_hf_config: no config.json at {path}")
            with open(path) as f:
                hf = json.load(f)

        model_type = hf.get("model_type", "deepseek_v32")
        if model_type != "deepseek_v32":
            raise ValueError(f"from_hf_config: model_type: expected 'deepseek_v32', got {model_type!r}")
        for key, expected in _HF_FIXED.items():
            if key in hf and hf[key] != expected:
                raise ValueError(f"from_hf_config: {key}: expected {expected!r}, got {hf[key]!r} (unsupported)")
        if hf.get("q_lora_rank") is None and "q_lora_rank" in hf:
            raise ValueError("from_hf_config: q_lora_rank: expected an int (the indexer reads the q latent), got None")

        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: hf[k] for k in names if k in hf and not k.startswith("rope_")}
        kwargs.pop("dtype", None)
        if "rope_theta" in hf:
            kwargs["rope_theta"] = float(hf["rope_theta"])

        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope:
            kwargs.update(_rope_fields(rope, hf))

        layer_types = hf.get("mlp_layer_types")
        first_k = kwargs.get("first_k_dense_replace", cls.first_k_dense_replace)
        if layer_types is not None:
            n_layers = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
            expected = ["dense"] * min(first_k, n_layers) + ["sparse"] * max(n_layers - first_k, 0)
            if list(layer_types) != expected:
                raise ValueError(
                    f"from_hf_config: mlp_layer_types: expected {first_k} dense then sparse layers, got {layer_types}")

        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            kwargs["eos_token_id"] = eos[0]
        if "num_nextn_predict_layers" not in hf:
            kwargs["num_nextn_predict_layers"] = 0
        dtype = hf.get("dtype") or hf.get("torch_dtype")
        if dtype in _DTYPES:
            kwargs["dtype"] = kwargs["param_dtype"] = dtype
        return cls(**{**kwargs, **overrides})

    def to_hf_config(self) -> dict:
        """The HF `config.json` dict (transformers-5 `rope_parameters` layout)."""
        hf = {
            "architectures": ["DeepseekV32ForCausalLM"],
            "model_type": "deepseek_v32",
            **_HF_FIXED,
        }
        for f in dataclasses.fields(self):
            if f.name.startswith("rope_") or f.name in ("dtype", "param_dtype", "attention_chunk_size", "index_fp8",
                                                          "weight_fp8", "attention_impl", "moe_capacity_factor", "remat"):
                continue
            hf[f.name] = getattr(self, f.name)
        hf["num_key_value_heads"] = self.num_attention_heads
        hf["rope_theta"] = self.rope_theta
        rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "yarn":
            rope.update(
                factor=self.rope_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
                beta_fast=self.rope_beta_fast,
                beta_slow=self.rope_beta_slow,
                mscale=self.rope_mscale,
                mscale_all_dim=self.rope_mscale_all_dim,
            )
        hf["rope_parameters"] = rope
        hf["dtype"] = self.param_dtype
        return hf


def _rope_fields(rope: dict, hf: dict) -> dict:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    out: dict[str, Any] = {"rope_type": rope_type}
    if "rope_theta" in rope:
        out["rope_theta"] = float(rope["rope_theta"])
    if rope_type == "yarn":
        orig = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        factor = rope.get("factor")
        if factor is None:
            factor = hf["max_position_embeddings"] / orig
        out.update(
            rope_factor=float(factor),
            rope_original_max_position_embeddings=int(orig),
            rope_beta_fast=float(rope.get("beta_fast") or 32),
            rope_beta_slow=float(rope.get("beta_slow") or 1),
            rope_mscale=float(rope.get("mscale") or 0.0),
            rope_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        )
        if rope.get("attention_factor") is not None:
            raise ValueError("from_hf_config: rope attention_factor: explicit values are not supported")
    elif rope_type != "default":
        raise ValueError(f"from_hf_config: rope type: expected 'yarn' or 'default', got {rope_type!r}")
    return out


_PRESETS: dict[str, dict] = {
    # Seconds on CPU; >= 8 indexer heads (spec §11.12), YaRN on, sparse path at T > 16.
    "tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        rope_factor=4.0, rope_original_max_position_embeddings=32, max_position_embeddings=256,
        index_n_heads=8, index_head_dim=32, index_topk=16, num_nextn_predict_layers=1,
        attention_chunk_size=16, dtype="float32", param_dtype="float32",
    ),
    # ~200M total parameters (~60M active): a CPU demo and a GPU smoke test.
    "small": dict(
        vocab_size=32768, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=8,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=4, n_group=8, topk_group=4,
        rope_factor=4.0, rope_original_max_position_embeddings=1024, max_position_embeddings=4096,
        index_n_heads=16, index_head_dim=64, index_topk=256, num_nextn_predict_layers=1,
        attention_chunk_size=128,
    ),
    "v32-671b": dict(),
}
