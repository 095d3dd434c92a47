"""GRPO post-training (spec §8) on generated maths, sandbox-graded code or tool-using agent tasks.

    python -m experiments.rl --config=experiments/configs/rl_math.py --workdir=/tmp/rl \
        [--config.steps=40 --config.kl_coef=0.01 --config.offpolicy_delta=0.5 ...]

Config fields: experiments/configs/rl_base.py (rl_math, rl_code and rl_agent start from it).
`init_from` names the policy GRPO starts from: a pretraining workdir (or its checkpoints/) of
experiments/pretrain.py, whose latest params, `tokenizer.json` and `config.json` are used (its
model must equal this config's `model` but for the numerics knobs; e.g. a run of
configs/rl_format.py on `python -m experiments.task_corpus` text), or an HF safetensors
checkpoint of a byte-level policy (rl/byte_tokenizer.py). Without it, a random byte-level policy
is first taught the task format by `sft_steps` supervised steps on generated demonstrations
(maths: the answer; code: the reference solution; agent: none yet).
Then each GRPO step plays `group_size` episodes of `prompts_per_step` fresh tasks from the
current params (π_old; routes and kept sets recorded; agent episodes are multi-turn tool-calling
conversations in the chat format, rl/multiturn.py), scores them with the task's verifier (plus
the optional format, language and length terms), and takes `inner_steps` AdamW steps on that
batch against the frozen reference (the params GRPO started from). Held-out pass@1 (greedy) is
measured every `eval_every` steps on fixed tasks that never appear in SFT or GRPO batches.

The workdir holds `checkpoints/` (Orbax: policy and reference params, optimizer state, the
start pass@1; step 0 is the policy GRPO starts from), `metrics.jsonl` and `tensorboard/`.
Rollout seeds and tasks are functions of (seed, step), so running the same command again
resumes from the latest checkpoint, drops the metrics rows logged after it, and reproduces the
uninterrupted run up to `steps`. SIGTERM saves the current step and exits.
"""

import dataclasses
import functools
import glob
import json
import os
import signal
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import ModelConfig, Transformer, load_hf
from deepseek_jax.checkpoint.orbax import CheckpointManager
from deepseek_jax.losses import lm_loss
from deepseek_jax.model import forward
from deepseek_jax.params import abstract_params
from deepseek_jax.rl import byte_tokenizer, grpo, rewards
from deepseek_jax.rl.bpe_tokenizer import BPETokenizer
from deepseek_jax.rl.envs import agent
from deepseek_jax.rl.envs import code as code_env
from deepseek_jax.rl.envs import math as math_env
from deepseek_jax.rl.multiturn import SingleTurn, play
from deepseek_jax.rl.rollout import build_batch, padded_length
from deepseek_jax.rl.update import GRPOOptions, grpo_step, reference_logprobs
from deepseek_jax.training import data, metrics
from experiments.pretrain import _init_from_dirs, _restore_params, model_config

TASKS = ("math", "code", "agent")
HELD_OUT_SEED = 2**31 - 1  # maths and code: the held-out draw's seed; agent: seeds from here up
# ModelConfig fields that change no parameter and no result beyond rounding: this config's own
# values apply to a policy initialised from a pretraining run
RUNTIME_FIELDS = ("dtype", "remat", "attention_impl", "attention_chunk_size", "moe_capacity_factor")
MODEL_METRICS = ("loss", "kl", "clip_fraction", "masked_fraction", "entropy", "ratio_mean", "grad_norm")


