"""What the command-line tools share: a parser whose refusal is one line (the message names the flag and what to do)
with exit code 2 and no usage dump, and that reads `--lr -1e-4` as a (bad) value rather than an unknown option."""
from __future__ import annotations

import argparse
import re

_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
