"""The one error type the data pipeline raises for bad input."""

from __future__ import annotations

OFFLINE_HINT = (
    "Run offline with the built-in corpus (`--data builtin`, `load_data('builtin')`) or point at local files "
    "(`--data path/to/corpus.txt`, a folder, a glob, .txt/.jsonl/.parquet with a `text` column)."
)


class DataError(ValueError):
    """Bad data input: says what was asked, what failed, and what to do instead."""

    def __init__(self, asked: str, failed: str, todo: str = OFFLINE_HINT):
        self.asked, self.failed, self.todo = asked, failed, todo
        super().__init__(f"{asked}: {failed}. {todo}")


class DataNotFoundError(DataError, FileNotFoundError):
    """A data source that names nothing: no such file, folder or known dataset, or a glob that matches no file."""


class NSPBalanceWarning(UserWarning):
    """The share of ``is_next`` pairs is far from one half: next-sentence prediction would learn a skewed prior."""
