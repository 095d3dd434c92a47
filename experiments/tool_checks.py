"""Start-up checks shared by the offline compile tools (`triton_static`, `tpu_aot`)."""

import importlib


def check_kernels_and_package(tool: str, kernels: list[str], names: tuple[str, ...], package: str, install: str):
    """Exits with a message naming the problem if `kernels` (the --kernels flag) is not a subset of `names` or the
    compiler package the tool needs is not installed."""
    if not set(kernels) <= set(names):
        raise SystemExit(f"--kernels: expected a subset of {names}, got {kernels}")
    try:
        importlib.import_module(package)
    except ImportError:
        raise SystemExit(f"experiments.{tool} needs the {package} package: {install}") from None
