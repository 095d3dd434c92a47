"""GRPO post-training on generated exact-answer maths (spec §8).

    python -m experiments.rl --workdir=/tmp/rl [--config.steps=40 --config.kl_coef=0.01 ...]

The policy is the tiny preset with a byte-level tokenizer (token = byte; BOS 0, EOS 1). Unless
`init_from` names an HF safetensors checkpoint, it is first taught the task format by
`sft_steps` of supervised next-token training on generated "Q: ... A: <answer>" text, then
trained with GRPO: each step samples `group_size` completions for `prompts_per_step` fresh
prompts from the current params (π_old, with routes and kept sets recorded), scores them
exactly, and takes `inner_steps` Optax steps on that batch against the frozen reference (the
params GRPO started from). Held-out pass@1 (greedy) is measured every `eval_every` steps on
fixed tasks whose questions never appear in SFT or GRPO batches. Metrics go to WORKDIR/metrics.jsonl, one JSON object per line.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_dict, config_flags

from deepseek_jax import ModelConfig, Transformer, generate, load_hf
from deepseek_jax.losses import lm_loss
from deepseek_jax.model import forward
from deepseek_jax.rl import grpo, rewards
from deepseek_jax.rl.envs import math as math_env
from deepseek_jax.rl.rollout import build_batch, sample_groups
from deepseek_jax.rl.update import GRPOOptions, grpo_step, reference_logprobs
from deepseek_jax.training import metrics


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = "tiny"
    c.init_from = ""             # HF safetensors directory; "" = random init + SFT warm-up
    c.task = "math"
    c.levels = (1,)              # maths difficulty levels drawn from (envs/math.py)
    c.sft_steps = 150
    c.sft_batch = 64
    c.sft_lr = 3e-3
    c.steps = 40                 # GRPO steps (rollout batches)
    c.inner_steps = 2            # optimizer steps per rollout batch
    c.prompts_per_step = 16
    c.group_size = 8
    c.max_new_tokens = 6
    c.temperature = 1.0
    c.top_p = 1.0
    c.top_k = 0
    c.lr = 3e-4
    c.kl_coef = 0.0
    c.kl_estimator = "unbiased"
    c.clip_low = 0.2
    c.clip_high = 0.28
    c.offpolicy_delta = config_dict.placeholder(float)  # None: no off-policy masking
    c.normalize_std = False
    c.keep_routing = True
    c.keep_sampling_mask = True
    c.eval_every = 5
    c.eval_tasks = 48             # drawn once; duplicates dropped; never used for SFT or GRPO
    return c



BOS, EOS = 0, 1


def encode(text: str) -> list[int]:
    ids = list(text.encode())
    if min(ids, default=2) < 2:
        raise ValueError(f"encode: bytes 0 and 1 are BOS/EOS, found in {text!r}")
    return ids


def decode(ids) -> str:
    return bytes(int(t) for t in ids if t >= 2).decode(errors="replace")


def _tasks(levels, n, seed, exclude=frozenset()):
    """n tasks drawn evenly from the levels, none of whose prompts is in `exclude`."""
    per = [math_env.make_tasks(4 * n, level, seed) for level in levels]
    order = np.random.default_rng(seed).permutation(4 * n * len(levels))
    flat = [t for tasks in per for t in tasks]
    picked = [flat[i] for i in order if flat[i].prompt not in exclude][:n]
    if len(picked) < n:
        raise ValueError(f"levels {levels}: too few questions outside the held-out set for {n} tasks")
    return picked


# --------------------------------------------------------------------------- SFT warm-up
def _sft_batch(tasks):
    seqs = [[BOS] + encode(f"{t.prompt} {t.answer}") + [EOS] for t in tasks]
    width = max(map(len, seqs))
    tokens, mask = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width - 1), bool)
    for i, (s, t) in enumerate(zip(seqs, tasks)):
        tokens[i, :len(s)] = s
        mask[i, len(encode(t.prompt)):len(s) - 1] = True  # targets: the answer and EOS
    return tokens, mask


def sft(params, cfg, c, exclude):
    optimizer = optax.adamw(c.sft_lr, weight_decay=0.0)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, tokens, mask):
        def loss_fn(p):
            return lm_loss(forward(p, tokens[:, :-1], cfg), tokens[:, 1:], mask)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(c.sft_steps):
        tokens, mask = _sft_batch(_tasks(c.levels, c.sft_batch, 10_000 + i, exclude))
        params, opt_state, loss = step(params, opt_state, jnp.asarray(tokens), jnp.asarray(mask))
        if i % 25 == 0 or i == c.sft_steps - 1:
            logging.info("sft %d/%d loss %.4f", i, c.sft_steps, float(loss))
    return params


# --------------------------------------------------------------------------- GRPO
def pass_at_1(params, cfg, tasks, max_new_tokens):
    gens = generate(params, cfg, [[BOS] + encode(t.prompt) for t in tasks], max_new_tokens, eos_ids=(EOS,))
    return float(np.mean([rewards.math_reward(decode(g.tokens), t.answer).value for t, g in zip(tasks, gens)]))


def run(c: ml_collections.ConfigDict, workdir: str) -> tuple[float, float]:
    """SFT warm-up (unless init_from) then GRPO; returns held-out pass@1 (start of GRPO, end)."""
    if c.task != "math":
        raise ValueError(f"task: only 'math' has a loop so far, got {c.task!r}")
    os.makedirs(workdir, exist_ok=True)
    if c.init_from:
        cfg, params = load_hf(c.init_from)
    else:
        cfg = ModelConfig.preset(c.model)
        params = Transformer(cfg).init(jax.random.key(c.seed), jnp.zeros((1, 8), jnp.int32))["params"]
    eval_tasks = list({t.prompt: t for t in _tasks(c.levels, c.eval_tasks, seed=2**31 - 1)}.values())
    held_out = frozenset(t.prompt for t in eval_tasks)
    t0 = time.time()
    if not c.init_from and c.sft_steps:
        params = sft(params, cfg, c, held_out)
    ref_params = params
    options = GRPOOptions(temperature=c.temperature, clip_low=c.clip_low, clip_high=c.clip_high, kl_coef=c.kl_coef,
                          kl_estimator=c.kl_estimator, offpolicy_delta=c.offpolicy_delta)
    optimizer = optax.adamw(c.lr, b2=0.99, weight_decay=0.0)
    opt_state = optimizer.init(params)
    metrics_path = os.path.join(workdir, "metrics.jsonl")

    log = functools.partial(metrics.append_jsonl, metrics_path)

    start_pass = pass_at_1(params, cfg, eval_tasks, c.max_new_tokens)
    log({"step": 0, "pass_at_1": start_pass, "wall_s": time.time() - t0})
    logging.info("step 0 held-out pass@1 %.3f", start_pass)
    for step in range(1, c.steps + 1):
        tasks = _tasks(c.levels, c.prompts_per_step, step, held_out)
        t_roll = time.time()
        ro = sample_groups(params, cfg, [[BOS] + encode(t.prompt) for t in tasks], c.group_size, c.max_new_tokens,
                           temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, seed=c.seed * 100_003 + step,
                           eos_ids=(EOS,), record_routes=c.keep_routing)
        roll_s = time.time() - t_roll
        r = np.array([rewards.math_reward(decode(g.tokens), tasks[i // c.group_size].answer).value
                      for i, g in enumerate(ro.generations)]).reshape(len(tasks), c.group_size)
        adv = np.asarray(grpo.group_advantages(r, normalize_std=c.normalize_std)).reshape(-1)
        batch = build_batch(ro.trajectories(), cfg, keep_sampling_mask=c.keep_sampling_mask, keep_routing=c.keep_routing)
        ref_logp = reference_logprobs(ref_params, cfg, batch, temperature=c.temperature)
        for _ in range(c.inner_steps):
            params, opt_state, loss, m, gnorm = grpo_step(params, opt_state, batch, ref_logp, adv, cfg=cfg,
                                                          optimizer=optimizer, options=options)
        n_tokens = sum(len(g.tokens) for g in ro.generations)
        row = {"step": step, "reward_mean": float(r.mean()), "loss": float(loss), "kl": float(m.kl),
               "clip_fraction": float(m.clip_fraction), "masked_fraction": float(m.masked_fraction),
               "entropy": float(m.entropy), "grad_norm": float(gnorm), "response_length": n_tokens / r.size,
               "truncated": ro.truncated, "tokens_per_s": n_tokens / roll_s, "wall_s": time.time() - t0}
        if step % c.eval_every == 0 or step == c.steps:
            row["pass_at_1"] = pass_at_1(params, cfg, eval_tasks, c.max_new_tokens)
        log(row)
        logging.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
    end_pass = row["pass_at_1"] if c.steps else start_pass
    logging.info("held-out pass@1: %.3f -> %.3f in %.0f s", start_pass, end_pass, time.time() - t0)
    return start_pass, end_pass


def main(_):
    run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    # Flags exist only when this runs as a binary: tests import its functions next to
    # other binaries that also define --config / --workdir.
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config())
    _WORKDIR = flags.DEFINE_string("workdir", None, "where metrics.jsonl is written", required=True)
    app.run(main)
