"""Binaries whose functions tests import must coexist in one process: absl refuses a flag name
defined twice (e.g. --config in pretrain, rl and plan_memory), so those define flags only as
`__main__`."""

import importlib


def test_imported_binaries_coexist():
    for name in ("convert", "sample", "plan_memory", "pretrain", "rl", "fuzz_kernels"):
        importlib.import_module(f"experiments.{name}")
