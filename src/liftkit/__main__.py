"""``python -m liftkit``: the same as the ``liftkit`` command."""

from liftkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
