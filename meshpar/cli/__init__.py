"""The ``meshpar`` command."""
