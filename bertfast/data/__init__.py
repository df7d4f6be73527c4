"""bertfast.data: corpora -> WordPiece tokens -> NSP sentence pairs -> dynamically masked batches.

Public API (see docs/data.md): ``load_data`` (its loader's ``eval_loader``: held-out batches with fixed masks),
``check_sources`` (cheap checks before any work), ``download_sources``, ``mask_tokens`` (with ``word_ids`` for
whole-word masking: ``continuation_table``, ``word_ids_from_pieces``), ``Batch``, ``PretrainingCollator``,
``PretrainingLoader``, ``DataError`` / ``DataNotFoundError``, ``NSPBalanceWarning``, ``split_sentences``.
Importing this package does not import ``datasets`` (the GPU machines lack it); only loading needs it.
"""

from .batch import Batch, PretrainingCollator, sample_seed
from .errors import DataError, DataNotFoundError, NSPBalanceWarning
from .loader import EvalLoader, PretrainingLoader, load_data
from .masking import continuation_table, default_max_predictions, mask_tokens, word_ids_from_pieces
from .sentences import split_sentences
from .sources import check_sources, download_sources

DataCollator = PretrainingCollator  # short alias

__all__ = [
    "Batch", "DataCollator", "DataError", "DataNotFoundError", "EvalLoader", "NSPBalanceWarning", "PretrainingCollator",
    "PretrainingLoader", "check_sources", "continuation_table", "default_max_predictions", "download_sources",
    "load_data", "mask_tokens", "sample_seed", "split_sentences", "word_ids_from_pieces",
]
