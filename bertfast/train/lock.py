"""One writer per run folder: an exclusive lock on an output folder, held while a command writes it.

`python -m bertfast.pretrain` and `python -m bertfast.finetune` take it on their --output-dir (and --export-hf)
before anything else touches the folder; a second writer is refused (OutputDirBusy, exit 2) with the owner's host,
pid, start time and command. The lock is fcntl.flock on OUTPUT_DIR/.bertfast.lock: the check-and-take is one
atomic system call, and the kernel drops it when its process ends in any way (exit, exception, Ctrl-C, kill -9),
so a lock whose owner is gone is simply taken over. The file holds the owner's description (JSON) for the
refusal message only; it is removed on a normal release. Readers (fill-mask, --init-from, finetune --model)
never take it.

`folder_kind` tells what an output folder already holds (a pretraining or a fine-tuning run), so that one
program does not write over the other's files.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys

LOCK_NAME = ".bertfast.lock"

__all__ = ["LOCK_NAME", "OutputDirBusy", "OutputDirLockError", "RunLock", "folder_kind", "describe_kind"]


class OutputDirBusy(RuntimeError):
    """Another process holds the folder's lock; `owner` is its description (possibly {} if it is just starting)."""

    def __init__(self, flag: str, folder: str, owner: dict):
        self.flag, self.folder, self.owner = flag, folder, owner
        gone = ""
        if owner.get("pid") and owner.get("host") == socket.gethostname() and not _alive(owner):
            gone = (f"; pid {owner['pid']} has ended, but a process it started (a data-loader worker?) still holds "
                    "the lock: try again in a few seconds")
        super().__init__(f"argument {flag}: {folder!r} is being written by another run ({_who(owner)}){gone}; wait "
                         "for it to finish or stop it, or choose another folder. Two writers would mix their metrics "
                         "and checkpoints")


class OutputDirLockError(RuntimeError):
    """The lock file cannot be created or locked (a read-only folder, a file system without locks)."""

    def __init__(self, flag: str, folder: str, err: OSError):
        self.flag = flag
        where = os.path.join(folder, LOCK_NAME)
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR):
            why = f"cannot create {where!r} ({err.strerror or err}): choose a folder you can write to"
        elif err.errno == errno.EISDIR:
            why = f"{where!r}, the run's lock file, is a folder: remove it (or choose another folder)"
        else:
            why = (f"cannot lock {where!r} ({err.strerror or err}): the run needs a folder it can write to, on a "
                   "file system with file locks: choose another folder")
        super().__init__(f"argument {flag}: {why}")


def _command() -> str:
    """This process's command line as typed: `python -m bertfast.pretrain --flags` (not the module's file path)."""
    import shlex

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None and spec.name else \
        f"python {sys.argv[0] if sys.argv else ''}".rstrip()
    return " ".join([head] + [shlex.quote(a) for a in sys.argv[1:]])


def _who(owner: dict) -> str:
    if not owner.get("pid"):
        return "an owner that is just starting"
    cmd = owner.get("command", "")
    cmd = cmd if len(cmd) <= 120 else cmd[:117] + "..."
    return (f"pid {owner['pid']} on host {owner.get('host', '?')}, since {owner.get('started', '?')}"
            + (f": {cmd}" if cmd else ""))


NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _alive(owner: dict) -> bool:
    """Whether the owner may still run: another host cannot be checked (assumed alive); here, its pid exists."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _read_owner(path: str) -> dict:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            owner = json.loads(f.read(64 * 1024) or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # empty or garbage: nothing to name


class RunLock:
    """`with RunLock(folder, flag):` holds the folder's lock for the block (creating the folder if needed).
    `enabled=False` makes it a no-op (the ranks of a torchrun job other than rank 0: one run, one writer)."""

    def __init__(self, folder: str, flag: str = "--output-dir", *, enabled: bool = True, command: str | None = None):
        self.folder, self.flag, self.enabled = folder, flag, enabled
        self.path = os.path.join(folder, LOCK_NAME)
        self.command = command if command is not None else _command()
        self.fd: int | None = None
        self.created_folder = False
        self.flocked = False
        self.previous: dict = {}  # the description a dead owner left (when its lock was taken over)

    def __enter__(self) -> "RunLock":
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        import fcntl

        if not os.path.isdir(self.folder):
            try:
                os.makedirs(self.folder)
                self.created_folder = True
            except FileExistsError:
                pass
            except OSError as e:
                raise OutputDirLockError(self.flag, self.folder, e) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                self._forget_folder()
                raise OutputDirLockError(self.flag, self.folder, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise OutputDirBusy(self.flag, self.folder, _read_owner(self.path)) from None
                if e.errno in NO_LOCKS:
                    self._without_flock(fd)
                    return
                os.close(fd)
                self._forget_folder()
                raise OutputDirLockError(self.flag, self.folder, e) from None
            if self._still_the_file(fd):
                break
            os.close(fd)  # the owner released and removed the file between our open and our lock: again
        self.fd, self.flocked = fd, True
        self.previous = _read_owner(self.path)
        self._write_owner()

    def _without_flock(self, fd: int) -> None:
        """A file system without flock (some network file systems): the owner named in the file is refused while
        its pid lives on this host (or while it is on another host: that cannot be checked from here); otherwise
        the file is taken over. Not atomic: two runs started in the same instant could both pass."""
        owner = _read_owner(self.path)
        if owner.get("pid") and owner["pid"] != os.getpid() and _alive(owner):
            os.close(fd)
            raise OutputDirBusy(self.flag, self.folder, owner)
        self.fd, self.flocked, self.previous = fd, False, owner
        self._write_owner()

    def _still_the_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _write_owner(self) -> None:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": self.command}
        data = (json.dumps(owner) + "\n").encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:  # a full disk: the lock itself holds; only the description for others is missing
            pass

    @property
    def took_over(self) -> str | None:
        """A note when the lock was taken from an owner that is gone (killed, crashed), else None."""
        if not self.previous.get("pid") or self.previous.get("pid") == os.getpid():
            return None
        return f"note: took over the lock of {self.folder!r} left by {_who(self.previous)}, which is no longer running"

    def release(self) -> None:
        """Remove the lock file (while still holding it), then unlock; remove the folder if this lock created it
        and nothing else was written there."""
        if self.fd is None:
            return
        import fcntl

        try:
            os.unlink(self.path)
        except OSError:
            pass
        if self.flocked:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        self._forget_folder()

    def _forget_folder(self) -> None:
        if self.created_folder:
            try:
                os.rmdir(self.folder)  # only if empty: a run that wrote something keeps its folder
            except OSError:
                pass
            self.created_folder = False


# ---------------------------------------------------------------------------------------------- folder kinds
PRETRAINING, FINETUNING = "pretraining", "fine-tuning"


def _first_record(path: str) -> dict:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            rec = json.loads(f.readline() or "{}")
        return rec if isinstance(rec, dict) else {}
    except (OSError, ValueError):
        return {}


def folder_kind(folder: str) -> str | None:
    """What `folder` holds: PRETRAINING (train_config.json, checkpoints/, or a metrics.jsonl of MLM records),
    FINETUNING (results.json, or a metrics.jsonl of per-epoch train_loss records), or None."""
    def has(name):
        return os.path.exists(os.path.join(folder, name))

    if has("train_config.json") or has("checkpoints") or has("model_config.json"):
        return PRETRAINING
    if has("results.json"):
        return FINETUNING
    rec = _first_record(os.path.join(folder, "metrics.jsonl"))
    if "mlm_loss" in rec or "eval_mlm_loss" in rec:
        return PRETRAINING
    if "train_loss" in rec:
        return FINETUNING
    return None


def refuse_run_as_export(export_dir: str | None, output_dir: str, overwrite: bool) -> None:
    """--export-hf into another run's folder (not this run's own --output-dir) would put a transformers
    config.json and weights among that run's files: refused (exit 2) unless --overwrite-output-dir."""
    if not export_dir or overwrite or os.path.realpath(export_dir) == os.path.realpath(output_dir):
        return
    kind = folder_kind(export_dir)
    if kind is not None:
        from bertfast.train.config import ConfigError

        raise ConfigError("--export-hf", f"{describe_kind(export_dir, kind)}; an export there would mix a "
                          "transformers model into it. Choose another --export-hf folder (or pass "
                          "--overwrite-output-dir to write there anyway)")


def describe_kind(folder: str, kind: str) -> str:
    what = {PRETRAINING: "train_config.json, checkpoints/, metrics.jsonl", FINETUNING: "results.json, metrics.jsonl"}
    return f"{folder!r} holds a {kind} run ({what[kind]})"
