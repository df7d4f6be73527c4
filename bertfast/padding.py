"""bertfast.padding: the padded <-> unpadded layouts, kept at this public name; the module is
bertfast/ops/padding.py (the layout the varlen ops take). `import bertfast.padding` gives that very module."""
import sys

from bertfast.ops import padding as _padding

sys.modules[__name__] = _padding
