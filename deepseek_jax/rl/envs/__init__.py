"""Offline RL environments (spec §8): generated exact-answer maths and code tasks with tests."""
