"""``meshpar``'s entry point: parse, set up the devices, run ``inspect``, ``train``, ``sample`` or ``launch``.

Device emulation has to happen before JAX starts its backend: importing these modules only
imports JAX, it does not start the backend, and nothing here touches a device until the CPU
device count is set (or the multi-process job is joined).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from meshpar.backend import distributed, launch
from meshpar.backend.devices import emulate_devices
from meshpar.cli.args import build_parser
from meshpar.cli.config import parse_args
from meshpar.cli.inspect import inspect_main
from meshpar.cli.plan import plan_main
from meshpar.cli.sample import sample_main
from meshpar.cli.train import train_main
from meshpar.errors import MeshparError, UsageError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``meshpar`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        return launch.main(argv[1:])
    parser = build_parser()
    try:
        args = parse_args(parser, argv)
    except MeshparError as err:  # the --config file
        print(f"meshpar {argv[0] if argv else ''}: error: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "plan" and args.cpu_devices is None:
            # Compile at the target count when it is small enough to emulate here (fewer
            # devices than 8 use the first ones of 8).
            args.cpu_devices = max(args.devices or 8, 8) if (args.devices or 8) <= 64 else 8
        if args.cpu_devices < 1:
            raise UsageError(f"--cpu-devices {args.cpu_devices}: must be >= 1")
        if os.environ.get("MESHPAR_NUM_PROCESSES"):
            # Started by `meshpar launch` (or a scheduler setting MESHPAR_*): join the job first;
            # initialize() sets this process's CPU device count from MESHPAR_CPU_DEVICES.
            distributed.initialize()
        else:
            emulate_devices(args.cpu_devices)
        if args.command == "inspect":
            return inspect_main(args)
        if args.command == "plan":
            return plan_main(args)
        if args.command == "train":
            return train_main(args)
        if args.command == "sample":
            return sample_main(args)
    except MeshparError as err:
        print(f"meshpar {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
