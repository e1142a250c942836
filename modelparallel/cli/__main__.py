"""``python -m modelparallel.cli``: the ``partition-plan`` command."""

import sys

from modelparallel.cli import main

sys.exit(main())
