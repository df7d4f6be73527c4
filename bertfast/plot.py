"""`python -m bertfast.plot RUN_DIR [RUN_DIR ...]`: draw runs' metrics (the program is bertfast/train/plot.py)."""
import sys

from bertfast.train.plot import main

if __name__ == "__main__":
    sys.exit(main())
