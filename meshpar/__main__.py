"""``python -m meshpar`` is the ``meshpar`` command."""

import sys

from meshpar.cli import main

sys.exit(main())
