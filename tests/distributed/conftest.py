"""Tests in this folder run on several MPI ranks.

``tests/test_distributed.py`` launches them with
``mpirun -n 2 python -m pytest tests/distributed``. In a plain (one-process)
pytest run they are not collected: they need a second rank to talk to.
"""

from __future__ import annotations

import os

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")

collect_ignore_glob: list[str] = []
if not any(k in os.environ for k in _MPI_ENV):
    collect_ignore_glob.append("test_*.py")
