"""TrainConfig: every setting of a pretraining run, with the help text of its CLI flag; and validate_config, the
checks that run before anything is loaded or written.

Each field's metadata drives `python -m bertfast.pretrain` (bertfast/pretrain.py builds the parser from it) and
the flag table of docs/cli.md (`python -m bertfast.pretrain --flag-table` prints it; a test keeps them equal):
    help      the flag's help text (one sentence or two)
    group     model | data | optimisation | run (the --help sections)
    shown     how the default reads, when the value alone says too little (e.g. "trained" for tokenizer=None)
    metavar   the flag's value in the usage line, when its name would be misleading
    choices   the values argparse accepts
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

from bertfast.model.bert import PRESETS
from bertfast.train.precision import PRECISIONS

SEED_MAX = 2 ** 32 - 1  # numpy's legacy seeding takes 32 bits


def _opt(default, help: str, group: str, **meta):
    """A TrainConfig field with its CLI metadata (see the module docstring)."""
    meta.update(help=help, group=group)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# --lr and --warmup-steps when not given, by preset: the tiny preset of the default run learns much faster with 2e-3
# over 100 warmup steps (held-out MLM accuracy after its 810 steps 51-57% vs 27% with 1e-3 over 30; see
# docs/cli.md); the other presets keep 1e-3 over 30 steps
PRESET_LR_WARMUP = {"tiny": (2e-3, 100)}
DEFAULT_LR_WARMUP = (1e-3, 30)


@dataclass
class TrainConfig:
    """Everything a run depends on; each field is one CLI flag (`grad_accum` <-> `--grad-accum`)."""

    # ---- model
    preset: str = _opt("tiny", "model size: " + ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in PRESETS.items()),
                       "model")
    max_len: int = _opt(128, "longest training sequence in tokens", "model")
    max_position_embeddings: int = _opt(512, "the model's position table (>= --max-len): 512 lets a model trained "
                                        "at --max-len 128 continue at 512 (phase 2) and take 512-token inputs "
                                        "after export", "model")
    dropout: float | None = _opt(None, "hidden and attention dropout", "model", shown="preset's (0.1)")
    impl: str = _opt("auto", "op implementations: auto, triton, ext or torch; triton / ext apply to the ops that "
                     "have them, the others run as with auto (triton on a CPU needs TRITON_INTERPRET=1); the choice "
                     "per op is printed at start", "model")
    init_from: str | None = _opt(None, "start a new run from these weights: a run folder (its newest intact "
                                 "checkpoint), a checkpoint folder or a transformers folder; fresh optimizer, "
                                 "schedule and data position, the source's tokenizer (e.g. phase 2 of "
                                 "docs/recipes.md)", "model", metavar="PATH", shown="none")
    grad_checkpointing: bool = _opt(False, "recompute each encoder layer in the backward pass (less memory, ~30% "
                                    "more compute; same losses)", "model")
    compile: bool = _opt(False, "torch.compile the model: the first steps compile it (1-3 min for mini on 2 CPU "
                         "cores), then ~1.1x the eager step on CPU; not measured on a GPU", "model")
    # ---- data
    data: list[str] = _opt(["builtin"], "corpora: builtin, bookcorpus, wikipedia, or local .txt/.jsonl/.parquet "
                           "files, folders or globs; RATIO is the fraction of each (bookcorpus:0.1 wikipedia:1/41)",
                           "data", metavar="NAME[:RATIO]")
    tokenizer: str | None = _opt(None, "a hub name, local folder or vocab.txt; default: train a WordPiece "
                                 "vocabulary on the corpus (saved in OUTPUT_DIR/tokenizer)", "data",
                                 shown="trained")
    vocab_size: int = _opt(8192, "size of the trained vocabulary (a small corpus gives fewer; ignored with "
                           "--tokenizer); a new model's is the tokenizer's rounded up to a multiple of 8", "data")
    builtin_docs: int = _opt(1200, "documents in the built-in corpus", "data")
    num_workers: int = _opt(0, "data loader processes (results do not depend on it)", "data")
    num_proc: int | None = _opt(None, "processes preparing the corpus (sentence splitting, grouping, tokenizing, "
                                "pairing; capped at the cores; results do not depend on it)", "data", metavar="N",
                                shown="min(cores, 8)")
    streaming: bool = _opt(False, "read hub corpora as a stream: only the RATIO prefix is downloaded and written "
                           "to the datasets cache, no full copy (see docs/data.md for what is exact on resume)", "data")
    whole_word_masking: bool = _opt(False, "mask whole words (a token and its ## pieces) as Google's WWM models "
                                    "do, instead of single tokens", "data")
    sentences_per_doc: int | None = _opt(None, "local files with one sentence per row: group N consecutive rows "
                                         "into a document (NSP draws its 'next' sentences within one)", "data",
                                         metavar="N", shown="off")
    text_column: str = _opt("text", "the text column of hub: sources and local .jsonl / .parquet files", "data",
                            metavar="COLUMN")
    doc_column: str | None = _opt(None, "rows sharing a value of this column form one document, in order (e.g. "
                                  "doc_id); default: one document per row", "data", metavar="COLUMN", shown="off")
    eval_fraction: float = _opt(0.01, "hold out this fraction of the documents for evaluation (split before "
                                "pairs are built; 0: none)", "data")
    eval_data: list[str] | None = _opt(None, "evaluate on these corpora instead of a held-out fraction (0 "
                                       "--eval-fraction is implied)", "data", metavar="NAME[:RATIO]", shown="none")
    # ---- optimisation
    epochs: int = _opt(6, "passes over the data (when --max-steps is 0)", "optimisation")
    max_steps: int = _opt(0, "optimizer steps to run; > 0 overrides --epochs", "optimisation")
    batch_size: int = _opt(32, "sequences per device per micro-batch (global batch = this x devices x "
                           "--grad-accum)", "optimisation")
    grad_accum: int = _opt(1, "micro-batches per optimizer step", "optimisation")
    optimizer: str = _opt("adamw", "adamw (fused), or lamb (LAMB as NVIDIA's BERT: trust ratio on matrices only)",
                          "optimisation", choices=["adamw", "lamb"])
    lr: float | None = _opt(None, "peak learning rate", "optimisation", shown="2e-3 with tiny, else 1e-3")
    weight_decay: float = _opt(0.01, "decoupled weight decay on matrices (not on biases nor any LayerNorm weight)",
                               "optimisation")
    warmup_steps: int | None = _opt(None, "linear warmup from 0, then linear decay to 0 at the last step",
                                    "optimisation", shown="100 with tiny, else 30")
    clip_grad: float = _opt(1.0, "max global gradient norm (0: no clipping)", "optimisation")
    precision: str = _opt("fp32", "fp32, or torch.autocast to bf16 / fp16 on the device (fp16 adds a "
                          "GradScaler)", "optimisation", choices=list(PRECISIONS))
    max_bad_steps: int = _opt(5, "a non-finite loss skips its step (counted in skipped_steps); this many in a row "
                              "stop the run", "optimisation")
    seed: int = _opt(0, f"random seed of the weights, data order, masks and dropout (0 to {SEED_MAX})",
                     "optimisation")
    # ---- run
    device: str = _opt("auto", "auto (the GPU if there is one), cpu, cuda or cuda:N", "run")
    threads: int = _opt(0, "torch CPU threads (0: torch's default, divided among the processes of one machine)",
                        "run")
    output_dir: str = _opt("runs/bertfast", "where the run writes everything: metrics.jsonl, checkpoints/, "
                           "tokenizer/, train_config.json, model_config.json", "run")
    log_every: int = _opt(10, "steps per metrics.jsonl record", "run")
    eval_every: int | None = _opt(None, "steps between evaluations on the held-out data (0: never)", "run",
                                  shown="at every checkpoint and at the end")
    checkpoint_every: int = _opt(200, "steps between checkpoints (0: only at the end); one is always written at "
                                 "the end", "run")
    keep_checkpoints: int = _opt(3, "the newest K checkpoints are kept", "run")
    resume: bool = _opt(False, "continue from the newest intact checkpoint in --output-dir", "run")
    overwrite_output_dir: bool = _opt(False, "pretrain into an --output-dir that holds a fine-tuning run "
                                      "(results.json), replacing its metrics.jsonl, or --export-hf into a run's "
                                      "folder (both refused without this)", "run")
    export_hf: str | None = _opt(None, "at the end, write a transformers BertForPreTraining (config.json, "
                                 "model.safetensors) and the tokenizer to DIR", "run", metavar="DIR",
                                 shown="none")
    prepare_only: bool = _opt(False, "build the tokenizer and every cached dataset this command would use, say "
                              "where they are, their size and the time taken, and train nothing", "run")
    progress: bool = _opt(True, "--no-progress hides the tqdm progress bar and the `datasets` preparation bars",
                          "run")

    def __post_init__(self):
        """--lr / --warmup-steps not given (None): the preset's (PRESET_LR_WARMUP), recorded as numbers."""
        lr, warmup = PRESET_LR_WARMUP.get(self.preset, DEFAULT_LR_WARMUP) if isinstance(self.preset, str) \
            else DEFAULT_LR_WARMUP
        if self.lr is None:
            self.lr = lr
        if self.warmup_steps is None:
            self.warmup_steps = warmup


