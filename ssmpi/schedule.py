"""Deprecated name of ``python -m ssmpi.plan`` (the executed plan: Figure 1 as tables)."""

import sys

from .plan import main

if __name__ == "__main__":
    sys.stderr.write("ssmpi.schedule is deprecated: use python -m ssmpi.plan (same options)\n")
    sys.exit(main())
