"""Multi-process runs through ``meshpar launch`` and ``meshpar.backend.distributed``.

The subprocess tests start real processes connected by ``jax.distributed`` (gloo collectives on
CPU). Every subprocess has a hard timeout, and its environment is built from scratch so that it
does not inherit this test process's 8 emulated devices.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meshpar.backend import distributed, launch
from meshpar.backend.distributed import DistributedError
from meshpar.mesh import make_mesh

from helpers.env import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = "tests.helpers.dist_check"


def run_launch(*args: str, timeout: float = 90, env: dict[str, str] | None = None):
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "meshpar", "launch", *args],
        env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout, cwd=REPO,
    )
    return proc.returncode, proc.stdout, time.monotonic() - start


def result_line(output: str) -> dict:
    lines = [l for l in output.splitlines() if "RESULT " in l]
    assert len(lines) == 1, output[-3000:]
    assert lines[0].startswith("[p0] RESULT "), lines  # printed by process 0 only
    return json.loads(lines[0].split("RESULT ", 1)[1])


# ------------------------------------------------------------------ launcher, end to end


def test_two_processes_match_one_process(tmp_path):
    rc1, out1, t1 = run_launch("--processes", "1", "--cpu-devices-per-process", "8",
                               "--module", CHECK)
    assert rc1 == 0, out1[-3000:]
    rc2, out2, t2 = run_launch("--processes", "2", "--cpu-devices-per-process", "4",
                               "--module", CHECK, "--", "--checkpoint", str(tmp_path / "ckpt"))
    assert rc2 == 0, out2[-3000:]
    assert result_line(out1) == result_line(out2)
    assert result_line(out2)["total"] == -36.0
    # Each process saw 4 local of 8 devices and fed its own rows; the global arrays matched.
    for i in (0, 1):
        assert f"[p{i}] process {i}/2: 4 local of 8 devices" in out2
        assert f"[p{i}] CHECKPOINT ok" in out2
    assert "[p0] LAYOUT ok default: local block (8, 8), rows [0, 1, 2, 3, 4, 5, 6, 7]" in out2
    # On the interleaved mesh a process's rows are not one contiguous block.
    assert "[p0] LAYOUT ok interleaved: local block (8, 8), rows [0, 1, 2, 3, 8, 9, 10, 11]" in out2
    assert "[p1] LAYOUT ok interleaved: local block (8, 8), rows [4, 5, 6, 7, 12, 13, 14, 15]" in out2
    print(f"1x8: {t1:.1f} s, 2x4: {t2:.1f} s")


def test_killed_process_is_named_and_the_job_fails_fast():
    # Grace 30 s > heartbeat 3 s: the survivor is aborted by JAX's heartbeat check, not by us.
    rc, out, elapsed = run_launch(
        "--processes", "2", "--cpu-devices-per-process", "4", "--heartbeat-timeout", "3",
        "--grace", "30", "--module", CHECK, "--", "--die-after", "0.5", "--die-how", "kill",
    )
    assert rc == 128 + signal.SIGKILL, out[-3000:]
    assert "meshpar launch: process 1 was killed by signal SIGKILL" in out
    assert "failed: process 1 was killed by signal SIGKILL first" in out
    assert re.search(r"meshpar launch: process 0 was killed by signal SIGABRT", out), out[-3000:]
    assert "stopped sending heartbeats" in out  # JAX's own diagnosis, prefixed [p0]
    assert elapsed < 40, elapsed  # the survivors would otherwise run --linger=120 s
    print(f"kill detected, launcher done in {elapsed:.1f} s")


def test_failed_process_exit_code_and_others_stopped():
    rc, out, elapsed = run_launch(
        "--processes", "2", "--cpu-devices-per-process", "4", "--grace", "1", "--kill-after", "1",
        "--module", CHECK, "--", "--die-after", "0.2", "--die-how", "exit",
    )
    assert rc == 1, out[-3000:]
    assert "meshpar launch: process 1 exited with code 1" in out
    assert re.search(r"process 0 was killed by signal SIG(TERM|KILL) \(stopped by the launcher\)", out)
    assert elapsed < 40, elapsed
    print(f"exit detected, launcher done in {elapsed:.1f} s")


def test_missing_peer_fails_within_the_init_timeout():
    port = launch._free_port()
    env = child_env(MESHPAR_COORDINATOR=f"127.0.0.1:{port}", MESHPAR_NUM_PROCESSES="2",
                    MESHPAR_PROCESS_ID="0", MESHPAR_CPU_DEVICES="4", MESHPAR_INIT_TIMEOUT="3")
    proc = subprocess.Popen([sys.executable, "-m", CHECK], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = proc.stdout.readline()  # printed just before initialize(); imports are done
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert first.startswith("initializing"), (first, err[-3000:])
    assert proc.returncode == distributed.INIT_TIMEOUT_EXIT_CODE, err[-3000:]
    assert "distributed initialization timed out after 3 s" in err
    assert "not all 2 processes connected to the coordinator" in err
    assert 2.5 < elapsed < 3 + 5, elapsed  # JAX alone would abort at about 3 + 5 s
    print(f"missing peer reported {elapsed:.1f} s after initialize() began (timeout 3 s)")


def test_no_settings_and_no_cluster_is_explained():
    code = ("from meshpar.backend import distributed\n"
            "try:\n    distributed.initialize()\n"
            "except distributed.DistributedError as e:\n    print('ERR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert "ERR no multi-process settings found: set MESHPAR_COORDINATOR" in proc.stdout, proc.stderr


def test_port_in_use_is_a_usage_error():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out, _ = run_launch("--processes", "2", "--port", str(port), "--module", CHECK,
                                timeout=60)
    assert rc == 2
    assert f"port {port} on 127.0.0.1 is already in use" in out
    assert "[p0]" not in out  # nothing was started


def test_sigint_is_forwarded(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshpar", "launch", "--processes", "2", "--cpu-devices-per-process",
         "4", "--module", CHECK, "--", "--die-after", "1000", "--die-rank", "9"],
        env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )
    # Hard timeout: the children die with the launcher (PR_SET_PDEATHSIG).
    guard = threading.Timer(90, proc.kill)
    guard.start()
    try:
        lines = []
        for line in proc.stdout:  # wait until the workers are in their collective loop
            lines.append(line)
            if "RESULT" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        guard.cancel()
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    assert "received SIGINT; forwarding it to the processes" in out
    assert "KeyboardInterrupt" in out


# ------------------------------------------------------------------ launcher arguments


def test_launcher_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["--processes", "0", "--", "train"])
    assert e.value.code == 2
    assert "argument --processes/-n: 0 must be >= 1" in capsys.readouterr().err
    assert launch.main(["--processes", "2"]) == 2
    assert "nothing to run" in capsys.readouterr().err


def test_add_arguments_for_the_cli():
    import argparse

    parser = argparse.ArgumentParser(prog="meshpar launch")
    launch.add_arguments(parser)
    args = parser.parse_args(["--processes", "2", "--port", "1234", "--", "train", "--steps", "3"])
    assert args.processes == 2 and args.port == 1234 and args.module == "meshpar"
    assert args.command == ["--", "train", "--steps", "3"]


# ------------------------------------------------------------------ in-process API


@pytest.fixture
def no_meshpar_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("MESHPAR_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_initialize_validates_settings(no_meshpar_env):
    monkeypatch = no_meshpar_env
    with pytest.raises(DistributedError, match=r"num_processes, process_id missing .* MESHPAR_NUM_PROCESSES"):
        distributed.initialize(coordinator_address="127.0.0.1:1234")
    with pytest.raises(DistributedError, match=r"'localhost' is not of the form host:port"):
        distributed.initialize(coordinator_address="localhost", num_processes=2, process_id=0)
    with pytest.raises(DistributedError, match=r"process_id=2 is out of range for num_processes=2"):
        distributed.initialize(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2)
    monkeypatch.setenv("MESHPAR_NUM_PROCESSES", "two")
    with pytest.raises(DistributedError, match=r"MESHPAR_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()
    monkeypatch.delenv("MESHPAR_NUM_PROCESSES")
    with pytest.raises(DistributedError, match=r"heartbeat_timeout_s=0: must be a number of seconds > 0"):
        distributed.initialize(heartbeat_timeout_s=0)


def test_initialize_after_backend_start_is_refused(no_meshpar_env):
    jax.devices()  # the test session's backend is up
    with pytest.raises(DistributedError, match=r"must run before JAX starts its backend"):
        distributed.initialize(coordinator_address="127.0.0.1:1234", num_processes=2,
                               process_id=0, local_cpu_devices=4)
    assert not distributed.is_initialized()
    assert len(jax.devices()) == 8


def test_jax_distributed_accepts_the_kwargs_we_pass():
    import inspect

    params = inspect.signature(jax.distributed.initialize).parameters
    assert {"initialization_timeout", "heartbeat_timeout_seconds"} <= set(params)
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_single_process_helpers():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharding = NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
    batch = {"x": np.arange(32, dtype=np.float32).reshape(8, 4), "y": np.arange(8)}
    shardings = {"x": sharding, "y": NamedSharding(mesh, P(("data", "fsdp")))}
    assert distributed.process_index() == 0 and distributed.is_main_process()
    local = distributed.local_slice(batch, shardings)
    np.testing.assert_array_equal(local["x"], batch["x"])  # one process owns every row
    placed = distributed.global_batch_from_local(local, shardings)
    assert placed["x"].sharding == sharding and placed["x"].shape == (8, 4)
    np.testing.assert_array_equal(np.asarray(placed["y"]), batch["y"])
    with pytest.raises(DistributedError, match=r"process 1 owns none of the sharding's devices"):
        distributed.local_slice(batch["x"], sharding, process_index=1)
    with pytest.raises(DistributedError, match=r"batch leaf 'x': local shape \(7, 4\)"):
        distributed.global_batch_from_local({"x": np.zeros((7, 4), np.float32)}, sharding)
