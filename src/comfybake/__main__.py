"""`python -m comfybake`: the command line (how hosts run it, from the copy the roles install)."""

import sys

from comfybake.cli import main

sys.exit(main())
