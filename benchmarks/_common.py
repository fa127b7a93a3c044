"""What the benchmark scripts share: their common options and the metadata of a run.

The scripts run as ``python benchmarks/bench_X.py`` and are also loaded by file path
(``tests/test_benchmarks.py``); each puts this folder on ``sys.path`` before importing this module.
JAX is imported lazily here too: a script sets up its emulated devices before JAX starts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def parse_args(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Add the options every benchmark has (``--cpu-devices``, ``--json``) and parse ``argv``."""
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--json", default=None, help="write the full results here")
    return p.parse_args(argv)


class Run:
    """A benchmark run: checks that JAX has ``args.cpu_devices`` devices and starts the clock."""

    def __init__(self, args: argparse.Namespace, script: str) -> None:
        import jax

        if len(jax.devices()) != args.cpu_devices:
            raise RuntimeError(f"JAX has {len(jax.devices())} devices, the benchmark wants "
                               f"{args.cpu_devices}")
        self.args, self.script = args, script
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.t0 = time.perf_counter()

    def meta(self, **extra: Any) -> dict[str, Any]:
        """The report's ``meta``: start date, command, versions, host, arguments, wall time."""
        import jax

        return {
            "date": self.date,
            "command": " ".join(["python", f"benchmarks/{self.script}", *sys.argv[1:]]),
            "jax": jax.__version__, "python": platform.python_version(),
            "host_cpus": os.cpu_count(), "devices": len(jax.devices()),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "args": vars(self.args), "wall_s": time.perf_counter() - self.t0,
            **extra,
        }


def write_json(path: str | None, report: dict) -> None:
    """Write ``report`` to ``path`` (``--json``), if one was given."""
    if path:
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1, default=str)
