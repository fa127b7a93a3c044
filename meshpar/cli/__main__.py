"""``python -m meshpar.cli`` is the ``meshpar`` command."""

import sys

from meshpar.cli.command import main

sys.exit(main())
