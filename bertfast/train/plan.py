"""Before a run does any work: every check that can be made without loading data, and the one checkpoint lookup
of a resume. `plan_run(cfg)` returns a RunPlan the trainer follows (it never looks the checkpoint up again).

Resume policy, per TrainConfig field, comparing with the train_config saved in the checkpoint:
  kept from the checkpoint: with `given` (the fields the command line set), every other field takes the
      checkpoint's value, so `--resume --output-dir DIR` alone continues the run as it was started; without it
      (the Python API) every field is as the TrainConfig says.
  refused (ConfigError before any data loads): what the data stream, the model or the tokenizer depend on:
      RESUME_MUST_MATCH below; the tokenizer itself is compared by fingerprint, not by name.
  applied from the resumed step, and said at start: every other field (lr, weight decay, warmup, epochs /
      max steps, clipping, precision, logging and checkpoint cadence, ...); --lr, --warmup-steps and the total
      steps reshape the learning-rate schedule from that step on.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from bertfast.train import checkpoint as ckpt
from bertfast.train.config import ConfigError, TrainConfig, check_settings, flag_of, model_fields

# the data order, split and masks (data, builtin_docs, seed, batch_size, grad_accum, whole_word_masking,
# sentences_per_doc, text_column, doc_column, eval_fraction, eval_data), the model (preset, max_len, max_position_embeddings, dropout), the
# trained vocabulary (vocab_size) and the optimizer's state (optimizer)
RESUME_MUST_MATCH = ("preset", "max_len", "max_position_embeddings", "dropout", "data", "builtin_docs", "vocab_size",
                     "seed", "batch_size", "grad_accum", "whole_word_masking", "sentences_per_doc", "text_column",
                     "doc_column", "eval_fraction", "eval_data", "optimizer")
RESUME_IGNORED = ("output_dir", "resume", "tokenizer", "init_from", "overwrite_output_dir")  # the tokenizer: checked by fingerprint


@dataclass
class RunPlan:
    cfg: TrainConfig
    resume_from: ckpt.FoundCheckpoint | None = None  # the intact checkpoint a resume starts from
    saved_state: dict | None = None  # its state.pt (optimizer, data position, RNG, run state)
    tokenizer: object | None = None  # a resume's tokenizer, loaded and checked against the checkpoint
    notes: list[str] = field(default_factory=list)  # said at start (skipped checkpoints, applied changes)
    restore_tokenizer: bool = False  # OUTPUT_DIR/tokenizer is missing: put the checkpoint's copy back
    init: object | None = None  # --init-from: the bertfast.train.pretrained.Pretrained (model, tokenizer) to start from

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None

    def total_steps(self, batches_per_epoch: int) -> int:
        return self.cfg.max_steps or (self.cfg.epochs * batches_per_epoch) // self.cfg.grad_accum

    def kept_vocab_size(self) -> int | None:
        """The model vocabulary a run must keep: --init-from's, or the resumed checkpoint's (a run started before
        the vocabulary was padded to a multiple of 8 resumes unpadded); None for a new model."""
        if self.init is not None:
            return self.init.model.config.vocab_size
        if self.resuming:
            with open(os.path.join(self.resume_from.path, "config.json")) as f:
                return json.load(f).get("vocab_size")
        return None

    @property
    def nothing_left(self) -> bool:
        """A resume of a run already at its last step (known before any data loads)."""
        if not self.resuming:
            return False
        bpe = self.saved_state.get("data", {}).get("batches_per_epoch")
        if not self.cfg.max_steps and bpe is None:
            return False
        return int(self.saved_state["step"]) >= self.total_steps(bpe or 0)


def plan_run(cfg: TrainConfig, given=None) -> RunPlan:
    """`given`: the names of the fields set explicitly (by the CLI's flags); on a resume the others take the
    checkpoint's values. None: every field as `cfg` says."""
    check_settings(cfg)
    plan = RunPlan(cfg)
    if not cfg.resume:
        _check_data(cfg)
        found = ckpt.find_latest_checkpoint(cfg.output_dir)  # None without checkpoints; step -1: all corrupt
        if found is not None and found.step >= 0:
            raise ConfigError("--output-dir", f"{cfg.output_dir!r} already holds a run (its latest checkpoint is at "
                              f"step {found.step}); a new run there would mix its metrics and checkpoints with that "
                              "one's. Continue it with --resume, or choose a new --output-dir.")
        if cfg.init_from:
            plan.init = _init_source(cfg)
        return plan
    found = ckpt.find_latest_checkpoint(cfg.output_dir)
    if found is None or found.step < 0:
        why = ("; ".join(found.skipped) if found else
               f"no checkpoint under {os.path.join(cfg.output_dir, ckpt.CHECKPOINT_DIR)}")
        raise ConfigError("--resume", f"nothing to resume in --output-dir {cfg.output_dir!r} ({why}). Drop "
                          "--resume to start a new run, or point --output-dir at the run to continue.")
    plan.resume_from = found
    plan.notes += [f"warning: {m}; using the previous good checkpoint {os.path.basename(found.path)}"
                   for m in found.skipped]
    plan.saved_state = _load_state(found.path)
    if given is not None:
        plan.cfg = _keep_saved_settings(plan, set(given))
    plan.cfg = cfg = _positions_of_older_runs(plan)
    _check_data(cfg)
    _check_model_matches(cfg, found.path)
    _check_resume_settings(plan)
    plan.tokenizer = _resume_tokenizer(plan)
    return plan


def _keep_saved_settings(plan: RunPlan, given: set) -> TrainConfig:
    """The checkpoint's value for every field the command line did not set (its flags' defaults are not a request
    to change the run); checked again, since the saved values come from a file."""
    saved = plan.saved_state.get("train_config", {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    keep = {k: v for k, v in saved.items() if k in names and k not in given and k not in RESUME_IGNORED}
    cfg = dataclasses.replace(plan.cfg, **keep)
    differ = [f"{flag_of(k)} {v!r}" for k, v in sorted(keep.items()) if _differs(v, getattr(plan.cfg, k))]
    if differ:
        plan.notes.append(f"note: kept from checkpoint {os.path.basename(plan.resume_from.path)} (not given on the "
                          f"command line): {', '.join(differ)}")
    try:
        check_settings(cfg)
    except ConfigError as e:
        raise ConfigError(e.flag, f"{e.message} (a setting kept from checkpoint "
                          f"{os.path.basename(plan.resume_from.path)}; give it on the command line)") from None
    return cfg


def _positions_of_older_runs(plan: RunPlan) -> TrainConfig:
    """Runs from before --max-position-embeddings had as many positions as --max-len: resume them so."""
    cfg, saved = plan.cfg, plan.saved_state.get("train_config", {})
    if "max_position_embeddings" in saved:
        return cfg
    with open(os.path.join(plan.resume_from.path, "config.json")) as f:
        positions = json.load(f).get("max_len", cfg.max_position_embeddings)
    if positions != cfg.max_position_embeddings and positions >= cfg.max_len:
        plan.notes.append(f"note: the run predates --max-position-embeddings; its model has {positions} positions, "
                          "kept")
        return dataclasses.replace(cfg, max_position_embeddings=positions)
    return cfg


def _init_source(cfg: TrainConfig):
    """--init-from: load the weights and their tokenizer; refuse another architecture or another --tokenizer."""
    from bertfast.train.pretrained import load_pretrained

    try:
        init = load_pretrained(cfg.init_from)
    except (OSError, ValueError, ckpt.CheckpointError) as e:
        raise ConfigError("--init-from", f"cannot start from {cfg.init_from!r}: {e}") from None
    if cfg.tokenizer:
        other = _load_tokenizer(cfg.tokenizer, "--tokenizer")
        if ckpt.tokenizer_fingerprint(other) != ckpt.tokenizer_fingerprint(init.tokenizer):
            raise ConfigError("--tokenizer", f"{cfg.tokenizer!r} is not the tokenizer of --init-from "
                              f"{cfg.init_from!r}: the weights' token ids would not match. Drop --tokenizer (the "
                              "source's is used).")
    src, want = init.model.config.to_dict(), model_fields(cfg)  # vocab_size: the source's is kept
    diff = [f"{k}: source {src.get(k)!r} vs now {v!r}" for k, v in want.items()
            if k not in ("dropout", "attention_dropout") and src.get(k) != v]
    if diff:
        raise ConfigError("--init-from", f"{cfg.init_from!r} holds another model configuration ({', '.join(diff)}). "
                          "Use the source's --preset and --max-position-embeddings.")
    return init


def _check_data(cfg: TrainConfig) -> None:
    """The corpora exist and are readable text (bertfast.data.check_sources: no dataset is read)."""
    from bertfast.data import DataError, check_sources

    columns = dict(sentences_per_doc=cfg.sentences_per_doc, text_column=cfg.text_column, doc_column=cfg.doc_column)
    try:
        check_sources(cfg.data, **columns)
    except DataError as e:
        raise ConfigError("--data", str(e)) from None
    try:
        if cfg.eval_data:
            check_sources(cfg.eval_data, **columns)
    except DataError as e:
        raise ConfigError("--eval-data", str(e)) from None


def _load_state(path: str) -> dict:
    import torch

    # our own file, written by save_checkpoint and verified against its manifest: it holds numpy RNG state
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)


def _check_model_matches(cfg: TrainConfig, path: str) -> None:
    """The part of the model config known before the data is loaded must match the checkpoint's."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return  # verified already; the full check after loading reports anything else
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in model_fields(cfg).items()
            if saved.get(k) != v]
    if diff:
        raise ConfigError("--resume", f"checkpoint {os.path.basename(path)} was written for another model "
                          f"configuration ({', '.join(diff)}). Resume with the same --preset / "
                          "--max-position-embeddings / --dropout, or use a new --output-dir.")


def _check_resume_settings(plan: RunPlan) -> None:
    """Refuse a change the data stream or the model depends on; list the others as applied from this step."""
    cfg, saved = plan.cfg, plan.saved_state.get("train_config", {})
    name = os.path.basename(plan.resume_from.path)
    changed = [(k, saved[k], getattr(cfg, k)) for k in sorted(saved)
               if hasattr(cfg, k) and k not in RESUME_IGNORED and _differs(saved[k], getattr(cfg, k))]
    refused = [(k, a, b) for k, a, b in changed if k in RESUME_MUST_MATCH]
    if refused:
        what = ", ".join(f"{flag_of(k)} {b!r} (checkpoint: {a!r})" for k, a, b in refused)
        verb, them = ("differs", "it") if len(refused) == 1 else ("differ", "them")
        raise ConfigError("--resume", f"{what} {verb} from the run in checkpoint {name}; the data order, masks, "
                          f"model or vocabulary depend on {them}, so a resume must keep {them}. Resume with the run's "
                          "values (see its train_config.json), or start a new run in another --output-dir.")
    applied = [(k, a, b) for k, a, b in changed if k not in RESUME_MUST_MATCH]
    if applied:
        plan.notes.append("note: changed since checkpoint " + name + ", applied from this step: " +
                          ", ".join(f"{flag_of(k)} {a!r} -> {b!r}" for k, a, b in applied))


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) != list(b)
    return a != b


def _resume_tokenizer(plan: RunPlan):
    """The run's tokenizer, refused unless it is the one the checkpoint was trained with (by fingerprint): --tokenizer
    if given, else OUTPUT_DIR/tokenizer, else the copy stored in the checkpoint (put back in OUTPUT_DIR once every
    check passed). A resume never trains a vocabulary: new ids under trained embeddings would scramble the model."""
    cfg, path = plan.cfg, plan.resume_from.path
    name = os.path.basename(path)
    run_dir = os.path.join(cfg.output_dir, "tokenizer")
    stored = ckpt.checkpoint_tokenizer(path).dir
    if cfg.tokenizer:
        src, flag = cfg.tokenizer, "--tokenizer"
    elif os.path.isdir(run_dir):
        src, flag = run_dir, "--resume"
    elif stored is not None:
        src, flag = stored, "--resume"
        plan.notes.append(f"note: {run_dir} is missing; using the tokenizer stored in checkpoint {name} (copied "
                          "back there)")
        plan.restore_tokenizer = True
    else:
        raise ConfigError("--resume", f"the run's tokenizer folder {run_dir!r} is missing and checkpoint {name} holds "
                          "no copy; a resume never trains a new vocabulary (the token ids would move under the "
                          "trained embeddings). Restore that folder, or pass --tokenizer with the tokenizer the run "
                          "was trained with.")
    tok = _load_tokenizer(src, flag)
    try:
        recorded = ckpt.check_tokenizer(path, tok)
    except ckpt.CheckpointError as e:
        fix = (" Remove that folder to use the checkpoint's own copy, or restore the run's tokenizer there."
               if src == run_dir and stored is not None else "")
        raise ConfigError(flag, f"{e} (the tokenizer came from {src}).{fix}") from None
    if not recorded:  # a checkpoint from before tokenizer records: the vocabulary size is all there is to compare
        with open(os.path.join(path, "config.json")) as f:
            saved_vocab = json.load(f).get("vocab_size")
        if saved_vocab != len(tok):
            raise ConfigError(flag, f"the tokenizer in {src!r} has {len(tok)} tokens, checkpoint {name} was trained "
                              f"with {saved_vocab}: resume with the run's own tokenizer")
        plan.notes.append(f"note: checkpoint {name} does not record its tokenizer; only the vocabulary size of {src} "
                          "could be checked")
    return tok


def _load_tokenizer(src: str, flag: str):
    from bertfast.data import DataError
    from bertfast.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(src)
    except DataError as e:
        raise ConfigError(flag, f"cannot load the run's tokenizer: {e}") from None
