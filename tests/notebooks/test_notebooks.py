"""The Colab notebooks (colab/*.ipynb) run top to bottom, headless, and are committed without outputs.

Each notebook runs in a fresh python3 kernel (nbclient): a cell that raises, or runs past
CELL_TIMEOUT_S, fails the test. The kernel inherits this process's environment, so what JAX
sees is set here explicitly: CPU only, one device (the root conftest gives this process 8
simulated devices; tpu_pod.ipynb asks for its own 8), the same fast-compile XLA flags and
persistent compilation cache as the tests, the worktree first on the import path, and temporary
files under the test's own directory. DEEPSEEK_JAX_NOTEBOOK_OUT=DIR keeps the executed notebooks.
"""

import os
import pathlib
import re
import sys

import jax
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
EXPECTED = {"quickstart", "dsa_explained", "finetune_from_hf", "grpo", "tpu_pod"}
CELL_TIMEOUT_S = 300


def test_every_notebook_is_here():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and "pip" in code[0].source, "the first code cell installs the package"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, f"code cell {i} has outputs: strip them"


def kernel_env(tmp_path) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
    env.update(
        XLA_FLAGS=" ".join(flags),
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        PATH=os.pathsep.join((os.path.dirname(sys.executable), env.get("PATH", ""))),
        TMPDIR=str(tmp_path),
    )
    return env


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute(env=kernel_env(tmp_path))  # raises CellExecutionError naming the failing cell
    finally:
        if os.environ.get("DEEPSEEK_JAX_NOTEBOOK_OUT"):  # keep the executed copy, plots included, to look at
            out = pathlib.Path(os.environ["DEEPSEEK_JAX_NOTEBOOK_OUT"])
            out.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out / path.name)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
