"""Load a pretrained BERT from wherever it lives: `load_pretrained(path_or_name) -> (model, tokenizer)`.

Accepted, in the order they are recognised:

* a bertfast run folder (what `python -m bertfast.pretrain --output-dir RUN` writes): the newest checkpoint that
  passes its manifest check, with the tokenizer stored in that checkpoint (``step_*/tokenizer``) or else the
  run's (``RUN/tokenizer``);
* one bertfast checkpoint folder (``RUN/checkpoints/step_*``: model.safetensors + config.json + manifest.json),
  with the tokenizer from the folder itself (``tokenizer/`` in it, or its own files) or from its run
  (``../../tokenizer``);
* a folder in transformers' format (config.json of a ``bert`` model + weights) holding a BertModel,
  BertForMaskedLM, BertForPreTraining (or BertForSequenceClassification) - heads the weights lack are freshly
  initialised, and `Pretrained.new_weights` / `Pretrained.describe()` say which;
* a hub name (``bert-base-uncased``, ``google/bert_uncased_L-2_H-128_A-2``), taken from the local Hugging Face
  cache first, then from the hub.

Anything else is a FileNotFoundError (nothing there) or a ValueError (something there, but not usable: damaged
weights, no tokenizer, another model type), each naming the path and what was expected.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings

import torch

from bertfast.train import checkpoint as ckpt
from bertfast.model.bert import BertConfig, BertForPreTraining

EXPECTED = ("a bertfast run folder (holding checkpoints/ and tokenizer/), one of its checkpoints "
            "(model.safetensors + config.json + manifest.json), a transformers folder (config.json + "
            "model.safetensors or pytorch_model.bin of a BertModel / BertForMaskedLM / BertForPreTraining) or a hub "
            "model name")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# groups of transformers BertForPreTraining weights, for saying which heads were freshly initialised
_GROUPS = (("cls.seq_relationship.", "the NSP head"), ("cls.predictions.", "the MLM head"),
           ("bert.pooler.", "the pooler"), ("bert.", "the encoder"))


class Pretrained:
    """What `load_pretrained` returns. Unpacks as ``model, tokenizer``; also carries

    config (the model's BertConfig), kind ("run", "checkpoint", "transformers" or "hub"), path (the folder the
    weights came from), step (the checkpoint's training step; None outside bertfast runs) and new_weights (the
    transformers names of the weights that were missing and freshly initialised; empty when all were there)."""

    __slots__ = ("model", "tokenizer", "kind", "path", "step", "new_weights")

    def __init__(self, model, tokenizer, kind: str, path: str, step: int | None = None,
                 new_weights: list[str] | None = None):
        self.model, self.tokenizer, self.kind, self.path, self.step = model, tokenizer, kind, path, step
        self.new_weights = sorted(new_weights or [])

    @property
    def config(self) -> BertConfig:
        return self.model.config

    def __iter__(self):
        return iter((self.model, self.tokenizer))

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return (self.model, self.tokenizer)[i]

    def new_heads(self) -> list[str]:
        """Human names of the parts that were freshly initialised (["the NSP head", "the pooler"], ...)."""
        found = []
        for key in self.new_weights:
            for prefix, label in _GROUPS:
                if key.startswith(prefix):
                    if label not in found:
                        found.append(label)
                    break
        return found

    def describe(self) -> str:
        c = self.config
        what = {"run": "bertfast run", "checkpoint": "bertfast checkpoint", "transformers": "transformers folder",
                "hub": "hub model"}[self.kind]
        s = (f"{what} {self.path}" + (f" (step {self.step})" if self.step is not None else "") +
             f": {c.num_hidden_layers} layers x {c.hidden_size}, vocab {c.vocab_size}")
        heads = self.new_heads()
        if heads:
            s += "; freshly initialised (not in the weights): " + ", ".join(heads)
        return s


# ---------------------------------------------------------------------------------------------- what is there
def _is_run(path: str) -> bool:
    return os.path.isdir(os.path.join(path, ckpt.CHECKPOINT_DIR))


def _is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "manifest.json")) or (
        os.path.isfile(os.path.join(path, "model.safetensors")) and _bertfast_config(path) is not None)


def _bertfast_config(path: str) -> dict | None:
    """config.json of a bertfast checkpoint (BertConfig's fields), None for any other config.json."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and "max_len" in d and "model_type" not in d else None


def _is_transformers(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, w)) for w in _HF_WEIGHTS)


