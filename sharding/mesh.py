"""Device meshes from a spec string, and multi-host start-up.

A spec names mesh axes and their sizes, e.g. "data=2,fsdp=1,tensor=1,expert=4"; one entry may
be -1 and takes the devices the others leave. Axes are laid out in the fixed order of
`AXES` whatever the spec's order, so that "tensor" (the most communication-hungry axis) is the
innermost, fastest-linked one; `jax.make_mesh` maps that order onto the physical topology.
Axes the spec omits get size 1, so rules can always name every axis.

Multi-host: one process per host, each calling `initialize` before touching devices; JAX's
own runtime (`jax.distributed`) is the distributed engine.
"""

import math
import os

import jax

AXES = ("data", "fsdp", "expert", "tensor")


def parse_mesh_spec(spec: str, n_devices: int | None) -> dict[str, int]:
    """'data=2,expert=-1' -> {'data': 2, 'fsdp': 1, 'expert': n_devices // 2, 'tensor': 1}.

    n_devices=None (planning a mesh without its devices) takes the spec's own product; -1 then
    has nothing to fill and is an error."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(f"mesh spec {spec!r}: entry {part!r} is not 'axis=size' with axis in {AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} is not an integer: {value!r}") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be positive or -1, got {sizes[name]}")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {fill}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill and n_devices is None:
        raise ValueError(f"mesh spec {spec!r}: -1 needs a device count; give every axis a size")
    if fill:
        if n_devices % fixed:
            raise ValueError(f"mesh spec {spec!r}: {n_devices} devices do not divide into the fixed axes' {fixed}")
        sizes[fill[0]] = n_devices // fixed
    elif n_devices is not None and fixed != n_devices:
        raise ValueError(f"mesh spec {spec!r} uses {fixed} devices but {n_devices} are available "
                         "(use -1 on one axis to take the rest)")
    return {name: sizes.get(name, 1) for name in AXES}


def make_mesh(spec: str = "data=-1", devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: every device of every process) with all of `AXES`."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                         devices=devices)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Starts JAX's multi-controller runtime when this is a multi-process run.

    Arguments win over the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID). With none of them set, a single process stays single (a laptop, one GPU
    host) unless JAX detects a cluster itself (TPU pod slices, SLURM, Open MPI), which it does
    from the environment those systems set up.
    """
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if address is None and num is None and pid is None:
        if _cluster_detected():
            jax.distributed.initialize()
        return
    if address is None or num is None or pid is None:
        raise ValueError("multi-process start-up needs a coordinator address, the number of processes and this "
                         f"process's id; got address={address!r}, num_processes={num!r}, process_id={pid!r}")
    if not 0 <= pid < num:
        raise ValueError(f"process_id {pid} is outside [0, num_processes={num})")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _cluster_detected() -> bool:
    """A multi-host cluster in which `jax.distributed.initialize()` finds its peers on its own."""
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return any(int(os.environ.get(var, "1")) > 1 for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
