"""``python -m training.data``: see :mod:`training.data.cli`."""
import sys

from training.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
