"""RL post-training (spec §8): the GRPO objective (grpo.py), rollouts, rewards and environments."""