# ---------------------------------------------------------------------------------------------- tokenizers
def _tokenizer_from(candidates: list[str], what: str, override=None):
    """The first folder of `candidates` holding a tokenizer (or `override`: a name, folder or tokenizer)."""
    from bertfast.data.tokenizer import load_tokenizer

    if override is not None:
        return override if hasattr(override, "convert_tokens_to_ids") else load_tokenizer(os.fspath(override))
    for c in candidates:
        if os.path.isdir(c) and any(os.path.isfile(os.path.join(c, f)) for f in
                                    ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            return load_tokenizer(c)
    looked = ", ".join(candidates)
    raise ValueError(f"{what} holds no tokenizer (looked in {looked} for tokenizer.json / vocab.txt). Save the "
                     "tokenizer there (tokenizer.save_pretrained), or name one (tokenizer= / --tokenizer)")


def _check_vocab(model, tokenizer, where: str) -> None:
    n = len(tokenizer)
    if n > model.config.vocab_size:
        raise ValueError(f"{where}: the tokenizer has {n} tokens but the model's vocabulary only "
                         f"{model.config.vocab_size}: they do not belong together")


# ---------------------------------------------------------------------------------------------- bertfast
def _load_bertfast_checkpoint(path: str, *, impl, unpad) -> BertForPreTraining:
    from safetensors.torch import load_file

    if os.path.isfile(os.path.join(path, "manifest.json")):
        try:
            ckpt.verify_checkpoint(path)
        except ckpt.CheckpointError as e:
            raise ValueError(f"{path}: {e}") from None
    cfg = _bertfast_config(path)
    if cfg is None:
        raise ValueError(f"{path}: config.json is missing or is not a bertfast BertConfig; expected {EXPECTED}")
    try:
        config = BertConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}/config.json is not a valid BertConfig ({e})") from None
    weights_path = os.path.join(path, "model.safetensors")
    try:
        weights = load_file(weights_path, device="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no model.safetensors; expected {EXPECTED}") from None
    except Exception as e:  # a damaged file: safetensors raises its own error types
        raise ValueError(f"{weights_path} is damaged and cannot be read ({type(e).__name__}: {e})") from None
    model = BertForPreTraining(config, impl=impl, unpad=unpad)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights_path} does not fit its config.json ({str(e).splitlines()[0]} ...)") from None
    return model


