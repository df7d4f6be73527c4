"""`python -m bertfast.finetune`: fine-tune a pretrained BERT on a classification or regression task.

    python -m bertfast.finetune --model runs/bertfast --task builtin --lr 5e-4 --epochs 10   # tiny model: more lr
    python -m bertfast.finetune --model runs/bertfast --task builtin --lr 5e-4 --epochs 10 --from-scratch  # baseline
    python -m bertfast.finetune --model bert-base-uncased --task glue/mrpc --lr 2e-5 --epochs 3
    python -m bertfast.finetune --model runs/bertfast --train train.csv --validation dev.csv \
        --text-column review --label-column stars

The model is a `bertfast.BertForSequenceClassification` (the unpadded encoder and kernels of pretraining, a
classifier on the pooled [CLS] vector) initialised from `--model` (see bertfast.train.pretrained for what it takes),
or with fresh weights of the same architecture under `--from-scratch`. The recipe is BERT's: AdamW, linear warmup
over `--warmup-ratio` of the steps then linear decay to 0, gradient clipping at 1. After each epoch the
validation split is scored; `--output-dir` gets `metrics.jsonl` (one record per epoch) and `results.json` (the
last epoch's metrics by name, with what was run). See docs/finetune.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from bertfast._cli import Parser
from bertfast.train.precision import PRECISIONS, autocast as _autocast
from bertfast.downstream.tasks import TASKS, TaskData, TaskError, compute_metrics, load_task


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; the CLI flags map 1:1 onto the fields (--batch-size ->
    batch_size)."""

    model: str = ""
    task: str | None = None  # "builtin", "glue/NAME"; None: --train / --validation files
    train: str | None = None
    validation: str | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    glue_dir: str | None = None  # a local copy of the hub's nyu-mll/glue parquet files
    builtin_train: int = 2000  # examples of the built-in task
    builtin_validation: int = 1000
    tokenizer: str | None = None  # instead of the one stored with the model
    from_scratch: bool = False
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    max_len: int | None = None  # None: 128, or the model's position embeddings if fewer
    seed: int = 0
    precision: str = "fp32"
    impl: str = "auto"
    device: str = "auto"
    output_dir: str = "runs/finetune"
    export_hf: str | None = None
    overwrite_output_dir: bool = False  # write into a folder that holds a pretraining run
    progress: bool = True


