"""The temporary allocation's true peak in an XLA dump, and the values live there.

XLA's live-range dump marks one program point ``(peak)``, but that is not where the
temporary allocation (``preallocated-temp``, what ``memory_analysis().temp_size_in_bytes``
reports) is fullest. This script joins the buffer assignment (each value's offset and size in
the allocation) to the live ranges (each value's first and last program point), finds the
point where the union of the live ``[offset, offset + size)`` intervals is largest, and lists
the values live there, largest first, with the JAX operation that made them. It is how the
terms of :func:`meshpar.inspect.costs.gpt_step_memory_bytes` were read
(``benchmarks/README.md``, memory formula).

Usage::

    XLA_FLAGS=--xla_dump_to=/tmp/dump python my_step.py
    python benchmarks/xla_peak.py /tmp/dump --module step_fn --min-kib 64

(``--module`` is matched against the dump's file names; meshpar's train step is ``step_fn``.)
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import re
import sys

from meshpar.inspect.hlo import instructions

_VALUE = re.compile(r"value: <\d+ (\S+?)(\{[\d,]*\})?(?: \([^)]*\))? @\d+> "
                    r"\(size=(\d+),offset=(\d+)\): (\S+)")
_RANGE = re.compile(r"\s+(\S+?\{[\d,]*\}):(\d+)-(\d+)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Value:
    """One value of the temporary allocation: its name, shape, place and live range."""

    name: str
    shape: str
    offset: int
    size: int
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Peak:
    """The allocation's size, the program point where its live values fill it most, and those
    values (one per place in the allocation: values that share a place are aliases)."""

    allocation_bytes: int
    point: int
    live_bytes: int
    values: tuple[Value, ...]


def _files(dump: str, module: str) -> tuple[str, str, str]:
    pattern = f"{dump}/*{module}*after_optimizations-buffer-assignment.txt"
    found = sorted(glob.glob(pattern))
    if not found:
        raise SystemExit(f"xla_peak: no buffer assignment matches {pattern!r}; was the program "
                         "compiled with XLA_FLAGS=--xla_dump_to and this --module name?")
    assignment = found[-1]
    stem = assignment.removesuffix("-buffer-assignment.txt")
    return assignment, stem + "-live-range.txt", stem + ".txt"


def read_values(assignment: str, live_range: str) -> tuple[int, list[Value]]:
    """The temporary allocation's size and its values with their live ranges."""
    ranges = {}
    with open(live_range) as f:
        for line in f:
            m = _RANGE.match(line)
            if m:
                ranges[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    text = open(assignment).read()
    blocks = [b for b in re.split(r"\nallocation ", text) if "preallocated-temp" in
              b.split("\n", 1)[0]]
    if not blocks:
        raise SystemExit(f"xla_peak: {assignment} has no preallocated-temp allocation")
    block = max(blocks, key=lambda b: int(re.search(r"size (\d+)", b).group(1)))
    size = int(re.search(r"size (\d+)", block).group(1))
    values = []
    for m in _VALUE.finditer(block):
        name = m.group(1) + (m.group(2) or "{}")
        if name in ranges:
            start, end = ranges[name]
            values.append(Value(name, m.group(5), int(m.group(4)), int(m.group(3)), start, end))
    return size, values


def _occupied(values: list[Value]) -> int:
    total, current = 0, None
    for lo, hi in sorted((v.offset, v.offset + v.size) for v in values):
        if current and lo < current[1]:
            current[1] = max(current[1], hi)
        else:
            total += current[1] - current[0] if current else 0
            current = [lo, hi]
    return total + (current[1] - current[0] if current else 0)


def find_peak(size: int, values: list[Value]) -> Peak:
    """The program point where the live values occupy most of the allocation.

    Example:
        >>> v = [Value("a{}", "f32[4]", 0, 16, 0, 2), Value("b{}", "f32[4]", 16, 16, 1, 3)]
        >>> find_peak(32, v).point, find_peak(32, v).live_bytes
        (1, 32)
    """
    points = sorted({v.start for v in values})
    best = max(points, key=lambda t: _occupied([v for v in values if v.start <= t <= v.end]))
    live = [v for v in values if v.start <= best <= v.end]
    places: dict[tuple[int, int], Value] = {}
    for v in live:
        places.setdefault((v.offset, v.size), v)
    ordered = tuple(sorted(places.values(), key=lambda v: -v.size))
    return Peak(size, best, _occupied(live), ordered)


def _op_names(hlo: str) -> dict[str, str]:
    # Each instruction's JAX operation (its metadata's op_name), by instruction name.
    try:
        text = open(hlo).read()
    except FileNotFoundError:
        return {}
    names = {}
    for ins in instructions(text):
        m = _OP_NAME.search(ins.rest)
        names[ins.name] = m.group(1) if m else ""
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump", help="the --xla_dump_to directory")
    parser.add_argument("--module", default="step_fn",
                        help="part of the module's file name (default: step_fn, meshpar's step)")
    parser.add_argument("--min-kib", type=float, default=64.0,
                        help="list values of at least this size (default 64)")
    args = parser.parse_args(argv)
    assignment, live_range, hlo = _files(args.dump, args.module)
    size, values = read_values(assignment, live_range)
    peak = find_peak(size, values)
    ops = _op_names(hlo)
    mib = 2.0 ** 20
    print(f"temporary allocation {size / mib:.2f} MiB; fullest at program point {peak.point}: "
          f"{peak.live_bytes / mib:.2f} MiB live ({1 - peak.live_bytes / size:.1%} unused)")
    for v in peak.values:
        if v.size >= args.min_kib * 1024:
            op = ops.get(v.name.split("{")[0], "")
            print(f"{v.size / mib:8.3f} MiB  {v.shape[:32]:32s} {v.start:>5}-{v.end:<5} "
                  f"{v.name[:40]:40s} {op[-60:]}")


if __name__ == "__main__":
    main(sys.argv[1:])
