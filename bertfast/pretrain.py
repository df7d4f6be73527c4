"""`python -m bertfast.pretrain`: pretrain BERT (MLM + NSP) from the command line.

With no arguments: the `tiny` preset (2 layers x 128) for 6 epochs on the built-in corpus, offline, on the GPU
if there is one, a few minutes on a 2-core CPU. Under `torchrun --nproc_per_node=N -m bertfast.pretrain ...` it
trains data-parallel. See docs/cli.md for every flag, the files a run writes, resume, and the MFU formula.

The flags are generated from TrainConfig's fields (bertfast/train/config.py): name, type, default and help text
live there only. `--flag-table` prints the markdown table docs/cli.md holds.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from bertfast._cli import Parser
from bertfast.train.config import ConfigError, TrainConfig, flag_of
from bertfast.train.trainer import Interrupted, TrainingError, train

PROG = "python -m bertfast.pretrain"
GROUPS = ("model", "data", "optimisation", "run")
_TYPES = {"int": int, "float": float, "str": str}


def _shown_default(f: dataclasses.Field) -> str:
    if "shown" in f.metadata:
        return f.metadata["shown"]
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


def _add_flag(group, f: dataclasses.Field) -> None:
    meta, kind = f.metadata, str(f.type).removesuffix(" | None")
    flag, text = flag_of(f.name), meta["help"].replace("%", "%%")  # argparse formats help with %
    if kind == "bool":  # switches: --resume turns a False default on, --no-progress a True default off
        group.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                           help=text)
        return
    kw = dict(dest=f.name, default=f.default_factory() if f.default is dataclasses.MISSING else f.default,
              help=f"{text} (default: {_shown_default(f)})")
    if kind == "list[str]":
        kw.update(nargs="+")
    else:
        kw.update(type=_TYPES[kind])
    for key in ("metavar", "choices"):
        if key in meta:
            kw[key] = meta[key]
    group.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="Pretrain BERT (masked LM + next sentence prediction) with bertfast's "
                "kernels. With no arguments: a small model on the built-in corpus, offline, in a few minutes on a "
                "CPU. Every flag is a field of bertfast.train.trainer.TrainConfig.")
    groups = {g: p.add_argument_group(g) for g in GROUPS}
    for f in dataclasses.fields(TrainConfig):
        _add_flag(groups[f.metadata["group"]], f)
    p.add_argument("--flag-table", action="store_true", help="print the flag table of docs/cli.md and exit")
    return p


def flag_table() -> str:
    """The markdown table of every flag, as docs/cli.md holds it."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        flag, kind = flag_of(f.name), str(f.type).removesuffix(" | None")
        if kind == "list[str]":
            flag += f" {f.metadata.get('metavar', f.name.upper())} ..."
        elif "metavar" in f.metadata:
            flag += f" {f.metadata['metavar']}"
        default = "" if f.name == "progress" else f"`{_shown_default(f)}`"
        rows.append(f"| `{flag}` | {default} | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


def _parse(argv) -> tuple[TrainConfig, set[str], bool]:
    """The command line as (TrainConfig, the names of the fields it sets, --flag-table). Parsed without defaults,
    so only the flags given are there; TrainConfig's own defaults (which the parser's are generated from) fill in
    the rest. On --resume the fields not given keep the run's saved values (train's `given`)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    args = vars(p.parse_args(argv))
    show_table = args.pop("flag_table", False)
    return TrainConfig(**args), set(args), show_table


def config_from_args(argv=None) -> TrainConfig:
    return _parse(argv)[0]


def _error(e: BaseException, code: int) -> int:
    """One line on stderr; under torchrun also the worker's error file, so that its summary shows this message
    (and, with every rank raising the failing rank's error, names the real root cause)."""
    print(f"{PROG}: error: {e}", file=sys.stderr)
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    return code


def main(argv=None) -> int:
    cfg, given, show_table = _parse(argv)
    if show_table:
        print(flag_table(), end="")
        return 0
    from bertfast.train.checkpoint import CheckpointError, CheckpointSaveError
    from bertfast.data import DataError
    from bertfast.train.lock import OutputDirBusy, OutputDirLockError

    try:
        train(cfg, given=given)
    except (ConfigError, OutputDirBusy, OutputDirLockError) as e:  # exit 2: a user error (or a folder another
        return _error(e, 2)                                         # run writes), reported before any work
    except (CheckpointError, DataError) as e:  # bad data, a checkpoint of another model: exit 2 as well
        return _error(e, 2)
    except (TrainingError, CheckpointSaveError) as e:  # the run had to stop (non-finite losses, a full disk)
        return _error(e, 1)
    except Interrupted as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with --resume (the latest checkpoint is intact)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
