"""Entry point for the Composer launcher: ``composer -n N scripts/train.py RECIPE [key=value ...]``.

Takes the same code path as ``composer-growth train``.
"""

import sys

from composer_growth.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
