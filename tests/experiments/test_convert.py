"""experiments/convert.py: HF <-> Orbax round trips, and mismatches refused before any write."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, Transformer, load_hf, save_hf
from experiments.convert import convert

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = ModelConfig.preset("tiny", dtype="bfloat16", param_dtype="bfloat16")
    params = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(3), jnp.zeros((1, 4), jnp.int32))["params"]
    path = tmp_path_factory.mktemp("hf")
    save_hf(path, cfg, params, max_shard_bytes=300_000)
    return path


def test_hf_to_orbax_to_hf_round_trip(hf_dir, tmp_path):
    convert("hf_to_orbax", hf_dir, tmp_path / "orbax")
    convert("orbax_to_hf", tmp_path / "orbax", tmp_path / "hf2", max_shard_bytes=300_000)
    cfg, a = load_hf(hf_dir)
    _, b = load_hf(tmp_path / "hf2")
    for (p, x), (_, y) in zip(jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(p)


def test_binary_runs_with_fp8(hf_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    for args in (["--direction=hf_to_orbax", f"--src={hf_dir}", f"--dst={tmp_path / 'orbax'}"],
                 ["--direction=orbax_to_hf", f"--src={tmp_path / 'orbax'}", f"--dst={tmp_path / 'hf8'}", "--fp8"]):
        out = subprocess.run([sys.executable, "-m", "experiments.convert", *args], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "wrote" in out.stdout
    assert json.loads((tmp_path / "hf8" / "config.json").read_text())["quantization_config"]["fmt"] == "e4m3"
    load_hf(tmp_path / "hf8")


def test_mismatches_are_listed_before_anything_is_written(hf_dir, tmp_path):
    bad_hf = tmp_path / "bad_hf"
    bad_hf.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    config["vocab_size"] = 300  # the embedding, the head and their MTP copies no longer fit
    (bad_hf / "config.json").write_text(json.dumps(config))
    for f in os.listdir(hf_dir):
        if f != "config.json":
            os.symlink(hf_dir / f, bad_hf / f)
    with pytest.raises(ValueError, match=r"(?s)shape: model\.embed_tokens\.weight.*shape: lm_head\.weight"):
        convert("hf_to_orbax", bad_hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    convert("hf_to_orbax", hf_dir, tmp_path / "orbax")
    model_config = tmp_path / "orbax" / "model_config.json"
    fields = json.loads(model_config.read_text())
    fields["moe_intermediate_size"] = 48
    model_config.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"(?s)shape/dtype: \['moe_layers'\]\['mlp'\]\['w_down'\].*w_gate"):
        convert("orbax_to_hf", tmp_path / "orbax", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        convert("hf_to_orbax", hf_dir, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