class ConfigError(ValueError):
    """A bad setting, found before any work; `flag` names the CLI flag."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"argument {flag}: {message}")


def validate_config(cfg: FinetuneConfig) -> None:
    def need(cond, flag, msg):
        if not cond:
            raise ConfigError(flag, msg)

    need(bool(cfg.model), "--model", "name the pretrained model: a bertfast run folder or checkpoint, a "
         "transformers folder or a hub name")
    need(cfg.task is None or cfg.task in TASKS or cfg.task.startswith("glue/"), "--task",
         f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}, or give --train/--validation files")
    need(cfg.builtin_train >= 2, "--builtin-train", f"must be >= 2, got {cfg.builtin_train}")
    need(cfg.builtin_validation >= 2, "--builtin-validation", f"must be >= 2, got {cfg.builtin_validation}")
    need(cfg.epochs >= 1, "--epochs", f"must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, "--batch-size", f"must be >= 1, got {cfg.batch_size}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, "--lr", f"must be a positive learning rate (e.g. 5e-5), got {cfg.lr}")
    need(0 <= cfg.warmup_ratio < 1, "--warmup-ratio", f"must be in [0, 1), got {cfg.warmup_ratio}")
    need(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "--weight-decay",
         f"must be >= 0, got {cfg.weight_decay}")
    need(cfg.clip_grad >= 0, "--clip-grad", f"must be >= 0 (0: off), got {cfg.clip_grad}")
    need(cfg.max_len is None or cfg.max_len >= 8, "--max-len", f"must be >= 8 tokens, got {cfg.max_len}")
    need(cfg.precision in PRECISIONS, "--precision", f"choose one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.device != "auto":
        try:
            dev = torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError("--device", f"{cfg.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
        need(dev.type in ("cpu", "cuda"), "--device", f"{cfg.device!r}: use auto, cpu, cuda or cuda:N")
        need(dev.type != "cuda" or torch.cuda.is_available(), "--device",
             f"{cfg.device!r} asked but no CUDA GPU is visible; use --device cpu (or auto)")
    for flag, path in (("--output-dir", cfg.output_dir), ("--export-hf", cfg.export_hf)):
        if path:
            need(not os.path.exists(path) or os.path.isdir(path), flag, f"{path!r} exists and is not a folder")


def _device(cfg: FinetuneConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


# ---------------------------------------------------------------------------------------------- data
class _Encoded:
    """A split tokenized once: token ids per example (unpadded) and the labels."""

    def __init__(self, tokenizer, examples, max_len: int, regression: bool):
        enc = tokenizer(examples.text, examples.text_pair, truncation=True, max_length=max_len)
        self.input_ids = enc["input_ids"]
        self.token_type_ids = enc.get("token_type_ids") or [[0] * len(x) for x in self.input_ids]
        dtype = torch.float32 if regression else torch.long
        self.labels = torch.tensor(examples.labels, dtype=dtype)

    def __len__(self):
        return len(self.input_ids)

    def batch(self, idx, pad_id: int) -> dict:
        """Padded to the longest sequence of the batch; the unpadded encoder spends nothing on the padding."""
        n = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
        types = torch.zeros((len(idx), n), dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        for r, i in enumerate(idx):
            k = len(self.input_ids[i])
            ids[r, :k] = torch.tensor(self.input_ids[i])
            types[r, :k] = torch.tensor(self.token_type_ids[i])
            mask[r, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": self.labels[idx]}


# ---------------------------------------------------------------------------------------------- model
def build_model(cfg: FinetuneConfig, pre, task: TaskData):
    """The classifier: the encoder of `pre` (a bertfast.train.pretrained.Pretrained) and a fresh classifier, or fresh
    weights everywhere under --from-scratch. Seeded by cfg.seed (the classifier's initial weights)."""
    from bertfast import BertForSequenceClassification

    problem = "regression" if task.regression else "single_label_classification"
    torch.manual_seed(cfg.seed)
    if cfg.from_scratch:
        return BertForSequenceClassification(pre.config, task.num_labels, problem, impl=cfg.impl, unpad=True)
    return BertForSequenceClassification.from_hf(pre.model.to_hf_state_dict(), config=pre.config,
                                                 num_labels=task.num_labels, problem_type=problem, impl=cfg.impl,
                                                 unpad=True)


def _param_groups(model, weight_decay: float):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def export_hf(model, task: TaskData, tokenizer, output_dir: str) -> str:
    """A transformers BertForSequenceClassification folder (config with the label names, weights, tokenizer)."""
    import transformers

    from bertfast.model.hf import to_hf_config

    hf_config = to_hf_config(model.config)
    hf_config.num_labels = task.num_labels
    hf_config.problem_type = "regression" if task.regression else "single_label_classification"
    if not task.regression:
        hf_config.id2label = dict(enumerate(task.label_names))
        hf_config.label2id = {n: i for i, n in enumerate(task.label_names)}
    hf = transformers.BertForSequenceClassification(hf_config)
    hf.load_state_dict(model.to_hf_state_dict(), strict=True)
    os.makedirs(output_dir, exist_ok=True)
    hf.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


# ---------------------------------------------------------------------------------------------- the run
@torch.no_grad()
def evaluate(model, data: _Encoded, task: TaskData, *, batch_size: int, pad_id: int, device, autocast) -> dict:
    """The task's metrics and the mean loss over a split, in eval mode."""
    was = model.training
    model.eval()
    preds, loss_sum = [], 0.0
    try:
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            b = {k: v.to(device) for k, v in data.batch(idx, pad_id).items()}
            with autocast():
                out = model(**b)
            loss_sum += float(out.loss) * len(idx)
            logits = out.logits.float()
            preds.append(logits.squeeze(-1) if task.regression else logits.argmax(-1))
    finally:
        model.train(was)
    p = torch.cat(preds).cpu().numpy()
    return {"eval_loss": loss_sum / len(data), **compute_metrics(task.metrics, p, data.labels.numpy())}


class FinetuneError(RuntimeError):
    """The run had to stop (a non-finite training loss): exit 1, nothing exported."""


def run(cfg: FinetuneConfig, *, log=print) -> dict:
    """Fine-tune as `cfg` says; returns what results.json holds. Raises ConfigError (a bad setting or --model) or
    TaskError (bad task data), both before any training; OutputDirBusy while another run writes --output-dir (or
    --export-hf); FinetuneError when the training loss turns non-finite."""
    validate_config(cfg)
    with _output_locks(cfg, log):
        task = load_task(cfg.task, train=cfg.train, validation=cfg.validation, text_column=cfg.text_column,
                         text_pair_column=cfg.text_pair_column, label_column=cfg.label_column,
                         glue_dir=cfg.glue_dir, builtin_train=cfg.builtin_train,
                         builtin_validation=cfg.builtin_validation)
        pre, max_len = _load_model(cfg)
        return _run(cfg, task, pre, max_len, log)


@contextlib.contextmanager
def _output_locks(cfg: FinetuneConfig, log):
    """One writer per folder (bertfast.train.lock): --output-dir's lock (and --export-hf's) for the whole run; a
    folder that holds a pretraining run is refused unless --overwrite-output-dir."""
    from bertfast.train.lock import PRETRAINING, RunLock, describe_kind, folder_kind, refuse_run_as_export

    with contextlib.ExitStack() as stack:
        folders = [(cfg.output_dir, "--output-dir")]
        if cfg.export_hf and os.path.realpath(cfg.export_hf) != os.path.realpath(cfg.output_dir):
            folders.append((cfg.export_hf, "--export-hf"))
        for folder, flag in folders:
            lock = stack.enter_context(RunLock(folder, flag))
            if lock.took_over:
                log(lock.took_over)
        kind = folder_kind(cfg.output_dir)
        if kind == PRETRAINING and not cfg.overwrite_output_dir:
            raise ConfigError("--output-dir", f"{describe_kind(cfg.output_dir, kind)}; fine-tuning there would "
                              "replace its metrics.jsonl (the pretraining history). Choose another --output-dir "
                              "(e.g. a subfolder), or pass --overwrite-output-dir to write there anyway")
        try:
            refuse_run_as_export(cfg.export_hf, cfg.output_dir, cfg.overwrite_output_dir)
        except ValueError as e:  # train's ConfigError: this program's, with the same flag and words
            raise ConfigError(e.flag, e.message) from None
        yield


def _load_model(cfg: FinetuneConfig):
    """(the pretrained model, the max_len to use); ConfigError for a --model / --tokenizer / --max-len that does
    not work."""
    from bertfast.train.pretrained import load_pretrained

    try:
        pre = load_pretrained(cfg.model, tokenizer=cfg.tokenizer)
    except (FileNotFoundError, ValueError) as e:  # ValueError includes bertfast.data's DataError (tokenizer)
        raise ConfigError("--tokenizer" if cfg.tokenizer and "tokenizer" in str(e) else "--model", str(e)) from None
    model_max = pre.config.max_len
    if cfg.max_len is not None and cfg.max_len > model_max:
        raise ConfigError("--max-len", f"{cfg.max_len} is longer than the model's {model_max} position embeddings")
    return pre, cfg.max_len or min(128, model_max)


@dataclass
class _Fit:
    """The training objects of one fine-tuning run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object
    scaler: torch.amp.GradScaler
    autocast: object
    gen: torch.Generator
    device: torch.device
    steps_per_epoch: int
    total: int
    warmup: int


def _setup(cfg: FinetuneConfig, pre, task: TaskData, n_train: int) -> _Fit:
    """Model (seeded by cfg.seed), AdamW, warmup-then-linear-decay schedule, precision, the data-order generator;
    then the dropout stream is seeded."""
    device = _device(cfg)
    model = build_model(cfg, pre, task).to(device)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    amp = PRECISIONS[cfg.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + 1)  # dropout
    return _Fit(model=model, optimizer=optimizer, schedule=schedule, scaler=scaler,
                autocast=lambda: _autocast(device.type, amp), gen=gen, device=device,
                steps_per_epoch=steps_per_epoch, total=total, warmup=warmup)


def _train_step(cfg: FinetuneConfig, fit: _Fit, b: dict, step: int) -> float:
    """One optimizer step on batch `b` (step: its number, from 1); its loss, FinetuneError if not finite."""
    with fit.autocast():
        out = fit.model(**b)
    fit.scaler.scale(out.loss).backward()
    if fit.scaler.is_enabled():
        fit.scaler.unscale_(fit.optimizer)
    if cfg.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(fit.model.parameters(), cfg.clip_grad)
    fit.scaler.step(fit.optimizer)
    fit.scaler.update()
    fit.optimizer.zero_grad(set_to_none=True)
    fit.schedule.step()
    loss = float(out.loss.detach())
    if not math.isfinite(loss):
        raise FinetuneError(f"non-finite training loss at step {step}; stopped, nothing exported and no "
                            f"results.json written: lower --lr or use --precision fp32")
    return loss


def _epochs(cfg: FinetuneConfig, fit: _Fit, data, task: TaskData, pad_id: int, bar, say, mf):
    """Every epoch: its batches in a fresh order, then the validation metrics (one metrics.jsonl record each).
    Returns (the last epoch's record, the step count)."""
    train, val = data
    step, record = 0, {}
    fit.model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=fit.gen).tolist()
        loss_sum, seen = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            b = {k: v.to(fit.device) for k, v in train.batch(idx, pad_id).items()}
            step += 1
            loss = _train_step(cfg, fit, b, step)
            loss_sum, seen = loss_sum + loss * len(idx), seen + len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        ev = evaluate(fit.model, val, task, batch_size=2 * cfg.batch_size, pad_id=pad_id, device=fit.device,
                      autocast=fit.autocast)
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / seen,
                  "lr": fit.schedule.get_last_lr()[0], **ev}
        mf.write(json.dumps(record) + "\n")
        mf.flush()
        say(f"epoch {epoch + 1}: train_loss={record['train_loss']:.4f} eval_loss={ev['eval_loss']:.4f} " +
            " ".join(f"{m}={ev[m]:.4f}" for m in task.metrics))
    return record, step


