"""WordPiece tokenizer: load a named one, or train an uncased vocabulary on the corpus and keep it for next time."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator

from .errors import DataError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 in a trained vocabulary
META_FILE = "bertfast_tokenizer.json"


def load_tokenizer(name_or_path: str):
    """``transformers.BertTokenizerFast.from_pretrained`` with an error that says what to do when it fails."""
    from transformers import BertTokenizerFast

    local = os.path.isdir(name_or_path) or os.path.isfile(name_or_path)
    where = "the local folder" if local else "the Hugging Face hub (is the network reachable?)"
    todo = ("Pass a local folder holding vocab.txt / tokenizer.json, or leave tokenizer unset to train a "
            "WordPiece vocabulary on the corpus offline.")
    try:
        if os.path.isfile(name_or_path):  # a bare vocab.txt: transformers 4 calls it vocab_file, 5 vocab
            import inspect

            key = "vocab_file" if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab"
            tok = BertTokenizerFast(**{key: name_or_path})
        else:
            tok = BertTokenizerFast.from_pretrained(name_or_path)
    except Exception as e:  # network, missing files, wrong format: all reported the same way
        raise DataError(f"tokenizer={name_or_path!r}",
                        f"could not load a BertTokenizerFast from {where} ({type(e).__name__}: {e})", todo) from e
    # transformers 5 builds a tokenizer of nothing but the special tokens when it finds no vocabulary file (an
    # empty folder, or a hub name while offline) instead of failing: refuse it rather than train on [UNK]s
    if len(tok) <= len(SPECIAL_TOKENS):
        raise DataError(f"tokenizer={name_or_path!r}",
                        f"{where} gave a tokenizer of {len(tok)} tokens, only the special ones: no vocabulary file "
                        "was found there", todo)
    missing = [name for name in ("pad", "cls", "sep", "mask", "unk") if getattr(tok, f"{name}_token_id") is None]
    if missing:
        raise DataError(f"tokenizer={name_or_path!r}",
                        f"the tokenizer has no {', '.join(f'[{m.upper()}]' for m in missing)} token, which BERT "
                        "pretraining needs", todo)
    return tok


def train_wordpiece(sentences: Iterable[str], vocab_size: int, save_dir: str, model_max_length: int = 512):
    """Train an uncased BERT WordPiece vocabulary with ``tokenizers``; save it to ``save_dir``; return it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True,
                                                handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(_batched(sentences), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
                           pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                           model_max_length=model_max_length)
    os.makedirs(save_dir, exist_ok=True)
    if os.path.exists(os.path.join(save_dir, META_FILE)):  # an older vocabulary: no longer vouched for
        os.remove(os.path.join(save_dir, META_FILE))
    hf.save_pretrained(save_dir)
    tmp = os.path.join(save_dir, f".{META_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:  # written last, whole or not at all: a run killed before it trains again
        json.dump({"vocab_size": vocab_size, "trained_by": "bertfast.data"}, f)
    os.replace(tmp, os.path.join(save_dir, META_FILE))
    hf.name_or_path = save_dir
    return hf


def _batched(sentences: Iterable[str], n: int = 1000) -> Iterator[list[str]]:
    buf: list[str] = []
    for s in sentences:
        buf.append(s)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def trained_tokenizer(save_dir: str, vocab_size: int, sentences: Iterable[str]):
    """Reuse the vocabulary saved in ``save_dir`` when it was trained with ``vocab_size``; else train one there."""
    meta = os.path.join(save_dir, META_FILE)
    if os.path.exists(meta):
        with open(meta) as f:
            saved = json.load(f).get("vocab_size")
        if saved == vocab_size:
            log.info("reusing the WordPiece vocabulary in %s", save_dir)
            return load_tokenizer(save_dir)
        log.warning("%s holds a vocabulary of size %s, %s was asked: training a new one", save_dir, saved,
                    vocab_size)
    log.info("training a WordPiece vocabulary of %d tokens into %s", vocab_size, save_dir)
    return train_wordpiece(sentences, vocab_size, save_dir)
