"""``python -m nnrt``: the ``nnrt`` command."""

import sys

from nnrt.cli import main

sys.exit(main())
