"""Evaluate a checkpoint: `python evaluate.py models/alexnet_baseline.py results/best.pth`.

The same command as `alexnet evaluate`; see `python evaluate.py --help`.
"""

import sys

from alexnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]], script="evaluate.py"))