# --------------------------------------------------------------------------- tasks
def draw_tasks(c, n: int, seed: int, exclude=frozenset()) -> list:
    """n tasks of c.task drawn evenly from c.levels. Maths and code: none whose prompt is in
    `exclude`; agent: environments of seeds seed·n .. seed·n + n − 1 (held out: from HELD_OUT_SEED)."""
    if c.task == "agent":
        first = HELD_OUT_SEED if seed == HELD_OUT_SEED else seed * n
        return [agent.make_env(c.levels[i % len(c.levels)], first + i) for i in range(n)]
    make = math_env.make_tasks if c.task == "math" else code_env.make_tasks
    per = [make(4 * n, level, seed) for level in c.levels]
    order = np.random.default_rng(seed).permutation(4 * n * len(c.levels))
    flat = [t for tasks in per for t in tasks]
    picked = [flat[i] for i in order if flat[i].prompt not in exclude][:n]
    if len(picked) < n:
        raise ValueError(f"levels {c.levels}: too few {c.task} tasks outside the held-out set for {n} tasks")
    return picked


def held_out_tasks(c) -> tuple[list, frozenset]:
    """(the fixed evaluation tasks, their prompts): no training batch, warm-up or corpus
    (experiments/task_corpus.py) holds one of those prompts. Agent tasks: distinct seeds instead."""
    tasks = draw_tasks(c, c.eval_tasks, HELD_OUT_SEED)
    if c.task == "agent":
        return tasks, frozenset()
    tasks = list({t.prompt: t for t in tasks}.values())
    return tasks, frozenset(t.prompt for t in tasks)


def make_game(c, task):
    """The episode of one task: a one-reply game for maths and code, a tool-calling one for agents."""
    if c.task == "math":
        return SingleTurn(byte_tokenizer.BOS + task.prompt, functools.partial(rewards.math_reward, answer=task.answer),
                          rewards.has_final_answer)
    if c.task == "code":
        score = functools.partial(rewards.code_reward, tests=task.tests, timeout_s=c.code_timeout_s)
        return SingleTurn(byte_tokenizer.BOS + task.prompt + "\n", score, rewards.has_code_block)
    return agent.AgentGame(task, c.thinking_mode)


def demonstration(c, task) -> tuple[str, str]:
    """(prompt, target) text of a supervised warm-up example; the target ends with EOS."""
    if c.task == "math":
        return byte_tokenizer.BOS + task.prompt, f" {task.answer}{byte_tokenizer.EOS}"
    if c.task == "code":
        return byte_tokenizer.BOS + task.prompt + "\n", f"```python\n{task.reference}```{byte_tokenizer.EOS}"
    raise ValueError("sft_steps: the agent task has no demonstrations yet; set --config.sft_steps=0")


# --------------------------------------------------------------------------- format warm-up
def sft_batch(examples):
    """(tokens [N, W], mask [N, W − 1]): the mask marks the positions that predict a target token."""
    pairs = [(byte_tokenizer.encode(p), byte_tokenizer.encode(t)) for p, t in examples]
    width = padded_length(max(len(p) + len(t) for p, t in pairs))
    tokens, mask = np.zeros((len(pairs), width), np.int32), np.zeros((len(pairs), width - 1), bool)
    for i, (p, t) in enumerate(pairs):
        tokens[i, :len(p) + len(t)] = p + t
        mask[i, len(p) - 1:len(p) + len(t) - 1] = True
    return tokens, mask


