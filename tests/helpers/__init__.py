"""Test helpers: modules the test files import (``from helpers.compare import ...``; pytest puts
``tests/`` on ``sys.path``) and scripts the subprocess tests run (``hang_train.py``,
``killed_save.py``)."""
