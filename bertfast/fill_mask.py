"""`python -m bertfast.fill_mask`: fill [MASK] tokens with a model (the program is bertfast/downstream/fill_mask.py)."""
import sys

from bertfast.downstream.fill_mask import main

if __name__ == "__main__":
    sys.exit(main())
