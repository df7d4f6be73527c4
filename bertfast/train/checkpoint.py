"""Atomic training checkpoints, pruning that never loses a good one, and resume.

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/
        model.safetensors   the weights (bertfast names)
        config.json         the model's BertConfig
        state.pt            optimizer, scheduler, GradScaler, trainer counters, data position, every RNG state
                            (python, numpy, torch CPU, CUDA; one set per rank)
        tokenizer/          the tokenizer's files (when the caller passes one; older checkpoints have none)
        manifest.json       written last: step, size and sha256 of each file above, and the tokenizer's fingerprint
    corrupt/step_00000100/  a checkpoint that failed verification, moved aside by pruning (never deleted by it)
    latest                  the name of the newest checkpoint (written after its folder is complete)

A checkpoint is written into a temporary folder (``.tmp-step_...-PID``), each file fsync'ed, the manifest last,
then the folder is renamed into place and its parent fsync'ed; only then is ``latest`` replaced (temporary file,
fsync, rename). A crash at any moment therefore leaves either the previous checkpoints untouched or a complete
new one. On resume every candidate is checked against its manifest (newest first): a missing, truncated or
altered file is reported by name and the previous good checkpoint is used.

Pruning keeps the newest `keep` *verified* checkpoints: a checkpoint that fails verification is moved to
``checkpoints/corrupt/`` and reported, never counted as kept, so good checkpoints are never deleted in favour of
bad ones. A save that fails (a full disk, say) removes its partial folder and raises CheckpointSaveError
(DiskFullError for a full disk); the earlier checkpoints are not touched.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt"  # under CHECKPOINT_DIR
TOKENIZER_DIR = "tokenizer"  # inside a checkpoint
_NAME = re.compile(r"^step_(\d+)$")
_FILES = ("model.safetensors", "config.json", "state.pt")  # every checkpoint has these
# leftovers of an interrupted write, each ending in the writer's process id: the temporary checkpoint folder, the
# previous copy of a checkpoint being re-saved, `latest`'s temporary file
_STRAY_IN_ROOT = re.compile(r"^(?:\.tmp-step_\d+|\.old-step_\d+|latest\.tmp)-(\d+)$")
_STRAY_FILE = re.compile(r"^(.+)\.tmp-(\d+)$")  # atomic_write_bytes' temporary files beside the run's files
# the run's own files whose temporaries may be cleaned at the top of an output folder (which may also hold the
# user's files: only these names are touched there)
RUN_FILES = ("metrics.jsonl", "train_config.json", "model_config.json", TOKENIZER_DIR)
_MB = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (corrupt, partial, another model configuration or tokenizer): a user error."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed. Its partial folder was removed and the earlier checkpoints are intact. Not a
    user error (the CLI exits 1), unlike CheckpointError."""


class DiskFullError(CheckpointSaveError):
    """No space left on the device while (or before) writing a checkpoint."""

    def __init__(self, directory: str, needed_bytes: int, free_bytes: int | None, corrupt_bytes: int = 0,
                 has_earlier: bool = True):
        self.directory, self.needed_bytes, self.free_bytes = directory, needed_bytes, free_bytes
        free = f", {free_bytes / _MB:.0f} MB free" if free_bytes is not None else ""
        aside = (f" ({os.path.join(directory, CORRUPT_DIR)} holds {corrupt_bytes / _MB:.0f} MB of corrupt checkpoints "
                 "moved aside)" if corrupt_bytes else "")
        then = ("the earlier checkpoints are intact. Free some space{} or keep fewer checkpoints, and continue with "
                "--resume." if has_earlier else "there is no earlier checkpoint. Free some space{} and start again.")
        super().__init__(f"no space left on device in {directory} (the checkpoint needs about "
                         f"{max(1, round(needed_bytes / _MB))} MB{free}); the partial checkpoint was removed and "
                         + then.format(aside))


class CheckpointWarning(UserWarning):
    """A checkpoint was found corrupt and moved aside (emitted when no `log` callback is given)."""