def _run(cfg: FinetuneConfig, task: TaskData, pre, max_len: int, log) -> dict:
    """Encode, train, score, write results.json and the export (under the folders' locks)."""
    tok = pre.tokenizer
    t0 = time.perf_counter()
    train = _Encoded(tok, task.train, max_len, task.regression)
    val = _Encoded(tok, task.validation, max_len, task.regression)
    fit = _setup(cfg, pre, task, len(train))
    where = "fresh weights (--from-scratch) of " if cfg.from_scratch else ""
    log(f"bertfast fine-tuning: {task.name}, {len(train)} train / {len(val)} validation examples, "
        + ("regression" if task.regression else f"{task.num_labels} classes ({', '.join(task.label_names)})"))
    log(f"  model: {where}{pre.describe()}")
    log(f"  {cfg.epochs} epochs x {fit.steps_per_epoch} steps, batch {cfg.batch_size}, lr {cfg.lr}, warmup "
        f"{fit.warmup} steps, max_len {max_len}, {cfg.precision} on {fit.device}")
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=fit.total, desc="finetune", dynamic_ncols=True, file=sys.stderr)
    try:
        with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w") as mf:
            record, step = _epochs(cfg, fit, (train, val), task, tok.pad_token_id,
                                   bar, bar.write if bar is not None else log, mf)
    finally:
        if bar is not None:
            bar.close()
    results = {"task": task.name, "model": cfg.model, "from_scratch": cfg.from_scratch, "seed": cfg.seed,
               **{m: record[m] for m in task.metrics}, "eval_loss": record["eval_loss"],
               "train_loss": record["train_loss"], "epochs": cfg.epochs, "steps": step,
               "num_train": len(train), "num_validation": len(val),
               "labels": None if task.regression else task.label_names, "regression": task.regression,
               "max_len": max_len, "time_s": round(time.perf_counter() - t0, 1),
               "config": dataclasses.asdict(cfg)}
    _write_outputs(cfg, results, fit.model, task, tok, log)
    return results


