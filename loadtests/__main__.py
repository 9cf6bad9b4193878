"""`python -m loadtests SCENARIO [options]`: the scenario runner (a bundled scenario by name, or a file)."""

import sys

from loadtests.runner import main

sys.exit(main())