class ConfigError(ValueError):
    """A bad setting, reported before any work starts. `flag` names the CLI flag."""

    def __init__(self, flag: str, message: str):
        self.flag, self.message = flag, message
        super().__init__(f"argument {flag}: {message}")


def flag_of(name: str) -> str:
    """The CLI flag of a TrainConfig field (`progress`, on by default, is switched off by `--no-progress`)."""
    return "--no-progress" if name == "progress" else "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------- validation
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_types(cfg: TrainConfig) -> None:
    """Each field holds a value of its declared type (a TrainConfig built in Python gets no parsing)."""
    for f in dataclasses.fields(cfg):
        value, kind = getattr(cfg, f.name), str(f.type)
        optional = kind.endswith(" | None")
        base = kind.removesuffix(" | None")
        if value is None and optional:
            continue
        if base == "list[str]":
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            what = "a list of strings"
        else:
            ok = isinstance(value, _TYPES[base]) and (base == "bool" or not isinstance(value, bool))
            what = {"int": "an integer", "float": "a number", "str": "a string", "bool": "True or False"}[base]
        if not ok:
            raise ConfigError(flag_of(f.name), f"TrainConfig.{f.name} must be {what}"
                              f"{' or None' if optional else ''}, got {value!r} ({type(value).__name__})")