@functools.cache
def _adamw(learning_rate: float, b2: float) -> optax.GradientTransformation:
    """One optimizer object per setting, so the jitted steps (static in it) compile once per process."""
    return optax.adamw(learning_rate, b2=b2, weight_decay=0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer"))
def _sft_step(params, opt_state, tokens, mask, cfg, optimizer):
    def loss_fn(p):
        return lm_loss(forward(p, tokens[:, :-1], cfg), tokens[:, 1:], mask)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def sft(params, cfg, c, exclude):
    optimizer = _adamw(c.sft_learning_rate, 0.999)
    opt_state = optimizer.init(params)
    for i in range(c.sft_steps):
        tokens, mask = sft_batch([demonstration(c, t) for t in draw_tasks(c, c.sft_batch, 10_000 + i, exclude)])
        params, opt_state, loss = _sft_step(params, opt_state, jnp.asarray(tokens), jnp.asarray(mask), cfg, optimizer)
        if i % 25 == 0 or i == c.sft_steps - 1:
            print(f"warm-up step {i + 1}/{c.sft_steps}: loss {float(loss):.4f}")
    return params


# --------------------------------------------------------------------------- GRPO
def pass_at_1(params, cfg, c, tasks, tokenizer) -> float:
    """The held-out pass@1: the verifier's mean reward of one greedy episode per task."""
    games = [make_game(c, t) for t in tasks]
    play(params, cfg, games, tokenizer, max_new_tokens=c.max_new_tokens, max_turns=c.max_turns,
         temperature=0.0, record_routes=False)
    return float(np.mean([g.reward().value for g in games]))


def episode_rewards(c, games, episodes, tokenizer) -> dict[str, np.ndarray]:
    """Per episode: the verifier's outcome, the format and language scores, the length penalty and
    their weighted sum (the GRPO reward)."""
    outcome = np.array([g.reward().value for g in games])
    formatted = np.array([g.well_formed() for g in games], np.float32)
    language = np.array([rewards.language_consistency(
        "".join(tokenizer.decode(gen.tokens) for _, gen in e.trajectory.turns), g.opening())
        for g, e in zip(games, episodes)])
    length = np.array([rewards.length_penalty(e.generated_tokens, c.max_new_tokens * c.max_turns,
                                              budget=c.length_budget, scale=c.length_penalty) for e in episodes])
    total = outcome + c.format_weight * formatted + c.language_weight * language + length
    return {"reward": total, "outcome": outcome, "well_formed": formatted, "language": language,
            "length_penalty": length}


def grpo_iteration(params, opt_state, ref_params, cfg, c, step: int, held_out, tokenizer):
    """One GRPO step: rollouts of fresh tasks, rewards, inner_steps optimizer steps -> (params, opt_state, row)."""
    tasks = draw_tasks(c, c.prompts_per_step, step, held_out)
    games = [make_game(c, t) for t in tasks for _ in range(c.group_size)]
    seed = int(np.random.SeedSequence([c.seed, step]).generate_state(1)[0])
    t0 = time.perf_counter()
    episodes = play(params, cfg, games, tokenizer, max_new_tokens=c.max_new_tokens, max_turns=c.max_turns,
                    temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, seed=seed,
                    record_routes=c.keep_routing)
    rollout_s = time.perf_counter() - t0
    r = episode_rewards(c, games, episodes, tokenizer)
    adv = np.asarray(grpo.group_advantages(r["reward"].reshape(len(tasks), c.group_size),
                                           normalize_std=c.normalize_std)).reshape(-1)
    batch = build_batch([e.trajectory for e in episodes], cfg, keep_sampling_mask=c.keep_sampling_mask,
                        keep_routing=c.keep_routing)
    ref_logp = reference_logprobs(ref_params, cfg, batch, temperature=c.temperature)
    options = GRPOOptions(temperature=c.temperature, clip_low=c.clip_low, clip_high=c.clip_high, kl_coef=c.kl_coef,
                          kl_estimator=c.kl_estimator, offpolicy_delta=c.offpolicy_delta)
    sums = dict.fromkeys(MODEL_METRICS, 0.0)
    for _ in range(c.inner_steps):
        params, opt_state, loss, m, gnorm = grpo_step(params, opt_state, batch, ref_logp, adv, cfg=cfg,
                                                      optimizer=_adamw(c.learning_rate, 0.99), options=options)
        values = dict(m._asdict(), loss=loss, grad_norm=gnorm)
        sums = {k: sums[k] + float(values[k]) / c.inner_steps for k in MODEL_METRICS}
    n_tokens = sum(e.generated_tokens for e in episodes)
    row = {"step": step, "reward_mean": float(r["reward"].mean()), "outcome_mean": float(r["outcome"].mean()),
           "well_formed": float(r["well_formed"].mean()), "language_consistency": float(r["language"].mean()),
           "length_penalty": float(r["length_penalty"].mean()), **sums,
           "response_length": n_tokens / len(episodes),
           "turns": float(np.mean([len(e.trajectory.turns) for e in episodes])),
           "truncated": sum(e.finish in ("truncated", "context") for e in episodes),
           "tokens_per_s": n_tokens / rollout_s, "rollout_s": rollout_s}
    return params, opt_state, row


# --------------------------------------------------------------------------- checkpoints
def _device():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _target(tree):
    """Restore targets (shape, dtype, one-device sharding) for the arrays or structs of `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_device()), tree)


def _saved_params(c, params, ref_params):
    """The params item: the reference is stored unless init_from rebuilds it."""
    return {"policy": params} if c.init_from else {"policy": params, "reference": ref_params}


def _keep_rows_up_to(path: str, step: int) -> None:
    """Drops the metrics rows of steps after `step` (logged after the checkpoint a resume starts from)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


def load_init_from(c, cfg):
    """(cfg, params, tokenizer) of c.init_from: an HF safetensors checkpoint (byte-level tokens), or
    a pretraining workdir (or its checkpoints/): its latest params, tokenizer.json and config.json,
    whose model must equal `cfg` but for RUNTIME_FIELDS."""
    if glob.glob(os.path.join(c.init_from, "*.safetensors")):
        return *load_hf(c.init_from), byte_tokenizer
    workdir = _init_from_dirs(c.init_from)[0]
    files = {name: os.path.join(workdir, name) for name in ("config.json", "tokenizer.json")}
    for name, path in files.items():
        if not os.path.isfile(path):
            raise ValueError(f"init_from: no {name} in {workdir} (expected an HF safetensors checkpoint or a "
                             f"workdir of experiments/pretrain.py)")
    with open(files["config.json"]) as f:
        saved = ModelConfig(**json.load(f))
    differ = [f"{f.name}={getattr(saved, f.name)!r} there, {getattr(cfg, f.name)!r} here"
              for f in dataclasses.fields(ModelConfig)
              if f.name not in RUNTIME_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)]
    if differ:
        raise ValueError(f"init_from: {workdir} trained another model than config.model: {'; '.join(differ)}")
    params, step = _restore_params(c.init_from, _target(abstract_params(cfg)))
    print(f"initialised from {workdir} (pretraining step {step})")
    return cfg, params, BPETokenizer(data.load_tokenizer(files["tokenizer.json"], cfg.vocab_size))


