"""Meshes from named sizes, and device emulation."""

import subprocess
import sys
import textwrap

import pytest
from jax.sharding import AxisType

import meshpar as mp
from meshpar.backend.devices import pool_threads


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


_FRESH = textwrap.dedent(
    """
    import collections, os
    import jax, meshpar as mp
    from meshpar.backend import devices
    mp.emulate_devices(4)
    print(len(jax.devices()))
    threads = collections.Counter(
        open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
    print(threads["tf_XLAEigen"])
    print(devices.thread_pool_warning())
    """
)


def _fresh(**env):
    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_emulate_devices_before_start_in_fresh_process():
    # XLA:CPU runs the devices on one pool of threads; emulate_devices sizes it so that every
    # device can wait in two collectives at once (a deadlock seen with 8 devices on 8 threads).
    count, threads, warning = _fresh()
    assert count == "4"
    assert int(threads) == pool_threads(4) >= 8
    assert warning == "None"
    # A PJRT_NPROC of the user's wins, and a pool too small for the devices is reported.
    count, threads, warning = _fresh(PJRT_NPROC="5")
    assert (count, threads) == ("4", "5")
    want = pool_threads(4)
    assert warning == (
        f"XLA:CPU runs these 4 CPU devices on 5 threads; collectives can deadlock with fewer "
        f"than {want} (meshpar.backend.devices). Call meshpar.emulate_devices() before JAX "
        f"starts, or set PJRT_NPROC={want} in the environment")


def test_thread_pool_size_follows_devices_and_cores():
    assert pool_threads(8, cores=2) == 16
    assert pool_threads(8, cores=64) == 64   # never fewer threads than cores
    assert pool_threads(1, cores=2) == 2     # one device: no collectives to wait in
