"""Pretraining binary: every V3.2 loss, the DSA stages, Orbax resume, metrics, a sample at the end.

    python -m experiments.pretrain --config=experiments/configs/tiny.py --workdir=/tmp/tiny \
        [--config.steps=400 --config.dsa_stage=dense_warmup --config.mesh=fsdp=-1 ...]

Config fields: see experiments/configs/base.py. The workdir holds `checkpoints/` (Orbax: params,
optimizer state and the data iterator's state; async, the last `keep_checkpoints` kept),
`tokenizer.json`, `config.json` (the ModelConfig's fields), `metrics.jsonl` (one JSON object per logged step) and `tensorboard/`. Running
the same command on the same workdir resumes from its latest checkpoint and stops at `steps`.
SIGTERM (preemption) saves the current step and exits cleanly; a NaN/inf loss or gradient
stops the run with an error before anything of that step is saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import jax
import ml_collections
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax.checkpoint.orbax import CheckpointManager
from deepseek_jax.config import ModelConfig
from deepseek_jax.generate import generate
from deepseek_jax.params import abstract_params
from deepseek_jax.training import data, dsa, metrics, train_step
from deepseek_jax.training.optimizer import learning_rate_schedule, make_optimizer
from sharding import rules as rules_lib
from sharding.mesh import initialize, make_mesh


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient norm became NaN/inf; the last checkpoint is the last good step."""


def model_config(config) -> ModelConfig:
    overrides = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
    return ModelConfig.preset(config.model.preset, **overrides)


def _init_from_dirs(path: str) -> tuple[str, str]:
    """(workdir, checkpoint directory) of `--config.init_from`: a workdir or its checkpoints/."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"init_from: no directory at {path!r} (expected a workdir or its checkpoints/)")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path, os.path.join(path, "checkpoints")
    return os.path.dirname(path), path


def load_tokenizer_and_stream(config, workdir: str, cfg: ModelConfig):
    """The tokenizer and the packed corpus ((tokens, trained): data.pack). The tokenizer is
    `config.tokenizer`, else the one saved in the workdir (a resumed run), else the init_from
    run's (the token ids its params learnt), else a BPE trained on the corpus; the last two are
    saved in the workdir."""
    docs = data.load_documents(config.data, config.data_max_bytes)
    saved = os.path.join(workdir, "tokenizer.json")
    inherited = os.path.join(_init_from_dirs(config.init_from)[0], "tokenizer.json") if config.init_from else ""
    if config.tokenizer:
        tokenizer = data.load_tokenizer(config.tokenizer, cfg.vocab_size)
    elif os.path.isfile(saved):
        tokenizer = data.load_tokenizer(saved, cfg.vocab_size)
    else:
        if os.path.isfile(inherited):
            tokenizer = data.load_tokenizer(inherited, cfg.vocab_size)
        else:
            tokenizer = data.train_tokenizer(docs, cfg.vocab_size)
        if jax.process_index() == 0:
            tokenizer.save(saved)
    return tokenizer, data.pack(tokenizer, docs, align=config.seq_len if config.data_per_window else 0)


def _restore_params(path: str, target):
    with CheckpointManager(_init_from_dirs(path)[1]) as manager:
        restored = manager.restore(params_target=target)
    return restored["params"], restored["step"]


def sample(params, cfg, tokenizer, prompt: str, n_tokens: int, temperature: float, seed: int) -> str:
    """A continuation of `prompt` by the cached decoder (`deepseek_jax.generate`)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    out = generate(params, cfg, [ids], n_tokens, temperature=temperature, seed=seed)[0]
    return tokenizer.decode(out.tokens.tolist())


