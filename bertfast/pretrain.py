"""`python -m bertfast.pretrain`: pretrain BERT (MLM + NSP) from the command line.

With no arguments: the `tiny` preset (2 layers x 128) for 6 epochs on the built-in corpus, offline, on the GPU
if there is one, a few minutes on a 2-core CPU. Under `torchrun --nproc_per_node=N -m bertfast.pretrain ...` it trains data-parallel. See
docs/cli.md for every flag, the files a run writes, resume, and the MFU formula.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from bertfast.model import PRESETS
from bertfast.trainer import PRECISIONS, ConfigError, Interrupted, TrainConfig, TrainingError, train

_D = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bertfast.pretrain",
        description="Pretrain BERT (masked LM + next sentence prediction) with bertfast's kernels. With no "
                    "arguments: a small model on the built-in corpus, offline, in a few minutes on a CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # read `--lr -1e-4` as a (bad) value, not as an unknown option, so the error names the real problem
    p._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    m = p.add_argument_group("model")
    m.add_argument("--preset", default=_D.preset, help=f"model size: {', '.join(PRESETS)}")
    m.add_argument("--max-len", type=int, default=_D.max_len, help="longest sequence (tokens; also the position "
                   "embeddings)")
    m.add_argument("--dropout", type=float, default=_D.dropout, help="hidden and attention dropout (None: BERT's "
                   "0.1)")
    m.add_argument("--impl", default=_D.impl, help="op implementations: auto, triton, ext or torch (triton / ext "
                   "apply to the ops that have them, the others run as with auto; triton on a CPU needs "
                   "TRITON_INTERPRET=1)")
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", default=_D.data, metavar="NAME[:RATIO]",
                   help="corpora: builtin, bookcorpus, wikipedia, or local .txt/.jsonl/.parquet files / folders / "
                        "globs, each with an optional fraction (bookcorpus:0.1 wikipedia:1/41)")
    d.add_argument("--tokenizer", default=_D.tokenizer, help="tokenizer (hub name or local folder); default: train "
                   "a WordPiece vocabulary on the corpus (saved in OUTPUT_DIR/tokenizer)")
    d.add_argument("--vocab-size", type=int, default=_D.vocab_size, help="size of the trained vocabulary")
    d.add_argument("--builtin-docs", type=int, default=_D.builtin_docs, help="documents of the built-in corpus")
    d.add_argument("--num-workers", type=int, default=_D.num_workers, help="data loader worker processes")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=_D.epochs, help="passes over the data (when --max-steps is 0)")
    o.add_argument("--max-steps", type=int, default=_D.max_steps, help="stop after this many optimizer steps "
                   "(0: run --epochs)")
    o.add_argument("--batch-size", type=int, default=_D.batch_size, help="sequences per device per micro-batch "
                   "(global batch = this x devices x --grad-accum)")
    o.add_argument("--grad-accum", type=int, default=_D.grad_accum, help="micro-batches per optimizer step")
    o.add_argument("--lr", type=float, default=_D.lr, help="peak learning rate (AdamW)")
    o.add_argument("--weight-decay", type=float, default=_D.weight_decay,
                   help="AdamW weight decay (not on biases and LayerNorm weights)")
    o.add_argument("--warmup-steps", type=int, default=_D.warmup_steps,
                   help="linear warmup steps, then linear decay to 0 at the last step")
    o.add_argument("--clip-grad", type=float, default=_D.clip_grad, help="max gradient norm (0: no clipping)")
    o.add_argument("--precision", choices=list(PRECISIONS), default=_D.precision,
                   help="fp32, or autocast to bf16 / fp16 (fp16 with a GradScaler)")
    o.add_argument("--max-bad-steps", type=int, default=_D.max_bad_steps,
                   help="stop after this many non-finite losses in a row (each one skips its step)")
    o.add_argument("--seed", type=int, default=_D.seed)
    r = p.add_argument_group("run")
    r.add_argument("--device", default=_D.device, help="auto (GPU if there is one), cpu, cuda, cuda:N")
    r.add_argument("--threads", type=int, default=_D.threads, help="CPU threads for torch (0: torch's default, "
                   "shared among the processes of one machine)")
    r.add_argument("--output-dir", default=_D.output_dir, help="where the run writes everything: metrics.jsonl, "
                   "checkpoints/, tokenizer/, train_config.json, model_config.json")
    r.add_argument("--log-every", type=int, default=_D.log_every, help="steps per metrics.jsonl record")
    r.add_argument("--checkpoint-every", type=int, default=_D.checkpoint_every,
                   help="steps between checkpoints (0: only at the end)")
    r.add_argument("--keep-checkpoints", type=int, default=_D.keep_checkpoints, help="keep the newest K")
    r.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint in --output-dir")
    r.add_argument("--export-hf", default=_D.export_hf, metavar="DIR",
                   help="at the end, write a transformers BertForPreTraining + tokenizer to DIR")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    return p


def config_from_args(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        train(cfg)
    except ConfigError as e:
        parser.error(str(e))  # exit code 2, with the usage line
    except TrainingError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; continue with --resume (the latest checkpoint is intact)",
              file=sys.stderr)
        return 130
    except Exception as e:  # bad data, a checkpoint of another model: one clear line, exit 2 for user errors
        from bertfast.checkpoint import CheckpointError
        from bertfast.data import DataError

        if isinstance(e, (CheckpointError, DataError)):
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