def _check_ranges(cfg: TrainConfig) -> None:
    def need(cond, flag, msg):
        if not cond:
            raise ConfigError(flag, msg)

    need(cfg.preset in PRESETS, "--preset", f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    need(cfg.batch_size >= 1, "--batch-size", f"must be a positive number of sequences per device, got "
         f"{cfg.batch_size}")
    need(cfg.grad_accum >= 1, "--grad-accum", f"must be >= 1 (1 = no accumulation), got {cfg.grad_accum}")
    need(cfg.epochs >= 1, "--epochs", f"must be >= 1, got {cfg.epochs}")
    need(cfg.max_steps >= 0, "--max-steps", f"must be >= 0 (0 = run --epochs), got {cfg.max_steps}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, "--lr", f"must be a positive learning rate (e.g. 1e-4), "
         f"got {cfg.lr}")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "--weight-decay",
         f"must be >= 0, got {cfg.weight_decay}")
    need(cfg.warmup_steps >= 0, "--warmup-steps", f"must be >= 0, got {cfg.warmup_steps}")
    need(cfg.clip_grad >= 0, "--clip-grad", f"must be >= 0 (0 disables clipping), got {cfg.clip_grad}")
    need(cfg.dropout is None or 0 <= cfg.dropout < 1, "--dropout", f"must be in [0, 1), got {cfg.dropout}")
    need(8 <= cfg.max_len <= 8192, "--max-len", f"must be in [8, 8192] tokens, got {cfg.max_len}")
    need(cfg.vocab_size >= 16, "--vocab-size", f"must be >= 16, got {cfg.vocab_size}")
    need(cfg.builtin_docs >= 2, "--builtin-docs", f"must be >= 2, got {cfg.builtin_docs}")
    need(cfg.precision in PRECISIONS, "--precision", f"choose one of {', '.join(PRECISIONS)}, got "
         f"{cfg.precision!r}")
    from bertfast.ops import IMPLS
    need(cfg.impl in IMPLS, "--impl", f"choose one of {', '.join(IMPLS)}, got {cfg.impl!r}")
    need(cfg.checkpoint_every >= 0, "--checkpoint-every", f"must be >= 0 (0 = only at the end), got "
         f"{cfg.checkpoint_every}")
    need(cfg.keep_checkpoints >= 1, "--keep-checkpoints", f"must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.log_every >= 1, "--log-every", f"must be >= 1, got {cfg.log_every}")
    need(cfg.num_workers >= 0, "--num-workers", f"must be >= 0, got {cfg.num_workers}")
    need(cfg.num_proc is None or cfg.num_proc >= 1, "--num-proc", f"must be >= 1 processes (leave it out for "
         f"min(cores, 8)), got {cfg.num_proc}")
    need(cfg.max_bad_steps >= 1, "--max-bad-steps", f"must be >= 1, got {cfg.max_bad_steps}")
    need(cfg.threads >= 0, "--threads", f"must be >= 0, got {cfg.threads}")
    need(0 <= cfg.seed <= SEED_MAX, "--seed", f"must be in [0, {SEED_MAX}], got {cfg.seed}")
    need(bool(cfg.data), "--data", "give at least one corpus (e.g. builtin)")
    need(cfg.max_position_embeddings >= cfg.max_len, "--max-position-embeddings",
         f"{cfg.max_position_embeddings} is less than --max-len {cfg.max_len}: the model needs a position for "
         "every token; raise it (BERT: 512)")
    need(cfg.max_position_embeddings <= 8192, "--max-position-embeddings", f"must be <= 8192, got "
         f"{cfg.max_position_embeddings}")
    need(cfg.optimizer in ("adamw", "lamb"), "--optimizer", f"choose adamw or lamb, got {cfg.optimizer!r}")
    need(cfg.sentences_per_doc is None or cfg.sentences_per_doc >= 1, "--sentences-per-doc",
         f"must be >= 1 rows per document, got {cfg.sentences_per_doc}")
    need(0 <= cfg.eval_fraction < 1, "--eval-fraction", f"must be in [0, 1), got {cfg.eval_fraction}")
    need(cfg.eval_every is None or cfg.eval_every >= 0, "--eval-every", f"must be >= 0 (0: never), got "
         f"{cfg.eval_every}")
    need(cfg.eval_data is None or len(cfg.eval_data) > 0, "--eval-data", "give at least one corpus")
    need(not (cfg.init_from and cfg.resume), "--init-from", "a resume continues from its own checkpoint: drop "
         "--init-from (it starts a new run from other weights)")


def _check_device(cfg: TrainConfig) -> None:
    def need(cond, flag, msg):
        if not cond:
            raise ConfigError(flag, msg)

    dev = cfg.device
    if dev != "auto":
        try:
            d = torch.device(dev)
        except (RuntimeError, ValueError):
            raise ConfigError("--device", f"{dev!r} is not a device; use auto, cpu, cuda or cuda:N") from None
        need(d.type in ("cpu", "cuda"), "--device", f"{dev!r}: bertfast trains on cpu or cuda")
        if d.type == "cuda":
            need(torch.cuda.is_available(), "--device", f"{dev!r} asked but no CUDA GPU is visible; use "
                 "--device cpu (or auto)")
            need(d.index is None or d.index < torch.cuda.device_count(), "--device",
                 f"{dev!r}: only {torch.cuda.device_count()} GPU(s) visible")
    on_cpu = torch.device(dev).type == "cpu" if dev != "auto" else not torch.cuda.is_available()
    if cfg.impl == "triton" and on_cpu:
        from bertfast.kernels._launch import interpreter_on

        need(interpreter_on(), "--impl", "triton on the CPU needs Triton's interpreter (slow: it is for tests), which "
             "is off: set TRITON_INTERPRET=1 in the environment, or use --impl auto (or torch) on the CPU")


def check_writable(path: str, flag: str) -> None:
    probe_dir = os.path.abspath(path)
    while not os.path.exists(probe_dir):  # the nearest existing ancestor must let us create the folder
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(flag, f"{path!r} exists and is not a folder; choose another path")
    if not (os.path.isdir(probe_dir) and os.access(probe_dir, os.W_OK | os.X_OK)):
        raise ConfigError(flag, f"{path!r} is not writable ({probe_dir!r} does not allow creating files); "
                          "choose a folder you can write to")


def check_settings(cfg: TrainConfig) -> None:
    """The checks that need nothing but the config (and the machine): types, ranges, device, writable folders."""
    _check_types(cfg)
    _check_ranges(cfg)
    _check_device(cfg)
    check_writable(cfg.output_dir, "--output-dir")
    if cfg.export_hf:
        check_writable(cfg.export_hf, "--export-hf")


# ---------------------------------------------------------------------------------------------- model config
def model_fields(cfg: TrainConfig) -> dict:
    """The BertConfig fields the TrainConfig decides (the vocabulary comes from the tokenizer)."""
    from bertfast.model.bert import PRESETS as presets

    layers, hidden = presets[cfg.preset]
    d = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
             intermediate_size=4 * hidden, max_len=cfg.max_position_embeddings)
    if cfg.dropout is not None:
        d.update(dropout=cfg.dropout, attention_dropout=cfg.dropout)
    return d


