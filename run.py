#!/usr/bin/env python
"""sparsebench entry point: ``python run.py method=lth_imp dataset=mnist model=lenet300_100``.

See README.md for the config groups; ``python run.py --help`` lists them.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from sparsebench.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
