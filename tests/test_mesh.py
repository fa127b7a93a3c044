"""Meshes from named sizes, and device emulation."""

import subprocess
import sys
import textwrap

import pytest
from jax.sharding import AxisType

import meshpar as mp


def test_suite_runs_on_eight_devices(devices):
    assert len(devices) == 8


def test_make_mesh_keywords_mapping_and_string_agree():
    a = mp.make_mesh(data=2, fsdp=2, tensor=2)
    b = mp.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    c = mp.make_mesh("data=2,fsdp=2,tensor=2")
    for mesh in (a, b, c):
        assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
        # meshpar chooses Auto axes deliberately (see meshpar/mesh.py).
        assert mesh.axis_types == (AxisType.Auto,) * 3


def test_minus_one_takes_the_rest_and_user_axes_are_allowed():
    mesh = mp.make_mesh(data=-1, expert=2)
    assert dict(mesh.shape) == {"data": 4, "expert": 2}


def test_parse_mesh():
    assert mp.parse_mesh(" data=2, tensor=-1 ") == {"data": 2, "tensor": -1}


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(data=3), r"3 devices .* but 8 devices are available"),
        (dict(data=2, fsdp=2), r"4 devices .* 8 devices"),
        (dict(data=3, fsdp=-1), r"do(es)? not divide the 8 devices"),
        (dict(data=-1, fsdp=-1), r"at most one axis may have size -1"),
        (dict(data=0, fsdp=8), r"axis 'data' has size 0"),
        ({}, r"at least one axis"),
    ],
)
def test_mesh_errors(kwargs, pattern):
    with pytest.raises(mp.MeshError, match=pattern):
        mp.make_mesh(**kwargs)


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("data=2,data=4", r"axis 'data' is given twice"),
        ("data:2", r"not of the form axis=size"),
        ("data=two", r"size 'two' of axis 'data' is not an integer"),
        ("1bad=8", r"not a valid identifier"),
        ("", r"empty"),
    ],
)
def test_parse_mesh_errors(text, pattern):
    with pytest.raises(mp.MeshError, match=pattern):
        mp.parse_mesh(text)


def test_repeated_axis_between_mapping_and_keywords():
    with pytest.raises(mp.MeshError, match=r"'data' is given twice"):
        mp.make_mesh({"data": 4}, data=2)


def test_emulate_devices_same_count_is_fine_after_start():
    mp.emulate_devices(8)  # backend is up with 8: nothing to do, nothing ignored


def test_emulate_devices_too_late_raises():
    with pytest.raises(mp.DeviceEmulationError, match=r"after JAX started its backend with 8"):
        mp.emulate_devices(4)


def test_emulate_devices_bad_count():
    with pytest.raises(mp.DeviceEmulationError, match=r"count must be an int >= 1"):
        mp.emulate_devices(0)


def test_emulate_devices_before_start_in_fresh_process():
    code = textwrap.dedent(
        """
        import jax, meshpar as mp
        mp.emulate_devices(4)
        print(len(jax.devices()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4"