def run(config: ml_collections.ConfigDict, workdir: str, *, batches=None, devices=None,
        progress: bool = True) -> dict:
    """Trains until `config.steps` (resuming from `workdir`) -> summary dict.

    `batches` (tests) replaces the data iterator; it must expose `state` like `data.PackedBatches`.
    `devices` (default: all) are the devices the mesh spans.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    cfg = model_config(config)
    mesh, rules = make_mesh(config.mesh, devices), rules_lib.preset(config.rules)
    lc = train_step.LossConfig(dsa_stage=config.dsa_stage, mtp_weight=config.mtp_weight,
                               balance_weight=config.balance_weight, indexer_weight=config.indexer_weight,
                               bias_update_rate=config.bias_update_rate, indexer_recall=config.indexer_recall)
    tx = make_optimizer(stage=config.dsa_stage, learning_rate=config.learning_rate,
                        indexer_learning_rate=config.indexer_learning_rate, warmup_steps=config.warmup_steps,
                        total_steps=config.steps, min_lr_ratio=config.min_lr_ratio,
                        weight_decay=config.weight_decay, grad_clip=config.grad_clip,
                        indexer_grad_clip=config.indexer_grad_clip)
    tokenizer, (stream, trained) = load_tokenizer_and_stream(config, workdir, cfg)
    if jax.process_index() == 0:  # what a run initialised from this one (experiments/rl.py) rebuilds
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    shardings = train_step.state_shardings(cfg, tx, mesh, rules)

    manager = CheckpointManager(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    start, data_state = 0, None
    if manager.latest_step() is not None:
        opt_target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  jax.eval_shape(tx.init, abstract_params(cfg)), shardings["opt_state"])
        restored = manager.restore(params_target=abstract_params(cfg, mesh, rules), opt_state_target=opt_target)
        state = {"params": restored["params"], "opt_state": restored["opt_state"]}
        start, data_state = restored["step"], restored["data_state"]
        print(f"resumed from {manager.directory} at step {start}")
    else:
        state = train_step.init_state(cfg, tx, mesh, rules, config.seed, shardings)
        if config.init_from:
            params, from_step = _restore_params(config.init_from, abstract_params(cfg, mesh, rules))
            state = {"params": params, "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)}
            print(f"initialised from {config.init_from} (step {from_step})")
    if batches is None:
        batches = data.PackedBatches(stream, seq_len=config.seq_len, batch_size=config.batch_size,
                                     accum_steps=config.grad_accum_steps, seed=config.seed, state=data_state,
                                     trained=trained)
    step_fn = train_step.make_train_step(cfg, lc, tx, mesh, rules,
                                         (config.grad_accum_steps, config.batch_size, config.seq_len), shardings)

    attention = dsa.ATTENTION[config.dsa_stage]
    if attention == "auto":
        attention = "sparse" if config.seq_len > cfg.index_topk else "dense"
    flops_per_token = metrics.train_flops_per_token(cfg, state["params"], config.seq_len, attention,
                                                    bool(cfg.num_nextn_predict_layers) and config.mtp_weight > 0)
    peak = config.peak_tflops * 1e12 or metrics.peak_flops_per_device()
    tokens_per_step = config.grad_accum_steps * config.batch_size * config.seq_len
    chief = jax.process_index() == 0
    events = metrics.EventWriter(os.path.join(workdir, "tensorboard")) if chief else None

    preempted = []
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    history, step, wall0 = [], start, time.perf_counter()
    bar = tqdm.tqdm(total=config.steps, initial=start, disable=not progress, dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), start
    try:
        while step < config.steps and not preempted:
            batch = next(batches)
            state, m = step_fn(state, batch)
            step += 1
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            bad = [k for k in ("loss", "grad_norm", "indexer_grad_norm") if not math.isfinite(m[k])]
            if bad:
                manager.wait_until_finished()
                raise NonFiniteLossError(
                    f"step {step}: non-finite {', '.join(f'{k}={m[k]}' for k in bad)}; stopped without saving it. "
                    f"The last good checkpoint is step {manager.latest_step()} in {manager.directory}.")
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps or step == start + 1:
                now = time.perf_counter()
                tokens_per_s = tokens_per_step * (step - last_step) / (now - last_time)
                last_time, last_step = now, step
                record = dict(step=step, **m, learning_rate=float(tx_lr(config, step)), tokens_per_s=tokens_per_s,
                              tflops_per_s=tokens_per_s * flops_per_token / 1e12)
                if peak:
                    record["mfu"] = tokens_per_s * flops_per_token / (peak * jax.device_count())
                history.append(record)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lm=f"{m['lm_loss']:.3f}", tok_s=f"{tokens_per_s:.0f}")
                if chief:
                    metrics.append_jsonl(os.path.join(workdir, "metrics.jsonl"), record)
                    events.scalars(step, {k: v for k, v in record.items() if k != "step"})
            if step % config.checkpoint_every == 0 or step == config.steps or preempted:
                manager.save(step, params=state["params"], opt_state=state["opt_state"],
                             data_state=dict(batches.state), force=True)
        if preempted:
            print(f"SIGTERM: saved step {step}; exiting")
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        manager.close()
        if events:
            events.close()
    return {"start_step": start, "step": step, "history": history, "state": state, "cfg": cfg,
            "tokenizer": tokenizer, "preempted": bool(preempted), "wall_s": time.perf_counter() - wall0}


def tx_lr(config, step: int) -> float:
    """The main group's learning rate at `step` (for logging)."""
    return learning_rate_schedule(config.learning_rate, config.warmup_steps, config.steps, config.min_lr_ratio)(step)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    initialize()
    config = _CONFIG.value
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {config.mesh}; "
          f"dsa_stage {config.dsa_stage}")
    try:
        summary = run(config, _WORKDIR.value)
    except NonFiniteLossError as e:
        raise SystemExit(f"error: {e}") from None
    history = summary["history"]
    if history:
        print(f"steps {summary['start_step']} -> {summary['step']} in {summary['wall_s']:.0f}s; "
              f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f} "
              f"(lm {history[0]['lm_loss']:.3f} -> {history[-1]['lm_loss']:.3f}); "
              f"{history[-1]['tokens_per_s']:.0f} tokens/s")
    if summary["preempted"] or config.sample_tokens <= 0:
        return
    text = sample(summary["state"]["params"], summary["cfg"], summary["tokenizer"], config.sample_prompt,
                  config.sample_tokens, config.sample_temperature, config.seed)
    print(f"sample:\n{config.sample_prompt}{text}")


if __name__ == "__main__":
    # Flags exist only when this runs as a binary: tests import its functions next to
    # other binaries that also define --config / --workdir.
    _CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/tiny.py", "training config file")
    _WORKDIR = flags.DEFINE_string("workdir", "/tmp/deepseek_jax_tiny", "checkpoints, metrics and tokenizer go here")
    app.run(main)