VOCAB_MULTIPLE = 8  # a new model's vocabulary is the tokenizer's rounded up to this (tensor-core aligned decoder)


def padded_vocab_size(n_tokens: int) -> int:
    """The tokenizer's size rounded up to a multiple of VOCAB_MULTIPLE: the decoder's output dimension (and the
    logits' row stride) stay aligned for the GPU's matrix units, as NVIDIA's BERT pads 30522 to 30528. The extra
    ids are never input nor target; their logits only join the softmax, and training pushes them down."""
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_model_config(cfg: TrainConfig, tokenizer, vocab_size: int | None = None):
    """The BertConfig of a run: the preset and flags, the tokenizer's vocabulary padded (padded_vocab_size), or
    ``vocab_size`` where one must be kept (--init-from, a resumed checkpoint)."""
    from bertfast.model.bert import BertConfig

    extra = {k: v for k, v in model_fields(cfg).items()
             if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    return BertConfig.preset(cfg.preset, vocab_size=vocab_size or padded_vocab_size(len(tokenizer)),
                             pad_token_idx=tokenizer.pad_token_id, **extra)


def data_arguments(cfg: TrainConfig, tokenizer) -> dict:
    """``load_data``'s arguments that decide what is prepared and cached (the corpus, the tokenizer, the pairs):
    the training run and --prepare-only pass the same, so the one finds what the other prepared."""
    from bertfast.data.loader import default_procs

    return dict(name=cfg.data, tokenizer=tokenizer, vocab_size=cfg.vocab_size, max_len=cfg.max_len, seed=cfg.seed,
                builtin_docs=cfg.builtin_docs, whole_word_masking=cfg.whole_word_masking,
                sentences_per_doc=cfg.sentences_per_doc, text_column=cfg.text_column, doc_column=cfg.doc_column,
                eval_fraction=0.0 if cfg.eval_data else cfg.eval_fraction, eval_data=cfg.eval_data,
                num_proc=cfg.num_proc or default_procs(), streaming=cfg.streaming)