def _report(log, msg: str) -> None:
    if log is not None:
        log(msg)
    else:
        warnings.warn(msg, CheckpointWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------- file helpers
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old content or the new one, never a mix. On failure the
    temporary file is removed and the error re-raised (`path` keeps its old content)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (our own process counts as alive)."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: keep its files
    return True


def remove_stale_temporaries(output_dir: str, run_files=RUN_FILES) -> list[str]:
    """Remove what interrupted writes left behind, but only what a process that no longer runs on this machine
    wrote (never a live writer's): in ``checkpoints/``, ``.tmp-step_*-PID`` folders (partial checkpoints, as big as
    a checkpoint), ``.old-step_*-PID`` and ``latest.tmp-PID``; directly in `output_dir`, ``NAME.tmp-PID`` for NAME
    in `run_files` (atomic_write_bytes' temporary files, restore_tokenizer's temporary folder), nothing else of
    the folder. Returns the removed paths. Call it at the start of a run, after its checks passed; pruning calls
    it too. (A PID is looked up on this machine: a writer on another host sharing the folder is not seen.)"""
    removed = []
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    for folder in (root, output_dir):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if folder == root:
                m = _STRAY_IN_ROOT.match(name)
                pid = int(m.group(1)) if m else 0
            else:
                m = _STRAY_FILE.match(name)
                pid = int(m.group(2)) if m and m.group(1) in run_files else 0
            if not pid or _pid_alive(pid):
                continue
            path = os.path.join(folder, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    continue
            removed.append(path)
    return removed


def _free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _tree_bytes(path: str) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                total += os.path.getsize(os.path.join(dirpath, n))
            except OSError:
                pass
    return total


def _tensor_bytes(obj, seen: set) -> int:
    """Bytes of the tensors / arrays in a nested state (shared storages counted once): a lower bound of what
    torch.save writes."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        key = (storage.data_ptr(), obj.device)
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _is_disk_full(exc: BaseException, free: int | None, still_needed: int) -> bool:
    """Whether a failed write ran out of space. An OSError says so (ENOSPC / EDQUOT); torch's serializer only
    says "[enforce fail at inline_container.cc] unexpected pos ..." and safetensors may wrap the OS error in its
    own text, so the free space left is the other witness: less than what the checkpoint still needed."""
    e: BaseException | None = exc
    depth = 0
    while e is not None and depth < 10:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if "no space left" in text or "os error 28" in text or "quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
        depth += 1
    return free is not None and free < max(still_needed, _MB)


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every random number generator the training step draws from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another GPU count: restore the current device's generator from the saved one of the same index
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])


# ---------------------------------------------------------------------------------------------- tokenizer
_FINGERPRINT_FORMAT = 1


def _load_tokenizer(name_or_path: str):
    from bertfast.data.tokenizer import load_tokenizer  # transformers only: no `datasets` import

    return load_tokenizer(name_or_path)


def _tokenizer_identity(tok) -> dict:
    """What decides the ids a tokenizer gives: its vocabulary (token -> id), the normalisation and
    pre-tokenisation, the WordPiece settings and the special tokens' ids. Left out on purpose: the truncation /
    padding state that calling the tokenizer sets, model_max_length, file names and library versions, so the
    same vocabulary saved, loaded, or loaded from a bare vocab.txt has one fingerprint."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    ident = {"format": _FINGERPRINT_FORMAT, "vocab": [[t, i] for t, i in vocab],
             "special": {n: getattr(tok, f"{n}_token_id", None) for n in ("pad", "unk", "cls", "sep", "mask")}}
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        j = json.loads(backend.to_str())
        model = {k: v for k, v in (j.get("model") or {}).items() if k != "vocab"}
        ident.update(normalizer=j.get("normalizer"), pre_tokenizer=j.get("pre_tokenizer"), model=model)
    else:  # a Python ("slow") tokenizer: its normalisation options
        kw = getattr(tok, "init_kwargs", {}) or {}
        ident.update(kind=type(tok).__name__,
                     options={k: kw.get(k) for k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars")})
    return ident


def tokenizer_fingerprint(tokenizer_or_dir) -> str:
    """sha256 (hex) identifying a tokenizer: equal for the same vocabulary and normalisation however it was
    saved or loaded (a transformers tokenizer object, a folder from save_pretrained, a bare vocab.txt or a hub
    name), different when any token's id would change. A path is loaded with bertfast.data's load_tokenizer
    (DataError if that fails)."""
    tok = tokenizer_or_dir
    if isinstance(tok, (str, os.PathLike)):
        tok = _load_tokenizer(os.fspath(tok))
    blob = json.dumps(_tokenizer_identity(tok), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_tokenizer(tokenizer_or_dir, dest: str) -> list[str]:
    """Save the tokenizer's files into `dest`; return their paths relative to dest's parent."""
    src = tokenizer_or_dir
    if isinstance(src, (str, os.PathLike)) and os.path.isdir(src):
        os.makedirs(dest)
        for name in sorted(os.listdir(src)):  # a folder: its files as they are (a trained vocabulary's metadata too)
            p = os.path.join(src, name)
            if os.path.isfile(p):
                shutil.copyfile(p, os.path.join(dest, name))
    else:
        if isinstance(src, (str, os.PathLike)):  # a bare vocab.txt or a hub name
            src = _load_tokenizer(os.fspath(src))
        src.save_pretrained(dest)
    rel = []
    base = os.path.dirname(dest)
    for dirpath, _, names in os.walk(dest):
        rel += [os.path.relpath(os.path.join(dirpath, n), base).replace(os.sep, "/") for n in names]
    return sorted(rel)


@dataclass
class CheckpointTokenizer:
    fingerprint: str | None  # None: a checkpoint written before tokenizers were recorded
    dir: str | None  # the tokenizer's files inside the checkpoint (None when not stored)


def read_manifest(path: str) -> dict:
    """The checkpoint's manifest.json (CheckpointError when unreadable)."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {os.path.basename(path)} is partial or corrupt: manifest.json "
                              f"unreadable ({e})") from None
    return manifest


def checkpoint_tokenizer(path: str) -> CheckpointTokenizer:
    """The tokenizer recorded in checkpoint `path`: its fingerprint and the folder of its files (both None for
    checkpoints written before they were recorded). Reads the manifest only (verify the checkpoint first)."""
    manifest = read_manifest(path)
    tok = manifest.get("tokenizer") or {}
    has_files = any(k.startswith(TOKENIZER_DIR + "/") for k in manifest["files"])
    tok_dir = os.path.join(path, TOKENIZER_DIR)
    return CheckpointTokenizer(tok.get("fingerprint"), tok_dir if has_files and os.path.isdir(tok_dir) else None)


def check_tokenizer(path: str, tokenizer_or_dir) -> bool:
    """Refuse (CheckpointError) a tokenizer that differs from the one checkpoint `path` was trained with.
    Returns True when they match, False when the checkpoint predates tokenizer records (nothing to compare:
    the caller decides, e.g. warns)."""
    saved = checkpoint_tokenizer(path).fingerprint
    if saved is None:
        return False
    now = tokenizer_fingerprint(tokenizer_or_dir)
    if now != saved:
        raise CheckpointError(
            f"checkpoint {os.path.basename(path)} was trained with another tokenizer (fingerprint {saved[:12]} vs "
            f"{now[:12]} now): token ids would not match its embeddings. Use the checkpoint's own tokenizer "
            f"({os.path.join(path, TOKENIZER_DIR)} when stored), or start a new run in a new --output-dir.")
    return True


def restore_tokenizer(path: str, dest_dir: str) -> str:
    """Copy the tokenizer stored in checkpoint `path` to `dest_dir` (created; written in a temporary folder
    first, then renamed into place). CheckpointError when the checkpoint holds no tokenizer or dest_dir
    exists."""
    src = checkpoint_tokenizer(path).dir
    if src is None:
        raise CheckpointError(f"checkpoint {os.path.basename(path)} holds no tokenizer (written before tokenizers "
                              "were stored in checkpoints): pass the run's tokenizer with --tokenizer")
    if os.path.exists(dest_dir):
        raise CheckpointError(f"{dest_dir} exists already: not overwriting it with the checkpoint's tokenizer")
    tmp = f"{dest_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
        os.rename(tmp, dest_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(dest_dir)))
    return dest_dir


# ---------------------------------------------------------------------------------------------- save
def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# the writers, one per file kind (module functions so tests can make them fail as a full disk does)
def _write_weights(path: str, weights: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file(weights, path, metadata=metadata)


def _write_state(path: str, state: dict) -> None:
    torch.save(state, path)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def save_checkpoint(output_dir: str, step: int, model, config_dict: dict, state: dict, keep: int = 3, *,
                    tokenizer=None, log=None) -> str:
    """Write checkpoint `step` atomically under output_dir/checkpoints, then prune to the newest `keep`
    verified checkpoints (prune_checkpoints). Returns the checkpoint's path.

    model: the bare nn.Module (not the DDP wrapper); state: everything else (picklable); tokenizer: a
    transformers tokenizer or its folder, stored in the checkpoint with its fingerprint (recommended);
    log(msg): receives the report of each corrupt checkpoint moved aside (default: a CheckpointWarning).

    Raises DiskFullError when the device has no room for it (checked before writing from the tensors' size, and
    recognised when a write fails), CheckpointSaveError subclasses for nothing else: any other failure is
    re-raised as it is. In every failure the partial folder is removed and earlier checkpoints are untouched."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    name = checkpoint_name(step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    # safetensors refuses tensors that share storage; the tied decoder is word_embeddings itself (no copy)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    need = _check_room(output_dir, root, weights, state, tokenizer)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        _write_folder(tmp, step, weights, config_dict, state, tokenizer)
    except BaseException as e:
        free_now, written = _free_bytes(root), _tree_bytes(tmp)  # measured before the partial folder goes
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and _is_disk_full(e, free_now, need - written):
            raise DiskFullError(root, need, free_now, _tree_bytes(os.path.join(root, CORRUPT_DIR)),
                                bool(list_checkpoints(output_dir))) from e
        raise
    _install(root, name, tmp, log)
    try:
        atomic_write_text(os.path.join(root, "latest"), name + "\n")
    except OSError as e:  # the checkpoint itself is complete and valid (resume lists folders, not `latest`)
        if _is_disk_full(e, _free_bytes(root), _MB):
            raise DiskFullError(root, _MB, _free_bytes(root)) from e
        raise
    _VERIFIED[final] = _signature(final)  # hashed just now, while writing
    prune_checkpoints(output_dir, keep, log=log, _protect=final)
    return final


def _check_room(output_dir: str, root: str, weights: dict, state: dict, tokenizer) -> int:
    """The checkpoint's size (a lower bound); DiskFullError when the device has less free space than that."""
    need = _tensor_bytes(weights, set()) + _tensor_bytes(state, set())
    if isinstance(tokenizer, (str, os.PathLike)) and os.path.isdir(tokenizer):
        need += _tree_bytes(tokenizer)
    free = _free_bytes(root)
    if free is not None and free < need:  # `need` is a lower bound of the files' size: this save cannot fit
        raise DiskFullError(root, need, free, _tree_bytes(os.path.join(root, CORRUPT_DIR)),
                            bool(list_checkpoints(output_dir)))
    return need


def _write_folder(tmp: str, step: int, weights: dict, config_dict: dict, state: dict, tokenizer) -> None:
    """The checkpoint's files in the new folder `tmp`, then its manifest (sizes and hashes), all fsynced."""
    os.makedirs(tmp)
    _write_weights(os.path.join(tmp, "model.safetensors"), weights, {"step": str(step)})
    _write_json(os.path.join(tmp, "config.json"), config_dict)
    _write_state(os.path.join(tmp, "state.pt"), state)
    files = list(_FILES)
    manifest = {"step": step, "files": {}}
    if tokenizer is not None:
        files += _write_tokenizer(tokenizer, os.path.join(tmp, TOKENIZER_DIR))
        manifest["tokenizer"] = {"fingerprint": tokenizer_fingerprint(tokenizer)}
    for rel in files:
        p = os.path.join(tmp, rel)
        _fsync_file(p)
        manifest["files"][rel] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if tokenizer is not None:
        _fsync_dir(os.path.join(tmp, TOKENIZER_DIR))
    _fsync_dir(tmp)


def _install(root: str, name: str, tmp: str, log) -> None:
    """Rename the complete folder `tmp` to root/name. A checkpoint already there (the same step saved again, e.g.
    by a resumed run) is replaced; a corrupt one is moved aside instead of deleted."""
    final = os.path.join(root, name)
    old = None
    if os.path.exists(final):
        try:
            verify_checkpoint(final)
        except CheckpointError as e:
            dest = _move_aside(root, final)
            _report(log, f"{e}; moved it to {dest} and wrote a new {name}")
        else:  # good: keep it until the new one is in place
            old = os.path.join(root, f".old-{name}-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    _VERIFIED.pop(final, None)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _move_aside(root: str, path: str) -> str:
    """Move a corrupt checkpoint to root/corrupt/ (a rename: needs no space); returns where it went."""
    aside = os.path.join(root, CORRUPT_DIR)
    os.makedirs(aside, exist_ok=True)
    base = os.path.basename(path)
    dest, n = os.path.join(aside, base), 1
    while os.path.lexists(dest):
        n += 1
        dest = os.path.join(aside, f"{base}.{n}")
    os.rename(path, dest)
    _fsync_dir(aside)
    _fsync_dir(root)
    _VERIFIED.pop(path, None)
    return dest


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder, newest first (not validated; corrupt/ is not listed)."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


@dataclass
class PruneResult:
    kept: list[str] = field(default_factory=list)  # verified checkpoints left, newest first
    removed: list[str] = field(default_factory=list)  # verified checkpoints deleted (beyond `keep`)
    moved_aside: list[str] = field(default_factory=list)  # corrupt checkpoints, now under checkpoints/corrupt/


def prune_checkpoints(output_dir: str, keep: int, *, log=None, _protect: str | None = None) -> PruneResult:
    """Keep the newest `keep` verified checkpoints and delete the other verified ones (keep <= 0: delete none).
    A checkpoint that fails verification is moved to checkpoints/corrupt/ and reported through log(msg) (default:
    a CheckpointWarning), never counted as kept and never deleted, so a good checkpoint is never deleted in favour
    of a bad one. Also removes leftovers of interrupted writes (remove_stale_temporaries) and points `latest` at
    the newest kept checkpoint. Verifying hashes each checkpoint's files once per process (cached by the files'
    inode, size and times)."""
    result = PruneResult()
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return result
    remove_stale_temporaries(output_dir)
    good = []
    for _, path in list_checkpoints(output_dir):
        try:
            _verify_cached(path)
        except CheckpointError as e:
            dest = _move_aside(root, path)
            result.moved_aside.append(dest)
            _report(log, f"{e}; moved it to {dest} (it is not counted among the checkpoints kept; delete it when you "
                         "no longer need it)")
            continue
        good.append(path)
    keep_set = set(good) if not keep or keep <= 0 else set(good[:keep])
    if _protect in good and _protect not in keep_set:  # the checkpoint just written stays
        keep_set = {_protect, *[g for g in good if g != _protect][:keep - 1]}
    for path in good:
        if path in keep_set:
            result.kept.append(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
            _VERIFIED.pop(path, None)
            result.removed.append(path)
    latest = os.path.join(root, "latest")
    want = os.path.basename(result.kept[0]) if result.kept else None
    try:
        with open(latest) as f:
            now = f.read().strip()
    except OSError:
        now = None
    if want is not None and now != want:
        atomic_write_text(latest, want + "\n")
    elif want is None and now is not None:
        os.remove(latest)  # it named a checkpoint that is not there any more
    return result


# ---------------------------------------------------------------------------------------------- load
def verify_checkpoint(path: str) -> None:
    """Raise CheckpointError naming what is wrong if `path` is not a complete, intact checkpoint (every file in
    its manifest present with the recorded size and sha256; the three core files listed)."""
    name = os.path.basename(path)
    files = read_manifest(path)["files"]
    for fname in _FILES:
        if fname not in files:
            raise CheckpointError(f"checkpoint {name} is corrupt: manifest.json does not list {fname}")
    for fname in list(_FILES) + sorted(set(files) - set(_FILES)):
        want = files[fname]
        parts = fname.split("/")
        if os.path.isabs(fname) or ".." in parts or not isinstance(want, dict) or "size" not in want \
                or "sha256" not in want:
            raise CheckpointError(f"checkpoint {name} is corrupt: manifest.json has a bad entry {fname!r}")
        p = os.path.join(path, *parts)
        try:
            size = os.path.getsize(p)
        except OSError:
            raise CheckpointError(f"checkpoint {name} is partial: {fname} is missing") from None
        if size != want["size"]:
            raise CheckpointError(f"checkpoint {name} is corrupt: {fname} has {size} bytes, expected "
                                  f"{want['size']} (truncated?)")
        try:
            digest = _sha256(p)
        except OSError as e:
            raise CheckpointError(f"checkpoint {name} is unreadable: {fname} ({e})") from None
        if digest != want["sha256"]:
            raise CheckpointError(f"checkpoint {name} is corrupt: {fname} does not match its sha256")


# path -> _signature(path) of checkpoints verified (or written) by this process
_VERIFIED: dict[str, tuple] = {}


def _signature(path: str) -> tuple | None:
    """Inode, size, mtime and ctime of the manifest and of every file it lists (None if any is unreadable).
    ctime changes on any write or `touch` and cannot be set back, so an unchanged signature means unchanged
    files (short of the medium failing)."""
    try:
        manifest = read_manifest(path)
        sig = []
        for rel in ["manifest.json", *sorted(manifest["files"])]:
            st = os.stat(os.path.join(path, *rel.split("/")))
            sig.append((rel, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(sig)
    except (CheckpointError, OSError, TypeError):
        return None


def _verify_cached(path: str) -> None:
    sig = _signature(path)
    if sig is not None and _VERIFIED.get(path) == sig:
        return
    _VERIFIED.pop(path, None)
    verify_checkpoint(path)
    sig = _signature(path)
    if sig is not None:
        _VERIFIED[path] = sig


@dataclass
class FoundCheckpoint:
    step: int
    path: str
    skipped: list[str]  # messages about newer checkpoints that were corrupt or partial


def find_latest_checkpoint(output_dir: str) -> FoundCheckpoint | None:
    """The newest intact checkpoint in output_dir (None if there is none); corrupt ones are listed in `skipped`
    (step -1 and path "" when every checkpoint is corrupt). Changes nothing on disk."""
    skipped = []
    for step, path in list_checkpoints(output_dir):
        try:
            _verify_cached(path)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        return FoundCheckpoint(step, path, skipped)
    if skipped:
        return FoundCheckpoint(-1, "", skipped)
    return None


def check_model_config(path: str, config_dict: dict) -> None:
    """Refuse a checkpoint whose model configuration differs from `config_dict`."""
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    diff = {k: (saved.get(k), config_dict.get(k)) for k in sorted(set(saved) | set(config_dict))
            if saved.get(k) != config_dict.get(k)}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"checkpoint {os.path.basename(path)} was written for another model configuration ({what}). Resume "
            f"with the same --preset / --max-len / --vocab-size / --tokenizer, or use a new --output-dir.")


def load_checkpoint(path: str, model, map_location="cpu") -> dict:
    """Load the weights into `model` (strict) and return the saved state dict (optimizer, RNG, ...)."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, "model.safetensors"), device="cpu")
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {os.path.basename(path)} does not fit the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    # our own file, written by save_checkpoint: it holds numpy RNG state, so not weights_only
    return torch.load(os.path.join(path, "state.pt"), map_location=map_location, weights_only=False)