def initial_policy(cfg, c):
    """(cfg, params, tokenizer) GRPO's warm-up starts from: init_from's, else a random byte-level init."""
    if c.init_from:
        return load_init_from(c, cfg)
    init = jax.jit(lambda key: nn.meta.unbox(Transformer(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]))
    return cfg, init(jax.random.key(c.seed)), byte_tokenizer


def run(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> dict:
    """Warm-up (unless resuming or init_from), then GRPO up to c.steps, resuming from `workdir`.
    Returns dict(start_step, step, start_pass_at_1, pass_at_1 (the last eval), history, params, wall_s)."""
    if c.task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {c.task!r}")
    if c.group_size < 2:
        raise ValueError(f"group_size: GRPO compares samples of a prompt, expected >= 2, got {c.group_size}")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    wall0 = time.perf_counter()
    cfg = model_config(c)
    if not c.init_from and cfg.vocab_size < byte_tokenizer.VOCAB_SIZE:
        raise ValueError(f"model.vocab_size: byte-level tokens need >= {byte_tokenizer.VOCAB_SIZE}, "
                         f"got {cfg.vocab_size}")
    eval_tasks, held_out = held_out_tasks(c)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    optimizer = _adamw(c.learning_rate, 0.99)

    manager = CheckpointManager(os.path.join(workdir, "checkpoints"), max_to_keep=c.keep_checkpoints)
    if manager.latest_step() is not None:
        template, ref_params, tokenizer = abstract_params(cfg), None, byte_tokenizer
        if c.init_from:
            cfg, ref_params, tokenizer = load_init_from(c, cfg)
            template = ref_params
        restored = manager.restore(params_target=_target(_saved_params(c, template, template)),
                                   opt_state_target=_target(jax.eval_shape(optimizer.init, template)))
        params, opt_state = restored["params"]["policy"], restored["opt_state"]
        ref_params = ref_params if c.init_from else restored["params"]["reference"]
        start, start_pass = restored["step"], restored["data_state"]["start_pass_at_1"]
        _keep_rows_up_to(metrics_path, start)
        print(f"resumed from {manager.directory} at step {start}")
    else:
        _keep_rows_up_to(metrics_path, -1)  # rows of an earlier attempt that never checkpointed
        cfg, params, tokenizer = initial_policy(cfg, c)
        if not c.init_from and c.sft_steps:
            params = sft(params, cfg, c, held_out)
        # Committed to the device as restored arrays are, so a resume in this process reuses the compiled steps.
        params = jax.device_put(params, _device())
        ref_params, opt_state, start = params, jax.device_put(optimizer.init(params), _device()), 0
        start_pass = pass_at_1(params, cfg, c, eval_tasks, tokenizer)
        metrics.append_jsonl(metrics_path, {"step": 0, "pass_at_1": start_pass, "wall_s": time.perf_counter() - wall0})
        manager.save(0, params=_saved_params(c, params, ref_params), opt_state=opt_state,
                     data_state={"start_pass_at_1": start_pass}, force=True)
    print(f"held-out pass@1 at the start of GRPO: {start_pass:.3f}")

    events = metrics.EventWriter(os.path.join(workdir, "tensorboard"))
    preempted = []
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    bar = tqdm.tqdm(total=c.steps, initial=start, disable=not progress, dynamic_ncols=True)
    history, step = [], start
    try:
        while step < c.steps and not preempted:
            step += 1
            params, opt_state, row = grpo_iteration(params, opt_state, ref_params, cfg, c, step, held_out,
                                                      tokenizer)
            if step % c.eval_every == 0 or step == c.steps:
                row["pass_at_1"] = pass_at_1(params, cfg, c, eval_tasks, tokenizer)
            row["wall_s"] = time.perf_counter() - wall0
            history.append(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.2g}",
                            **({"pass@1": f"{row['pass_at_1']:.3f}"} if "pass_at_1" in row else {}))
            if step % c.log_every == 0 or "pass_at_1" in row:
                metrics.append_jsonl(metrics_path, row)
                events.scalars(step, {k: v for k, v in row.items() if k != "step"})
            if step % c.checkpoint_every == 0 or step == c.steps or preempted:
                manager.save(step, params=_saved_params(c, params, ref_params), opt_state=opt_state,
                             data_state={"start_pass_at_1": start_pass}, force=True)
        if preempted:
            print(f"SIGTERM: saved step {step}; exiting")
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        manager.close()
        events.close()
    with open(metrics_path) as f:
        evals = [r["pass_at_1"] for r in map(json.loads, f) if "pass_at_1" in r]
    return {"start_step": start, "step": step, "start_pass_at_1": start_pass, "pass_at_1": evals[-1],
            "history": history, "params": params, "wall_s": time.perf_counter() - wall0}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    summary = run(_CONFIG.value, _WORKDIR.value)
    print(f"held-out pass@1 {summary['start_pass_at_1']:.3f} -> {summary['pass_at_1']:.3f}; "
          f"GRPO steps {summary['start_step']} -> {summary['step']} in {summary['wall_s']:.0f} s")


if __name__ == "__main__":
    # Flags exist only when this runs as a binary: tests import its functions next to
    # other binaries that also define --config / --workdir.
    _CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/rl_math.py", "RL config file")
    _WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and tensorboard/ go here",
                                   required=True)
    app.run(main)
