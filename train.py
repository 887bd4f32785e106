"""Train an AlexNet variant: `python train.py models/alexnet_baseline.py [options]`.

The same command as `alexnet train`; see `python train.py --help`.
"""

import sys

from alexnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], script="train.py"))
