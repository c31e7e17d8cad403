"""`python -m loradock`: the `loradock` command."""

import sys

from .cli import main

sys.exit(main())
