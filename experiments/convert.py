"""Converts checkpoints between HF/DeepSeek safetensors and Orbax inference exports.

    python -m experiments.convert --direction=hf_to_orbax --src=HF_DIR --dst=ORBAX_DIR [--keep_fp8]
    python -m experiments.convert --direction=orbax_to_hf --src=ORBAX_DIR --dst=HF_DIR [--fp8]

HF -> Orbax streams the safetensors shards (FP8 weights dequantised, or kept with
--keep_fp8) into an `export_inference` directory. Orbax -> HF writes sharded safetensors
(bf16, or FP8 block-quantised with --fp8) that transformers' DeepseekV32ForCausalLM loads.
Every mismatch between the source and its config (missing, unexpected, wrong shape or dtype)
is listed by name in one ValueError before anything is written; an existing, non-empty
destination is refused.
"""

import os

from absl import app, flags

from deepseek_jax import load_hf, save_hf
from deepseek_jax.checkpoint.orbax import export_inference, load_inference

_DIRECTION = flags.DEFINE_enum("direction", None, ["hf_to_orbax", "orbax_to_hf"], "which way to convert")
_SRC = flags.DEFINE_string("src", None, "source checkpoint directory")
_DST = flags.DEFINE_string("dst", None, "destination directory (must not exist or be empty)")
_KEEP_FP8 = flags.DEFINE_bool("keep_fp8", False, "hf_to_orbax: keep FP8 weights + block scales")
_FP8 = flags.DEFINE_bool("fp8", False, "orbax_to_hf: write FP8 e4m3 weights with 128x128 block scales")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 4.0, "orbax_to_hf: safetensors shard size")


def convert(direction, src, dst, *, keep_fp8=False, fp8=False, max_shard_bytes=4 << 30):
    """Returns the model config; see the module docstring."""
    if os.path.exists(dst) and os.listdir(dst):
        raise ValueError(f"convert: destination {dst} exists and is not empty")
    if direction == "hf_to_orbax":
        cfg, params = load_hf(src, dtype="bfloat16", keep_fp8=keep_fp8, progress=True)
        export_inference(dst, cfg, params)
    elif direction == "orbax_to_hf":
        cfg, params = load_inference(src)
        save_hf(dst, cfg, params, fp8=fp8, max_shard_bytes=max_shard_bytes, progress=True)
    else:
        raise ValueError(f"convert: direction: expected 'hf_to_orbax' or 'orbax_to_hf', got {direction!r}")
    return cfg


def main(argv):
    del argv
    cfg = convert(_DIRECTION.value, _SRC.value, _DST.value, keep_fp8=_KEEP_FP8.value, fp8=_FP8.value,
                  max_shard_bytes=int(_SHARD_GB.value * 2**30))
    print(f"wrote {_DST.value}: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts, dtype {cfg.param_dtype}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["direction", "src", "dst"])
    app.run(main)
