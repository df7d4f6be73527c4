"""`python -m bertfast.finetune`: fine-tune a pretrained model on a task (the program is bertfast/downstream/finetune.py)."""
import sys

from bertfast.downstream.finetune import main

if __name__ == "__main__":
    sys.exit(main())
