"""Hardware profiles: what one device of a cluster can do, as a frozen dataclass.

The planner (:mod:`meshpar.planner`) turns FLOPs and bytes into seconds with a
:class:`HardwareProfile`: memory per device, peak FLOP/s per dtype, HBM bandwidth, collective
bandwidth and latency inside a node and between nodes, devices per node, and how much of the
hideable communication a device overlaps with compute. The named profiles (``a100-80g``,
``h100-sxm``, ``tpu-v5e``, ``tpu-v5p``) are TOML files shipped in ``meshpar/planner/profiles/``, each
with the published figures and their source in its comments; ``FILE.toml`` reads your own in the
same format. ``cpu`` is measured once on the machine at hand (:func:`calibrate_cpu`) and cached.

Bandwidths are per device and per direction (what a ring collective's step moves), in bytes/s.

Memory-bound work: a profile may give ``matmul_gb_s``, the rate at which a matmul streams its
operands and result (packing and unpacking around the kernel). With it the planner times the
compiled program's matmuls as ``FLOPs / peak + bytes / matmul_bandwidth`` and the work outside
them (layer norms, softmax, the optimizer update, copies) as ``bytes / hbm_bandwidth``
(:mod:`meshpar.planner.cost`). Only the calibrated ``cpu`` profile has it: on XLA:CPU small
per-device matmuls run far below the peak and the elementwise work is a large share of a step;
the accelerator profiles (published figures, no such measurement) keep FLOPs over the peak.
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
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from meshpar.backend.bf16 import BF16Dots, bf16_dots
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
        matmul_bandwidth: bytes/s at which a matmul moves its operands and result, or ``None``
            (TOML ``matmul_gb_s``, optional): when set, compute is timed by the memory-bound
            model (:meth:`compute_seconds`).

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
    matmul_bandwidth: float | None = None

    @property
    def bf16_dots(self) -> BF16Dots:
        """How this hardware computes bf16 matmuls, so how the planner traces its programs:
        the host's own form on the calibrated CPU profile (:attr:`shared_cores`: this machine's
        emulated devices), bf16 dots on a GPU's or TPU's (they have bf16 units).

        Example:
            >>> load_profile("h100-sxm").bf16_dots
            <BF16Dots.NATIVE: 'native'>
        """
        return bf16_dots() if self.shared_cores else BF16Dots.NATIVE

    def link(self, span: int) -> tuple[float, float]:
        """``(bandwidth, latency)`` of a collective over a group spanning ``span`` consecutive
        devices: intra-node when it fits in a node."""
        if span <= self.devices_per_node:
            return self.intra_bandwidth, self.intra_latency
        return self.inter_bandwidth, self.inter_latency

    def peak(self, precision: str) -> float:
        """Peak FLOP/s of the compute dtype of a ``precision`` (``"fp32"`` or ``"bf16"``)."""
        return self.peak_flops[precision]

    def compute_seconds(self, flops: float, precision: str, *, matmul_bytes: float = 0.0,
                        memory_bytes: float = 0.0) -> float:
        """Seconds of one device's computation: ``flops`` of matmuls at the peak; on a profile
        with :attr:`matmul_bandwidth`, plus the matmuls' operand and result ``matmul_bytes`` at
        that rate and the ``memory_bytes`` moved outside matmuls at :attr:`hbm_bandwidth`.

        The matmul part is a roofline summed rather than maxed (XLA:CPU packs the operands, then
        runs the kernel): one matmul's efficiency is ``1 / (1 + peak x bytes / (flops x
        matmul_bandwidth))``, so a ``(1024 x 32) @ (32 x 512)`` runs at a fraction of a
        ``512^3``'s rate. Without :attr:`matmul_bandwidth` the bytes are ignored.

        Example:
            >>> cpu = load_profile("cpu")
            >>> big = cpu.compute_seconds(2 * 512**3, "fp32", matmul_bytes=4 * 3 * 512**2)
            >>> skinny = cpu.compute_seconds(2 * 512**3, "fp32", matmul_bytes=4 * 64 * (2 * 32 * 512 + 512**2))
            >>> skinny > big
            True
        """
        seconds = flops / self.peak(precision)
        if self.matmul_bandwidth:
            seconds += matmul_bytes / self.matmul_bandwidth + memory_bytes / self.hbm_bandwidth
        return seconds

    def to_toml(self) -> str:
        """The profile in :func:`parse_profile`'s format."""
        return "\n".join([
            f"name = {self.name!r}", f"source = {self.source!r}",
            f"devices_per_node = {self.devices_per_node}",
            f"memory_gib = {self.memory_bytes / GIB!r}", f"hbm_gb_s = {self.hbm_bandwidth / 1e9!r}",
            f"overlap = {self.overlap!r}",
            f"shared_cores = {'true' if self.shared_cores else 'false'}",
            *([f"matmul_gb_s = {self.matmul_bandwidth / 1e9!r}"] if self.matmul_bandwidth else []),
            "", "[peak_tflops]",
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
        >>> text = '''
        ... name = "my-gpu"
        ... source = "the vendor's datasheet"
        ... devices_per_node = 4
        ... memory_gib = 48.0
        ... hbm_gb_s = 960.0
        ... overlap = 1.0
        ... [peak_tflops]
        ... fp32 = 90.0
        ... bf16 = 180.0
        ... [intra_node]
        ... bandwidth_gb_s = 32.0
        ... latency_us = 8.0
        ... [inter_node]
        ... bandwidth_gb_s = 12.5
        ... latency_us = 20.0
        ... '''
        >>> profile = parse_profile(text, where="my.toml")
        >>> profile.devices_per_node, profile.memory_bytes / 2**30, profile.peak_flops["bf16"]
        (4, 48.0, 180000000000000.0)
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(f"{where}: not valid TOML ({err})") from None
    known = {"name", "source", "devices_per_node", "memory_gib", "hbm_gb_s", "overlap",
             "shared_cores", "matmul_gb_s", "peak_tflops", "intra_node", "inter_node"}
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
        matmul_bandwidth=(_number(data, "matmul_gb_s", where) * 1e9
                          if "matmul_gb_s" in data else None),
    )


def cache_dir() -> pathlib.Path:
    """Where the calibrated ``cpu`` profile is cached: ``$MESHPAR_CACHE_DIR`` or
    ``~/.cache/meshpar``."""
    return pathlib.Path(os.environ.get("MESHPAR_CACHE_DIR",
                                       pathlib.Path.home() / ".cache" / "meshpar"))


def load_profile(name: str | os.PathLike, /, *, recalibrate: bool = False) -> HardwareProfile:
    """A hardware profile by name (:data:`NAMES`) or from a ``.toml`` file.

    ``"cpu"`` calibrates the emulated devices of this process once (:func:`calibrate_cpu`) and
    caches the result in ``cache_dir()/hardware/cpu-<devices>-<dots>-v3.toml`` (``<dots>``: how
    bf16 matmuls run, :func:`meshpar.backend.bf16.bf16_dots`); ``recalibrate=True`` measures again.

    Raises:
        ProfileError: an unknown name (the message lists the valid ones), a missing file or a
            malformed profile.

    Example:
        >>> load_profile("tpu-v5p").memory_bytes / 2**30
        95.0
    """
    text = str(name)
    if text == "cpu":
        # The file name carries the cache format: an older cache (v2: without the matmul and
        # memory bandwidths and the in-program collective costs) is measured again.
        # Keyed by the bf16 dot form too: the bf16 peak is timed in the form the GPT will use.
        name = f"cpu-{jax.device_count()}-{bf16_dots().value}-v3.toml"
        path = cache_dir() / "hardware" / name
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


def _best_times(fns: list, reps: int) -> list[float]:
    """The best time of each of ``fns`` over ``reps`` round-robin rounds."""
    for fn in fns:
        jax.block_until_ready(fn())
    best = [math.inf] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def _fit_matmul(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    """``(1/peak, 1/bandwidth)`` minimising the relative error of ``flops/peak +
    bytes/bandwidth`` over ``(flops, bytes, seconds)`` rows, the first a square matmul.

    Should noise make a coefficient non-positive, the square matmul is taken as compute-bound
    (its rate is the peak) and the bandwidth is fitted to what that leaves of the others.
    """
    a = np.array([[f / t, b / t] for f, b, t in rows])
    x, *_ = np.linalg.lstsq(a, np.ones(len(rows)), rcond=None)
    if x[0] > 0 and x[1] > 0:
        return float(x[0]), float(x[1])
    inv_peak = rows[0][2] / rows[0][0]
    left = np.array([max(t - f * inv_peak, 0.0) / t for f, _, t in rows[1:]])
    per_byte = a[1:, 1]
    inv_bandwidth = float(np.sum(left * per_byte) / np.sum(per_byte**2))
    return inv_peak, max(inv_bandwidth, 1e-15)


def calibrate_cpu(*, matmul: int = 512, collective_mib: float = 8.0, stream_mib: float = 16.0,
                  chain: int = 16, reps: int = 7) -> HardwareProfile:
    """Measure this process's devices: the matmul roofline, memory and collective bandwidth,
    the cost of one collective.

    The emulated CPU devices share the host's cores, so every figure is per device *when every
    device works at once* (each program below runs on all of them, split over a leading axis):

    * **matmuls**: a ``matmul^3`` one and five narrow ones (one or two dimensions of
      ``matmul/16`` to ``matmul/4``, as per-device shards of a model are), fp32, fitted as ``flops / peak + bytes / matmul_bandwidth``
      (operand and result bytes; :meth:`HardwareProfile.compute_seconds`); the bf16 peak (bf16
      operands, fp32 result, the form the built-in GPT's dots take: XLA:CPU upcasts a bf16 ->
      bf16 dot whole; where the GPT takes fp32 dots of the widened operands, the default on a CPU
      without bf16 dot instructions, that form: :mod:`meshpar.backend.bf16`): the fp32 peak
      times the ratio of the two ``matmul^3`` times.
    * **memory bandwidth** (``hbm_gb_s``): ``x * a + b`` over ``stream_mib`` MiB per device
      (read and written).
    * **collectives**, timed inside one program (a chain of ``chain`` dependent all-reduces
      against one, so the dispatch of the program is not counted): a 4-byte all-reduce's time
      is the per-collective latency (on emulated devices a rendezvous of all the device
      threads), a ``collective_mib`` MiB one the ring bandwidth.

    Memory per device is the host's memory over the device count. The figures move with the
    machine's load: recalibrate (``load_profile("cpu", recalibrate=True)``) on a quiet machine.

    Example::

        # A few seconds: it times matmuls and collectives on this machine's devices.
        profile = calibrate_cpu()
        profile.peak_flops["fp32"]   # > 0: the measured fp32 FLOP/s
    """
    devices = jax.devices()
    n = len(devices)
    mesh = jax.make_mesh((n,), ("all",), axis_types=(AxisType.Auto,), devices=devices)
    split = NamedSharding(mesh, PartitionSpec("all"))

    widen = bf16_dots() is BF16Dots.FP32

    def matmul_case(m: int, k: int, c: int, dtype):
        a = jax.jit(lambda: jax.random.normal(jax.random.key(0), (n, m, k), dtype),
                    out_shardings=split)()
        b = jax.jit(lambda: jax.random.normal(jax.random.key(1), (n, k, c), dtype),
                    out_shardings=split)()
        def dot(x, y):
            if widen and x.dtype == jnp.bfloat16:
                x, y = x.astype(jnp.float32), y.astype(jnp.float32)
            return jnp.einsum("dij,djk->dik", x, y, preferred_element_type=jnp.float32)

        f = jax.jit(dot, out_shardings=split)
        # Bytes as hlo.Dot.bytes counts them: at the result's (fp32) item size.
        return 2.0 * m * k * c, 4.0 * (m * k + k * c + m * c), lambda: f(a, b)

    s = matmul
    narrow = [(2 * s, max(s // 16, 1), s), (s, max(s // 8, 1), s), (max(s // 8, 1), s, s),
              (s, s, max(s // 8, 1)), (max(s // 4, 1), s, max(s // 4, 1))]
    cases = [matmul_case(*shape, jnp.float32) for shape in [(s, s, s), *narrow]]
    cases.append(matmul_case(s, s, s, jnp.bfloat16))
    # Round robin, the best of each: a change of the machine's load during the calibration
    # touches every shape alike instead of skewing the fit.
    best = _best_times([fn for _, _, fn in cases], reps)
    rows = [(f, b, t) for (f, b, _), t in zip(cases, best)]
    inv_peak, inv_bandwidth = _fit_matmul(rows[:-1])
    # bf16: the fp32 peak scaled by the two matmul^3 times (same shape, same bytes as counted):
    # steadier than subtracting the bytes term from one time.
    peaks = {"fp32": 1 / inv_peak, "bf16": rows[0][2] / rows[-1][2] / inv_peak}

    stream = int(stream_mib * 2**20 / 4)
    x = jax.jit(lambda: jnp.ones((n, stream), jnp.float32), out_shardings=split)()
    axpb = jax.jit(lambda v: v * 1.5 + 0.5, out_shardings=split)
    hbm = 2 * stream * 4 / _best_time(lambda: axpb(x), reps)

    def all_reduces(size: int, count: int):
        v = jax.jit(lambda: jnp.ones((n, size), jnp.float32), out_shardings=split)()

        def body(u):
            for _ in range(count):  # each depends on the last: none can merge
                u = jax.lax.psum(u, "all") * (1.0 / n)
            return u

        g = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=PartitionSpec("all"),
                                  out_specs=PartitionSpec("all")))
        return lambda: g(v)

    elems = int(collective_mib * 2**20 / 4)
    latency, bandwidth = 1e-6, 1e12
    if n > 1:
        big = 4
        one, many, big_one, big_many = _best_times(
            [all_reduces(1, 1), all_reduces(1, chain + 1), all_reduces(elems, 1),
             all_reduces(elems, big + 1)], reps)
        latency = max(many - one, 1e-9) / chain
        # The scaling multiply between the reductions stays in: subtracting its estimate
        # (bytes over the memory bandwidth) made the difference of two noisy times noisier.
        seconds = max((big_many - big_one) / big - latency, 1e-9)
        bandwidth = 2 * (n - 1) / n * elems * 4 / seconds
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host = 8 * GIB
    return HardwareProfile(
        name="cpu", source=f"calibrated on this host ({os.cpu_count()} cores, {n} emulated "
        f"devices) at {time.strftime('%Y-%m-%d %H:%M:%S')}",
        memory_bytes=float(host / n), peak_flops=peaks, hbm_bandwidth=float(hbm),
        intra_bandwidth=float(bandwidth), intra_latency=float(latency),
        inter_bandwidth=float(bandwidth), inter_latency=float(latency),
        devices_per_node=n, overlap=0.0, shared_cores=True,
        matmul_bandwidth=float(1 / inv_bandwidth),
    )
