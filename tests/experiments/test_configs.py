"""Config files: every ModelConfig field can be set on a binary's command line (`--config.model.x=y`)."""

import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from deepseek_jax import ModelConfig
from experiments import pretrain
from experiments.configs.base import model_fields

CONFIGS = pathlib.Path(__file__).parents[2] / "experiments" / "configs"


@pytest.mark.parametrize("name", ["tiny.py", "rl_math.py"])
def test_any_model_field_can_be_set_on_the_command_line(name):
    argv = ["binary", f"--config={CONFIGS / name}", "--config.model.index_topk=8", "--config.model.rope_factor=2.5",
            "--config.model.remat=dots"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", str(CONFIGS / name), flag_values=values, sys_argv=argv)
    values(argv)
    c = values.config
    preset = {k: v for k, v in c.model.items() if k not in ("preset", "index_topk", "rope_factor", "remat")
              and v is not None}  # the file's own settings
    assert pretrain.model_config(c) == ModelConfig.preset("tiny", **preset, index_topk=8, rope_factor=2.5,
                                                          remat="dots")


def test_unset_fields_keep_the_preset_and_unknown_ones_are_refused():
    assert pretrain.model_config(type("C", (), {"model": model_fields("tiny")})) == ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="not ModelConfig fields: \\['index_top_k'\\]"):
        model_fields("tiny", index_top_k=8)
