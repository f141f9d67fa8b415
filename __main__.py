"""`python -m dgemma`: the `dgemma` command line."""

import sys

from .runtime.cli import main

sys.exit(main())
