"""`python -m flows.cli`: the `mlpl` command (what torchrun launches)."""

import sys

from flows.cli import main

sys.exit(main())
