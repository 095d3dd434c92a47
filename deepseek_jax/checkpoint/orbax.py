"""Orbax checkpoints: training save/restore (params, optimizer, data state) and inference export.

`CheckpointManager` wraps `orbax.checkpoint.CheckpointManager` with three composite items per
step: `params` and `opt_state` (array pytrees, StandardSave) and `data_state` (the data
iterator's JSON dict). Saves are asynchronous and atomic: orbax writes a step into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once everything is on disk, so a
save killed midway leaves the previous step as the latest restorable one; the leftover tmp
directory is never listed as a step, and orbax removes it when that step is saved again.

Restoring onto a different mesh is restoring onto different targets:
`deepseek_jax.params.abstract_params(cfg, mesh, rules)` gives `ShapeDtypeStruct`s whose shardings come from the params' logical axis
names, and orbax reads each shard straight into its place.

`export_inference` writes bf16 params (the tensors the model pins to fp32 stay fp32: router
gate and bias, indexer head weights and key norm; spec §3, §5, §7) beside the HF `config.json`
and our full `model_config.json`; `load_inference` reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from deepseek_jax.config import ModelConfig
from deepseek_jax.params import LogicalRules, abstract_params, check_params

class CheckpointManager:
    """Periodic, asynchronous, atomic checkpoints of one training run in `directory`."""

    def __init__(self, directory, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"CheckpointManager: max_to_keep: expected None or >= 1, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(f"CheckpointManager: save_interval_steps: expected >= 1, got {save_interval_steps}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
        )
        # Fixed handlers let a fresh manager restore any item without having saved one first.
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "data_state": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def save(self, step: int, *, params, opt_state=None, data_state: dict | None = None,
             force: bool = False) -> bool:
        """Starts saving `step` (returns once arrays are copied off-device when async).

        Returns False if `save_interval_steps` skips this step (orbax saves regardless when the
        directory has no step yet, or at a preemption signal) or the step is not past the latest.
        """
        items = {"params": ocp.args.StandardSave(nn.meta.unbox(params))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(nn.meta.unbox(opt_state))
        if data_state is not None:
            # Fail here, not in the background writer.
            try:
                json.dumps(data_state)
            except TypeError as e:
                raise ValueError(f"CheckpointManager.save: data_state: expected a JSON-serialisable dict ({e})") from None
            items["data_state"] = ocp.args.JsonSave(data_state)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int | None = None, *, params_target, opt_state_target=None) -> dict:
        """Reads `step` (None: the latest) onto the targets' shardings.

        Targets are pytrees of `jax.ShapeDtypeStruct` with `.sharding` (see `abstract_params`).
        Returns dict(step, params, opt_state, data_state); opt_state is None unless a target is
        given, data_state is None if the step has none.
        """
        self.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise ValueError(f"CheckpointManager.restore: no checkpoint in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"CheckpointManager.restore: no step {step} in {self.directory}; "
                             f"available steps: {steps}")
        saved = self._saved_items(step)
        items = {"params": ocp.args.StandardRestore(nn.meta.unbox(params_target))}
        if opt_state_target is not None:
            if "opt_state" not in saved:
                raise ValueError(f"CheckpointManager.restore: step {step} in {self.directory} has no opt_state")
            items["opt_state"] = ocp.args.StandardRestore(nn.meta.unbox(opt_state_target))
        if "data_state" in saved:
            items["data_state"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return dict(step=step, params=restored["params"],
                    opt_state=restored["opt_state"] if "opt_state" in items else None,
                    data_state=restored["data_state"] if "data_state" in items else None)

    def _saved_items(self, step: int) -> set[str]:
        # orbax's default layout: <directory>/<step>/<item>/
        step_dir = os.path.join(self.directory, str(step))
        return {name for name in ("params", "opt_state", "data_state")
                if os.path.isdir(os.path.join(step_dir, name))}

    def latest_step(self) -> int | None:
        """The newest committed step, or one this manager is still writing (restore waits for it)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and deletions, then releases orbax's threads."""
        self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------ inference export

def export_inference(directory, cfg: ModelConfig, params) -> None:
    """Writes `params/` (bf16; the tensors the model keeps fp32 stay fp32), `config.json` (HF)
    and `model_config.json` (every ModelConfig field) into `directory`."""
    directory = os.path.abspath(os.fspath(directory))
    cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    params = nn.meta.unbox(params)
    expected = abstract_params(cfg)
    check_params(params, expected, what="export_inference")
    params = jax.tree.map(lambda x, s: jnp.asarray(x).astype(s.dtype), params, expected)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(directory, "params"), params)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_hf_config(), f, indent=2)
    with open(os.path.join(directory, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)


def load_inference(directory, *, mesh: jax.sharding.Mesh | None = None,
                   rules: LogicalRules | None = None) -> tuple[ModelConfig, dict]:
    """Reads an `export_inference` directory -> (cfg, params), params placed by `abstract_params`."""
    directory = os.path.abspath(os.fspath(directory))
    config_file = os.path.join(directory, "model_config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"load_inference: no model_config.json in {directory}")
    with open(config_file) as f:
        fields = json.load(f)
    unknown = sorted(fields.keys() - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"load_inference: {config_file}: unknown ModelConfig fields {unknown}")
    cfg = ModelConfig(**fields)
    target = abstract_params(cfg, mesh, rules)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(os.path.join(directory, "params")).item_metadata.tree
        check_params(stored, target, what=f"load_inference: {directory}", check_dtype=True)
        params = checkpointer.restore(os.path.join(directory, "params"), target)
    return cfg, params
