"""``meshpar launch``: run N local processes of one program, wired for ``jax.distributed``.

::

    meshpar launch --processes 2 --cpu-devices-per-process 4 -- train --mesh data=2,fsdp=2,tensor=2
    python -m meshpar.backend.launch --processes 2 --module tests.helpers.dist_check -- --die-after 1

Each child is ``python -m <module> <args...>`` (module ``meshpar`` by default) with
``MESHPAR_COORDINATOR=127.0.0.1:<port>``, ``MESHPAR_NUM_PROCESSES``, ``MESHPAR_PROCESS_ID``,
``MESHPAR_INIT_TIMEOUT``, ``MESHPAR_HEARTBEAT_TIMEOUT`` and, if asked, ``MESHPAR_CPU_DEVICES`` set,
which :func:`meshpar.backend.distributed.initialize` reads. Every output line of child ``i`` (stdout and
stderr merged) is printed as ``[p{i}] line``. SIGINT/SIGTERM are forwarded to the children (a
second SIGINT kills them); on Linux a child also dies if the launcher is killed. When a child
fails, the launcher says which and how (exit code or signal), waits ``--grace`` seconds for the
others (JAX aborts them by itself once the heartbeat timeout passes), then sends SIGTERM and,
``--kill-after`` seconds later, SIGKILL (JAX's preemption service catches SIGTERM without exiting). The exit status is 0 if every child succeeded, else the
first failing child's exit code (``128 + signal`` if it died by a signal); 2 for a usage error
such as a port in use.

This module does not import JAX: the launcher only starts, watches and stops processes.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from meshpar.errors import LaunchError

#: Seconds between SIGTERM and SIGKILL when the launcher stops its children.
KILL_AFTER_S = 5.0
USAGE_EXIT = 2

if sys.platform.startswith("linux"):
    import ctypes

    # Loaded here, not in the child: between fork and exec the child should only make the call.
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
    _PR_SET_PDEATHSIG = 1
else:  # pragma: no cover
    _PRCTL = None


def _die_with_launcher(parent: int):
    """``preexec_fn``: the child gets SIGKILL if the launcher dies (even by SIGKILL)."""

    def setup() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return setup if _PRCTL is not None else None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1..65535)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the launcher's flags and the trailing command to ``parser``.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="meshpar launch")
        >>> add_arguments(parser)
        >>> args = parser.parse_args(["--processes", "2", "--", "train"])
        >>> args.processes, args.module, args.command
        (2, 'meshpar', ['--', 'train'])

        :func:`run` then launches ``args``.
    """
    parser.add_argument("--processes", "-n", type=_positive_int, required=True,
                        help="number of processes to start")
    parser.add_argument("--cpu-devices-per-process", type=_positive_int, default=None,
                        metavar="K", help="CPU devices each process emulates (MESHPAR_CPU_DEVICES)")
    parser.add_argument("--port", type=_port, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--heartbeat-timeout", type=_positive_float, default=10.0, metavar="S",
                        help="seconds without heartbeat before JAX declares a process dead "
                             "(default 10)")
    parser.add_argument("--init-timeout", type=_positive_float, default=60.0, metavar="S",
                        help="seconds for all processes to connect (default 60)")
    parser.add_argument("--grace", type=_positive_float, default=5.0, metavar="S",
                        help="after a process fails, seconds to let the others exit before "
                             "terminating them (default 5)")
    parser.add_argument("--kill-after", type=_positive_float, default=KILL_AFTER_S, metavar="S",
                        help="seconds between the launcher's SIGTERM and SIGKILL (default 5; JAX's "
                             "preemption service catches SIGTERM, giving a trainer this long to "
                             "save)")
    parser.add_argument("--module", default="meshpar",
                        help="module each process runs with python -m (default: meshpar)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="arguments for python -m <module>, after --")


def _check_port(port: int) -> None:
    # JAX's coordinator binds [::]:port; try that and 127.0.0.1 so that a port someone listens
    # on is refused here with a clear message instead of a gRPC error in every child later.
    # SO_REUSEADDR, as gRPC sets it: a port left in TIME_WAIT by a previous run is usable.
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this machine
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise LaunchError(
                    f"port {port} on {host} is already in use (or not permitted); choose another "
                    "--port, or leave --port out to pick a free one"
                ) from None
            # EADDRNOTAVAIL and friends: that address family is not configured; not a conflict.
        finally:
            sock.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _describe(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by signal {name}"
    return f"exited with code {code}"


def _status(code: int) -> int:
    return 128 - code if code < 0 else code


class _Launch:
    """The children of one launch, their output pumps and their shutdown."""

    def __init__(self, args: argparse.Namespace, command: list[str], port: int):
        self.args = args
        self.command = command
        self.port = port
        self.procs: list[subprocess.Popen] = []
        self.pumps: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.stopped_by_us: set[int] = set()
        self.kill_at: float | None = None
        self.interrupts = 0
        self.received: int | None = None  # the first SIGINT/SIGTERM the launcher got

    def say(self, message: str) -> None:
        with self.lock:
            sys.stderr.write(f"meshpar launch: {message}\n")
            sys.stderr.flush()

    def _pump(self, index: int, stream) -> None:
        prefix = f"[p{index}] "
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self.lock:
                sys.stdout.write(prefix + line + "\n")
                sys.stdout.flush()
        stream.close()

    def env(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            MESHPAR_COORDINATOR=f"127.0.0.1:{self.port}",
            MESHPAR_NUM_PROCESSES=str(self.args.processes),
            MESHPAR_PROCESS_ID=str(index),
            MESHPAR_INIT_TIMEOUT=str(self.args.init_timeout),
            MESHPAR_HEARTBEAT_TIMEOUT=str(self.args.heartbeat_timeout),
            # Without it a child's last prints sit in a buffer when JAX aborts the process.
            PYTHONUNBUFFERED="1",
        )
        if self.args.cpu_devices_per_process is not None:
            env["MESHPAR_CPU_DEVICES"] = str(self.args.cpu_devices_per_process)
        else:
            env.pop("MESHPAR_CPU_DEVICES", None)
        return env

    def start(self) -> None:
        argv = [sys.executable, "-m", self.args.module, *self.command]
        for index in range(self.args.processes):
            # A session of its own per child: the terminal's Ctrl-C reaches only the launcher,
            # which forwards it once, and killpg reaches anything a child spawned. Children are
            # all forked before any pump thread starts, which keeps preexec_fn safe.
            proc = subprocess.Popen(
                argv, env=self.env(index), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_launcher(os.getpid()),
            )
            self.procs.append(proc)
        for index, proc in enumerate(self.procs):
            pump = threading.Thread(target=self._pump, args=(index, proc.stdout),
                                    name=f"meshpar-launch-p{index}", daemon=True)
            pump.start()
            self.pumps.append(pump)

    def signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def on_signal(self, signum: int, _frame) -> None:
        self.interrupts += 1
        if signum == signal.SIGINT and self.interrupts > 1:
            self.say("second interrupt: killing all processes")
            self.signal_all(signal.SIGKILL)
            return
        if self.received is None:
            self.received = signum
        self.say(f"received {signal.Signals(signum).name}; forwarding it to the processes")
        self.signal_all(signum)
        if self.kill_at is None:
            self.kill_at = time.monotonic() + self.args.kill_after

    def wait(self) -> int:
        grace = self.args.grace
        first: tuple[int, int] | None = None  # (index, returncode) of the first failure
        terminate_at: float | None = None
        done: set[int] = set()
        while len(done) < len(self.procs):
            now = time.monotonic()
            for index, proc in enumerate(self.procs):
                code = proc.poll()
                if index in done or code is None:
                    continue
                done.add(index)
                if index in self.stopped_by_us:
                    self.say(f"process {index} {_describe(code)} (stopped by the launcher)")
                elif code != 0:
                    self.say(f"process {index} {_describe(code)}")
                    if first is None:
                        first = (index, code)
                        running = len(self.procs) - len(done)
                        if running:
                            terminate_at = now + grace
                            self.say(f"stopping the other {running} process(es) if they have not "
                                     f"exited in {grace:g} s")
            if terminate_at is not None and now >= terminate_at:
                terminate_at = None
                for index, proc in enumerate(self.procs):
                    if proc.poll() is None:
                        self.stopped_by_us.add(index)
                self.signal_all(signal.SIGTERM)
                self.kill_at = now + self.args.kill_after
            if self.kill_at is not None and now >= self.kill_at:
                self.kill_at = None
                for index, proc in enumerate(self.procs):
                    if proc.poll() is None:
                        self.stopped_by_us.add(index)
                        # JAX's preemption service catches SIGTERM (it only records a
                        # preemption notice), so a JAX process usually needs this.
                        self.say(f"process {index} still running {self.args.kill_after:g} s after "
                                 "SIGTERM; killing it")
                self.signal_all(signal.SIGKILL)
            time.sleep(0.05)
        for pump in self.pumps:
            pump.join(timeout=5.0)
        if first is not None:
            index, code = first
            self.say(f"failed: process {index} {_describe(code)} first")
            return _status(code)
        if self.received is not None:
            # Interrupted: report the signal, whatever the processes did with it. A
            # KeyboardInterrupt that lands in a garbage-collection callback is swallowed, the
            # process runs on and the launcher has to kill it (seen in CI).
            return 128 + self.received
        codes = [proc.returncode for proc in self.procs]
        bad = [c for c in codes if c != 0]
        return _status(bad[0]) if bad else 0


def run(args: argparse.Namespace) -> int:
    """Launch the processes described by parsed ``args`` (see :func:`add_arguments`).

    Returns:
        0 if every process exited with 0; 2 for a usage error (port in use, no command);
        otherwise the first failing process's exit code, or ``128 + signal number``.

    Example::

        # Two processes of `meshpar train`, 4 emulated CPU devices each (returns 0 on success).
        parser = argparse.ArgumentParser(prog="meshpar launch")
        add_arguments(parser)
        args = parser.parse_args(["-n", "2", "--cpu-devices-per-process", "4", "--",
                                  "train", "--mesh", "data=2,fsdp=2,tensor=2"])
        status = run(args)
    """
    command = list(args.command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    try:
        if not command and args.module == "meshpar":
            raise LaunchError("nothing to run: give the meshpar command after --, e.g. "
                              "meshpar launch --processes 2 -- train --mesh data=2")
        if args.port is not None:
            _check_port(args.port)
            port = args.port
        else:
            port = _free_port()
    except LaunchError as e:
        sys.stderr.write(f"meshpar launch: {e}\n")
        return USAGE_EXIT

    launch = _Launch(args, command, port)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, launch.on_signal)
    try:
        try:
            launch.start()
        except OSError as e:
            launch.say(f"could not start {sys.executable} -m {args.module}: {e}")
            launch.signal_all(signal.SIGKILL)
            return USAGE_EXIT
        return launch.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_parser() -> argparse.ArgumentParser:
    """The standalone parser of ``meshpar launch`` / ``python -m meshpar.backend.launch``."""
    parser = argparse.ArgumentParser(
        prog="meshpar launch",
        description="Run N local processes of a meshpar program, connected by jax.distributed.",
    )
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and launch. Returns the exit status.

    Example::

        # As `meshpar launch --processes 2 --cpu-devices-per-process 4 -- train ...`.
        status = main(["--processes", "2", "--cpu-devices-per-process", "4", "--",
                       "train", "--mesh", "data=2,fsdp=2,tensor=2"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
