"""``python -m sparsemup``: the same as the ``sparsemup`` command."""

import sys

from .cli import main

sys.exit(main())