# ---------------------------------------------------------------------------------------------- transformers
@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report and progress bars; we report missing heads ourselves."""
    import transformers

    level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _load_transformers(name_or_path: str, *, local_only: bool, impl, unpad):
    """(bertfast model, transformers' names of the freshly initialised weights)."""
    import transformers

    from bertfast.model.hf import from_hf_config

    where = name_or_path if os.path.isdir(name_or_path) else f"hub model {name_or_path!r}"
    with _quiet_transformers():
        try:
            hf_config = transformers.AutoConfig.from_pretrained(name_or_path, local_files_only=local_only)
        except OSError:
            if os.path.isdir(name_or_path):
                raise ValueError(f"{where}/config.json cannot be read; expected {EXPECTED}") from None
            raise
        except ValueError as e:
            raise ValueError(f"{where}: config.json is not a transformers config ({e})") from None
        if hf_config.model_type != "bert":
            raise ValueError(f"{where} holds a {hf_config.model_type!r} model; bertfast loads BERT models "
                             f"(model_type 'bert') only")
        try:
            from_hf_config(hf_config)  # refuses what bertfast cannot run (another activation)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        try:
            hf, info = transformers.BertForPreTraining.from_pretrained(
                name_or_path, local_files_only=local_only, output_loading_info=True)
        except OSError:
            raise
        except Exception as e:  # truncated / corrupt weights, shapes that do not match config.json
            raise ValueError(f"{where}: the weights cannot be read ({type(e).__name__}: {e}); is the file damaged? "
                             f"expected {EXPECTED}") from None
    missing = sorted(info.get("missing_keys", []))
    encoder_missing = [k for k in missing if k.startswith("bert.") and not k.startswith("bert.pooler.")]
    if encoder_missing:
        raise ValueError(f"{where}: the weights lack encoder parameters ({', '.join(encoder_missing[:3])}"
                         f"{' ...' if len(encoder_missing) > 3 else ''}); expected a BertModel, BertForMaskedLM or "
                         "BertForPreTraining")
    model = BertForPreTraining.from_hf(hf.eval(), impl=impl, unpad=unpad)
    return model, missing


# ---------------------------------------------------------------------------------------------- entry point
def load_pretrained(path_or_name: str | os.PathLike, *, device: str | torch.device = "cpu", tokenizer=None,
                    impl: str | dict = "auto", unpad: bool = True) -> Pretrained:
    """Load a BERT with its pretraining heads and its tokenizer (see the module docstring for what is accepted).

    Returns a `Pretrained` that unpacks as ``model, tokenizer`` (the model in eval mode on `device`; its
    BertConfig is ``model.config``, also ``.config``). ``tokenizer``: a name, folder or tokenizer to use instead of
    the one stored with the weights (needed for weights saved without one)."""
    src = os.fspath(path_or_name)
    if not src:
        raise ValueError(f"no model given: expected {EXPECTED}")
    src_abs = os.path.abspath(os.path.expanduser(src))
    if os.path.isdir(src_abs):
        if _is_run(src_abs):
            found = ckpt.find_latest_checkpoint(src_abs)
            if found is None:
                raise FileNotFoundError(f"{src}: the run folder has no checkpoint under "
                                        f"{os.path.join(src, ckpt.CHECKPOINT_DIR)} (did the run finish a step?)")
            if found.step < 0:
                raise ValueError(f"{src}: every checkpoint of the run is damaged: " + "; ".join(found.skipped))
            for msg in found.skipped:
                warnings.warn(f"{msg}; using the previous good checkpoint {os.path.basename(found.path)}",
                              stacklevel=2)
            model = _load_bertfast_checkpoint(found.path, impl=impl, unpad=unpad)
            tok = _tokenizer_from([os.path.join(found.path, "tokenizer"), os.path.join(src_abs, "tokenizer"), src_abs],
                                  f"the run folder {src}", tokenizer)
            out = Pretrained(model, tok, "run", found.path, step=found.step)
        elif _is_checkpoint(src_abs):
            model = _load_bertfast_checkpoint(src_abs, impl=impl, unpad=unpad)
            run = os.path.dirname(os.path.dirname(src_abs))
            tok = _tokenizer_from([os.path.join(src_abs, "tokenizer"), src_abs, os.path.join(run, "tokenizer")],
                                  f"the checkpoint {src}", tokenizer)
            m = re.match(r"^step_(\d+)$", os.path.basename(src_abs))
            out = Pretrained(model, tok, "checkpoint", src_abs, step=int(m.group(1)) if m else None)
        elif _is_transformers(src_abs):
            model, missing = _load_transformers(src_abs, local_only=True, impl=impl, unpad=unpad)
            tok = _tokenizer_from([src_abs], f"the transformers folder {src}", tokenizer)
            out = Pretrained(model, tok, "transformers", src_abs, new_weights=missing)
        elif os.path.isfile(os.path.join(src_abs, "config.json")):
            raise FileNotFoundError(f"{src}: config.json but no weights (model.safetensors / pytorch_model.bin); "
                                    f"expected {EXPECTED}")
        else:
            what = "is empty" if not os.listdir(src_abs) else "holds no model"
            raise FileNotFoundError(f"{src} {what}: expected {EXPECTED}")
    elif os.path.exists(src_abs):
        raise ValueError(f"{src} is a file; expected a folder: {EXPECTED}")
    elif _HUB_NAME.match(src) and not src.startswith((".", "~")):
        out = _load_hub(src, impl=impl, unpad=unpad, tokenizer=tokenizer)
    else:
        raise FileNotFoundError(f"{src}: no such folder; expected {EXPECTED}")
    _check_vocab(out.model, out.tokenizer, src)
    out.model.to(device).eval()
    return out


def _load_hub(name: str, *, impl, unpad, tokenizer) -> Pretrained:
    """A hub model from the local cache, else from the hub; a clear error when neither has it."""
    from bertfast.data.errors import DataError
    from bertfast.data.tokenizer import load_tokenizer

    errors = []
    for local_only in (True, False):
        if not local_only and _offline():
            break
        try:
            model, missing = _load_transformers(name, local_only=local_only, impl=impl, unpad=unpad)
        except OSError as e:  # not cached / not reachable / no such repository
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        try:
            tok = tokenizer if hasattr(tokenizer, "convert_tokens_to_ids") else load_tokenizer(tokenizer or name)
        except DataError as e:
            raise ValueError(f"hub model {name!r}: its tokenizer cannot be loaded ({e})") from None
        return Pretrained(model, tok, "hub", name, new_weights=missing)
    raise FileNotFoundError(
        f"{name!r} is not a local folder, and not a model in the local Hugging Face cache"
        + ("" if _offline() else " nor reachable on the hub") + f" ({'; '.join(errors) or 'offline'}). "
        f"Download it while online (huggingface-cli download {name}) or pass a local folder: {EXPECTED}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")


__all__ = ["Pretrained", "load_pretrained", "EXPECTED"]
