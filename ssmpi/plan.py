"""The executed plan of Sideways / Skip-Sideways: who sees which frame when (Figure 1).

    python -m ssmpi.plan --units 8 --mode skip --k 2

See :mod:`ssmpi.engine.plan` for what the tables mean.
"""

import sys

from .engine.plan import main

if __name__ == "__main__":
    sys.exit(main())
