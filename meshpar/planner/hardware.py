"""Hardware profiles: what one device of a cluster can do, as a frozen dataclass.

The planner (:mod:`meshpar.planner`) turns FLOPs and bytes into seconds with a
:class:`HardwareProfile`: memory per device, peak FLOP/s per dtype, HBM bandwidth, collective
bandwidth and latency inside a node and between nodes, devices per node, and how much of the
hideable communication a device overlaps with compute. The named profiles (``a100-80g``,
``h100-sxm``, ``tpu-v5e``, ``tpu-v5p``) are TOML files shipped in ``meshpar/planner/profiles/``, each
with the published figures and their source in its comments; ``FILE.toml`` reads your own in the
same format. ``cpu`` is measured once on the machine at hand (:func:`calibrate_cpu`) and cached.

Bandwidths are per device and per direction (what a ring collective's step moves), in bytes/s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
import tomllib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from meshpar.errors import ProfileError

PROFILE_DIR = pathlib.Path(__file__).with_name("profiles")
#: The names :func:`load_profile` knows besides a ``.toml`` path.
NAMES = ("cpu", *sorted(p.stem for p in PROFILE_DIR.glob("*.toml")))
GIB = 2**30


@dataclasses.dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    """One device of a cluster and the links between devices.

    Attributes:
        name: the profile's name.
        source: where the figures come from.
        memory_bytes: memory per device.
        peak_flops: peak FLOP/s per compute dtype (``{"fp32": ..., "bf16": ...}``).
        hbm_bandwidth: device memory bandwidth, bytes/s.
        intra_bandwidth, inter_bandwidth: collective bandwidth per device and direction inside a
            node and between nodes, bytes/s.
        intra_latency, inter_latency: per-collective latency, seconds.
        devices_per_node: devices joined by the intra-node links.
        overlap: fraction in ``[0, 1]`` of the hideable communication that runs under compute
            (see :mod:`meshpar.planner.cost`); 0 on emulated CPU devices, which share the cores.
        shared_cores: the devices share one pool of cores (emulated CPU devices): a pipeline
            stage idling in the bubble lends its cores to the others, so the bubble costs no
            time of its own (TOML ``shared_cores``, default ``false``).

    Example:
        >>> load_profile("h100-sxm").peak_flops["bf16"]
        989000000000000.0
    """

    name: str
    source: str
    memory_bytes: float
    peak_flops: dict[str, float]
    hbm_bandwidth: float
    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    devices_per_node: int
    overlap: float
    shared_cores: bool = False

    def link(self, span: int) -> tuple[float, float]:
        """``(bandwidth, latency)`` of a collective over a group spanning ``span`` consecutive
        devices: intra-node when it fits in a node."""
        if span <= self.devices_per_node:
            return self.intra_bandwidth, self.intra_latency
        return self.inter_bandwidth, self.inter_latency

    def peak(self, precision: str) -> float:
        """Peak FLOP/s of the compute dtype of a ``precision`` (``"fp32"`` or ``"bf16"``)."""
        return self.peak_flops[precision]

    def to_toml(self) -> str:
        """The profile in :func:`parse_profile`'s format."""
        return "\n".join([
            f"name = {self.name!r}", f"source = {self.source!r}",
            f"devices_per_node = {self.devices_per_node}",
            f"memory_gib = {self.memory_bytes / GIB!r}", f"hbm_gb_s = {self.hbm_bandwidth / 1e9!r}",
            f"overlap = {self.overlap!r}",
            f"shared_cores = {'true' if self.shared_cores else 'false'}", "", "[peak_tflops]",
            *(f"{k} = {v / 1e12!r}" for k, v in self.peak_flops.items()), "", "[intra_node]",
            f"bandwidth_gb_s = {self.intra_bandwidth / 1e9!r}",
            f"latency_us = {self.intra_latency * 1e6!r}", "", "[inter_node]",
            f"bandwidth_gb_s = {self.inter_bandwidth / 1e9!r}",
            f"latency_us = {self.inter_latency * 1e6!r}", "",
        ])


def _number(table: dict, key: str, where: str, *, integer: bool = False,
            upper: float | None = None) -> float:
    if key not in table:
        raise ProfileError(f"{where}: missing key {key!r}")
    value = table[key]
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) \
        and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and upper is not None:
        ok = value <= upper
    if key == "overlap":  # a fraction, 0 allowed
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok:
        want = ("a number in [0, 1]" if key == "overlap" else
                "a positive integer" if integer else "a positive number")
        raise ProfileError(f"{where}: key {key!r} = {value!r} must be {want}")
    return int(value) if integer else float(value)


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: key {key!r} = {value!r} must be a table ([{key}])")
    return value


