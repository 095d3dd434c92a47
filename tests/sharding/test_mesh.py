"""Mesh specs: sizes, the -1 fill, and a clear error for every bad spec."""

import pytest

from sharding.mesh import AXES, initialize, make_mesh, parse_mesh_spec


def test_parse_fills_and_orders():
    assert parse_mesh_spec("expert=4,data=-1", 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert parse_mesh_spec("data=2, fsdp=1, tensor=1, expert=4", 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert parse_mesh_spec("", 1) == dict.fromkeys(AXES, 1)


@pytest.mark.parametrize("spec, message", [
    ("data=3", "uses 3 devices but 8 are available"),
    ("data=-1,fsdp=-1", "only one axis may be -1"),
    ("data=3,fsdp=-1", "8 devices do not divide"),
    ("pipeline=2", "is not 'axis=size'"),
    ("data", "is not 'axis=size'"),
    ("data=two", "not an integer"),
    ("data=0", "must be positive or -1"),
    ("data=2,data=4", "given twice"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh_spec(spec, 8)


def test_make_mesh_has_every_axis():
    mesh = make_mesh("fsdp=2,expert=-1")
    assert mesh.axis_names == AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}


def test_initialize_needs_all_three(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    initialize()  # single process: nothing to do
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="needs a coordinator address"):
        initialize()
    with pytest.raises(ValueError, match="outside"):
        initialize("localhost:1234", 2, 5)
