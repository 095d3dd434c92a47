"""experiments/fuzz_kernels: its selection check accepts exactly the reference's keys up to score ties, one
random case of every kernel and lowering passes (interpreted here, the Triton ones also lowered for CUDA), and a
failing case keeps the parameters it drew."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import fuzz_kernels

ROOT = pathlib.Path(__file__).parents[2]
SCORES = np.array([[[0.5, 0.9, 0.9, 0.1, 0.7]]])  # [B=1, T=1, S=5]: keys 1 and 2 tie
LIMITS = np.array([[4]])                          # key 4 is past the query's limit


@pytest.mark.parametrize("got, message", [
    ([1, 0, -1], None),        # the reference's keys in another order
    ([2, 0, -1], None),        # a tied key for another
    ([3, 0, -1], "instead of"),
    ([1, -1, 0], "-1 before"),
    ([1, 1, -1], "twice"),
    ([1, 4, -1], "past the limit"),
    ([1, -1, -1], "1 keys, the reference 2"),
])
def test_assert_same_keys(got, message):
    want = np.array([[[1, 0, -1]]])
    check = lambda: fuzz_kernels.assert_same_keys(np.array([[got]]), want, SCORES, LIMITS)
    if message is None:
        check()
    else:
        with pytest.raises(AssertionError, match=message):
            check()


def test_a_random_case_of_every_kernel_and_lowering():
    results = fuzz_kernels.run(fuzz_kernels.KERNELS, fuzz_kernels.IMPLS, cases=1, seed=0)
    assert len(results) == len(fuzz_kernels.KERNELS) * len(fuzz_kernels.IMPLS)
    assert all(r["status"] == "ok" for r in results), [r for r in results if r["status"] != "ok"]


def test_a_failing_case_keeps_its_parameters_and_runs_at_highest_precision(monkeypatch):
    def case(rng, impl, params):
        params.update(size=3)
        assert jax.config.jax_default_matmul_precision == "highest", "not at the highest precision"
        raise AssertionError("mismatch")

    monkeypatch.setitem(fuzz_kernels.CASES, "indexer", case)
    [result] = fuzz_kernels.run(["indexer"], ["triton"], cases=1, seed=0)
    assert (result["status"], result["params"], result["error"]) == ("FAIL", {"size": 3}, "mismatch")


def test_command_line(tmp_path):
    out = tmp_path / "fuzz.json"
    flags = ["--fuzz_kernels=indexer_decode", "--fuzz_impls=triton", "--fuzz_cases=2", "--fuzz_seed=3",
             f"--fuzz_out={out}"]
    proc = subprocess.run([sys.executable, "-m", "experiments.fuzz_kernels", *flags], cwd=ROOT, check=False,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "indexer_decode     triton  interpreted      2    2    0     0" in proc.stdout
    result = json.loads(out.read_text())
    assert result["seed"] == 3 and [r["case"] for r in result["results"]] == [0, 1]
