"""`python -m feddiff`."""

import sys

from feddiff.cli import main

sys.exit(main())