def parse_profile(text: str, /, *, where: str = "<profile>") -> HardwareProfile:
    """Parse a profile's TOML text (see the files in ``meshpar/planner/profiles/``).

    Raises:
        ProfileError: invalid TOML, or a missing or bad key (the message names the key and the
            value).

    Example:
        >>> parse_profile(pathlib.Path("my.toml").read_text(), where="my.toml").devices_per_node
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{where}: not valid TOML ({err})") from None
    known = {"name", "source", "devices_per_node", "memory_gib", "hbm_gb_s", "overlap",
             "shared_cores", "peak_tflops", "intra_node", "inter_node"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {unknown}; the keys are {sorted(known)}")
    for key in ("name", "source"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ProfileError(f"{where}: key {key!r} = {data.get(key)!r} must be a non-empty string")
    peaks = _table(data, "peak_tflops", where)
    for dtype in ("fp32", "bf16"):
        _number(peaks, dtype, f"{where} [peak_tflops]")
    intra, inter = _table(data, "intra_node", where), _table(data, "inter_node", where)
    shared = data.get("shared_cores", False)
    if not isinstance(shared, bool):
        raise ProfileError(f"{where}: key 'shared_cores' = {shared!r} must be true or false")
    return HardwareProfile(
        name=data["name"], source=data["source"],
        memory_bytes=_number(data, "memory_gib", where) * GIB,
        peak_flops={k: float(v) * 1e12 for k, v in peaks.items()},
        hbm_bandwidth=_number(data, "hbm_gb_s", where) * 1e9,
        intra_bandwidth=_number(intra, "bandwidth_gb_s", f"{where} [intra_node]") * 1e9,
        intra_latency=_number(intra, "latency_us", f"{where} [intra_node]") * 1e-6,
        inter_bandwidth=_number(inter, "bandwidth_gb_s", f"{where} [inter_node]") * 1e9,
        inter_latency=_number(inter, "latency_us", f"{where} [inter_node]") * 1e-6,
        devices_per_node=_number(data, "devices_per_node", where, integer=True),
        overlap=_number(data, "overlap", where), shared_cores=shared,
    )


def cache_dir() -> pathlib.Path:
    """Where the calibrated ``cpu`` profile is cached: ``$MESHPAR_CACHE_DIR`` or
    ``~/.cache/meshpar``."""
    return pathlib.Path(os.environ.get("MESHPAR_CACHE_DIR",
                                       pathlib.Path.home() / ".cache" / "meshpar"))


def load_profile(name: str | os.PathLike, /, *, recalibrate: bool = False) -> HardwareProfile:
    """A hardware profile by name (:data:`NAMES`) or from a ``.toml`` file.

    ``"cpu"`` calibrates the emulated devices of this process once (:func:`calibrate_cpu`) and
    caches the result in ``cache_dir()/hardware/cpu-<devices>-v2.toml``; ``recalibrate=True``
    measures again.

    Raises:
        ProfileError: an unknown name (the message lists the valid ones), a missing file or a
            malformed profile.

    Example:
        >>> load_profile("tpu-v5p").memory_bytes / 2**30
        95.0
    """
    text = str(name)
    if text == "cpu":
        # The file name carries the cache format: an older cache (without shared_cores) is measured again.
        path = cache_dir() / "hardware" / f"cpu-{jax.device_count()}-v2.toml"
        if path.exists() and not recalibrate:
            return parse_profile(path.read_text(), where=str(path))
        text = calibrate_cpu().to_toml()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        # Read back as the cache will be: the first and later calls give the same figures.
        return parse_profile(text, where=str(path))
    if text in NAMES:
        path = PROFILE_DIR / f"{text}.toml"
    elif text.endswith(".toml"):
        path = pathlib.Path(text)
        if not path.is_file():
            raise ProfileError(f"hardware profile file {text!r} does not exist")
    else:
        raise ProfileError(f"unknown hardware {text!r}; valid: {', '.join(NAMES)} or a FILE.toml")
    return parse_profile(path.read_text(), where=str(path))


def _best_time(fn: Any, reps: int) -> float:
    jax.block_until_ready(fn())
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def calibrate_cpu(*, matmul: int = 512, collective_mib: float = 8.0, reps: int = 5) -> HardwareProfile:
    """Measure this process's devices: peak matmul FLOP/s and collective bandwidth.

    The emulated CPU devices share the host's cores, so the figures are per device *when every
    device works at once*: a batched matmul over all devices (the rate of each is the total over
    the device count; fp32, and bf16 operands with fp32 results as the GPT's dots take them), an
    all-reduce of ``collective_mib`` MiB over all of them (ring bytes per device over its time)
    and of 4 bytes (latency). Memory per device is the host's memory over the device count. The
    figures move with the machine's load: recalibrate (``load_profile("cpu",
    recalibrate=True)``) on a quiet machine.

    Example:
        >>> calibrate_cpu().peak_flops["fp32"] > 0
        True
    """
    devices = jax.devices()
    n = len(devices)
    mesh = jax.make_mesh((n,), ("all",), axis_types=(AxisType.Auto,), devices=devices)
    split = NamedSharding(mesh, PartitionSpec("all"))
    peaks = {}
    for precision, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        a = jax.jit(lambda: jax.random.normal(jax.random.key(0), (n, matmul, matmul), dtype),
                    out_shardings=split)()
        # bf16 operands with an fp32 result: the form the built-in GPT's dots take (XLA:CPU
        # upcasts a bf16 -> bf16 dot whole; see benchmarks/README.md, issue 13).
        f = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x, x,
                                         preferred_element_type=jnp.float32), out_shardings=split)
        peaks[precision] = 2.0 * matmul**3 / _best_time(lambda: f(a), reps)
    elems = int(collective_mib * 2**20 / 4)

    def all_reduce(size):
        x = jax.jit(lambda: jnp.ones((n, size), jnp.float32), out_shardings=split)()
        g = jax.jit(lambda x: jnp.broadcast_to(x.sum(0, keepdims=True), x.shape),
                    out_shardings=split)
        return _best_time(lambda: g(x), reps)

    latency = all_reduce(1)
    seconds = max(all_reduce(elems) - latency, 1e-9)
    bandwidth = 2 * (n - 1) / n * elems * 4 / seconds if n > 1 else 1e12
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host = 8 * GIB
    return HardwareProfile(
        name="cpu", source=f"calibrated on this host ({os.cpu_count()} cores, {n} emulated "
        f"devices) at {time.strftime('%Y-%m-%d %H:%M:%S')}",
        memory_bytes=float(host / n), peak_flops=peaks, hbm_bandwidth=1e10,
        intra_bandwidth=float(bandwidth), intra_latency=float(latency),
        inter_bandwidth=float(bandwidth), inter_latency=float(latency),
        devices_per_node=n, overlap=0.0, shared_cores=True,
    )