def _write_outputs(cfg: FinetuneConfig, results: dict, model, task: TaskData, tok, log) -> None:
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    log("results: " + ", ".join(f"{m}={results[m]:.4f}" for m in task.metrics) +
        f" -> {os.path.join(cfg.output_dir, 'results.json')}")
    if cfg.export_hf:
        export_hf(model.cpu(), task, tok, cfg.export_hf)
        log(f"exported a transformers BertForSequenceClassification + tokenizer to {cfg.export_hf}")


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = FinetuneConfig()
    p = Parser(
        prog="python -m bertfast.finetune",
        description="Fine-tune a pretrained BERT (bertfast run or checkpoint, transformers folder or hub name) on "
                    "a classification or regression task: the built-in one, GLUE, or your own files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="a bertfast run folder or checkpoint, a transformers folder "
                   "(BertModel / BertForMaskedLM / BertForPreTraining weights) or a hub name")
    m.add_argument("--from-scratch", action="store_true", help="the same architecture and tokenizer with fresh "
                   "weights (the baseline that shows what pretraining bought)")
    m.add_argument("--tokenizer", default=None, help="a tokenizer (folder or hub name) instead of the model's own")
    m.add_argument("--impl", default=d.impl, help="op implementations: auto, triton, ext or torch")
    t = p.add_argument_group("task")
    t.add_argument("--task", default=None, help=f"{', '.join(TASKS)}; or give --train and --validation")
    t.add_argument("--glue-dir", default=None, help="a local copy of the hub's nyu-mll/glue parquet files "
                   "(NAME/train-*.parquet, NAME/validation-*.parquet) to read instead of the hub")
    t.add_argument("--builtin-train", type=int, default=d.builtin_train, help="training examples of --task builtin")
    t.add_argument("--builtin-validation", type=int, default=d.builtin_validation,
                   help="validation examples of --task builtin")
    t.add_argument("--train", default=None, metavar="FILE", help="training examples: .csv, .tsv, .jsonl or .parquet")
    t.add_argument("--validation", default=None, metavar="FILE", help="validation examples, same columns")
    t.add_argument("--text-column", default=d.text_column, help="the (first) text of each example")
    t.add_argument("--text-pair-column", default=None, help="the second text, for pair tasks")
    t.add_argument("--label-column", default=d.label_column, help="the label: class names, integers or booleans "
                   "(classification) or floats (regression)")
    o = p.add_argument_group("recipe")
    o.add_argument("--epochs", type=int, default=d.epochs)
    o.add_argument("--batch-size", type=int, default=d.batch_size)
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    o.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="fraction of the steps in linear "
                   "warmup, then linear decay to 0")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay (not on biases and "
                   "LayerNorm weights)")
    o.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (0: off)")
    o.add_argument("--max-len", type=int, default=None, help="longest input in tokens (default: 128, or the "
                   "model's position embeddings if fewer)")
    o.add_argument("--seed", type=int, default=d.seed, help="classifier init, data order, dropout")
    o.add_argument("--precision", choices=list(PRECISIONS), default=d.precision)
    r = p.add_argument_group("run")
    r.add_argument("--device", default=d.device, help="auto (GPU if there is one), cpu, cuda, cuda:N")
    r.add_argument("--output-dir", default=d.output_dir, help="metrics.jsonl and results.json go here")
    r.add_argument("--export-hf", default=None, metavar="DIR", help="at the end, write a transformers "
                   "BertForSequenceClassification + tokenizer to DIR")
    r.add_argument("--overwrite-output-dir", action="store_true", help="write into an --output-dir that holds a "
                   "pretraining run (train_config.json, checkpoints/), replacing its metrics.jsonl; refused "
                   "without this flag")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    from bertfast.train.lock import OutputDirBusy, OutputDirLockError

    try:
        run(cfg)
    except (ConfigError, TaskError, OutputDirBusy, OutputDirLockError) as e:  # exit 2, before any training
        parser.error(str(e))
    except FinetuneError as e:  # the run had to stop
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
