"""`python -m stream ...`: the same as the `stream` console script."""

import sys

from stream.cli import main

sys.exit(main())
