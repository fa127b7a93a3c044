"""``python tests/helpers/hang_train.py N -- train ...``: ``meshpar train`` that stops before step N.

It runs the real CLI (``meshpar.cli.main``) with one change: when the trainer is about to run
optimizer step ``N`` (``Trainer.state.step == N``), it prints ``HANGING before step N`` and sleeps
forever, so a test can SIGKILL a *running* training process at a known point, after the metrics
of step ``N - 1`` were written and while the checkpoints before it (asynchronous saves) land.
Without it a tiny run finishes its steps in well under a second and a kill would be a race.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    hang_at = int(sys.argv[1])
    argv = sys.argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]

    from meshpar import train as _train

    original = _train.Trainer.step

    def step(self, batch):
        if int(self.state.step) == hang_at:
            print(f"HANGING before step {hang_at}", flush=True)
            while True:  # the test kills us
                time.sleep(60)
        return original(self, batch)

    _train.Trainer.step = step
    from meshpar.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
