"""``python -m mammoflow``: the same command line as the ``mammoflow`` script."""

from __future__ import annotations

from mammoflow.cli import main

if __name__ == "__main__":
    main()
