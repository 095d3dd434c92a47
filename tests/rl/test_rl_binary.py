"""experiments/rl.py end to end on a tiny budget: GRPO steps and metrics.jsonl rows with the
contract's fields (spec §8). The SFT warm-up is skipped (one compile fewer); its batch layout
is checked on its own. Evaluation and rollouts use the same batch size, so they share compiles."""

import json

from experiments import rl


def test_rl_runs_and_logs(tmp_path):
    c = rl.get_config()
    c.update(sft_steps=0, steps=2, inner_steps=2, prompts_per_step=2, group_size=2, eval_every=1,
             eval_tasks=4, max_new_tokens=3, kl_coef=0.01, offpolicy_delta=0.5)
    start, end = rl.run(c, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["pass_at_1"] == start and rows[-1]["pass_at_1"] == end
    for r in rows[1:]:
        for key in ("reward_mean", "pass_at_1", "kl", "masked_fraction", "clip_fraction", "entropy", "tokens_per_s"):
            assert key in r
        assert 0 <= r["reward_mean"] <= 1 and 0 <= r["masked_fraction"] <= 1


def test_byte_tokenizer():
    assert rl.decode([rl.BOS] + rl.encode("Q: 1+2 A: 3") + [rl.EOS]) == "Q: 1+2 A: 3"
    tokens, mask = rl._sft_batch([rl.math_env.MathTask("Q: 1+2 A:", "3", 1)])
    # targets (tokens[1:]) under the mask: " 3" then EOS
    assert tokens[0, 1:][mask[0]].tolist() == rl.encode(" 3") + [rl.EOS]


def test_held_out_questions_never_trained_on():
    held_out = frozenset(t.prompt for t in rl._tasks((1, 2), 40, seed=123))
    for seed in range(5):
        assert not any(t.prompt in held_out for t in rl._tasks((1, 2), 32, seed, held_out))
