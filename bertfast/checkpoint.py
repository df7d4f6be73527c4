"""Atomic training checkpoints and resume.

Layout under ``<output_dir>/checkpoints/``::

    step_00000100/
        model.safetensors   the weights (bertfast names)
        config.json         the model's BertConfig
        state.pt            optimizer, scheduler, GradScaler, trainer counters, data position, every RNG state
                            (python, numpy, torch CPU, CUDA; one set per rank)
        manifest.json       written last: step, size and sha256 of each file above
    latest                  the name of the newest checkpoint (written after its folder is complete)

A checkpoint is written into a temporary folder (``.tmp-step_...``), each file fsync'ed, the manifest last,
then the folder is renamed into place and its parent fsync'ed; only then is ``latest`` replaced (temporary file,
fsync, rename). A crash at any moment therefore leaves either the previous checkpoints untouched or a complete
new one. On resume every candidate is checked against its manifest (newest first): a missing, truncated or
altered file is reported by name and the previous good checkpoint is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)$")
_FILES = ("model.safetensors", "config.json", "state.pt")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (corrupt, partial, or from another model configuration)."""


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
    """Write `data` to `path` so that readers see the old content or the new one, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# ---------------------------------------------------------------------------------------------- save
def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(output_dir: str, step: int, model, config_dict: dict, state: dict, keep: int = 3) -> str:
    """Write checkpoint `step` atomically under output_dir/checkpoints and keep the newest `keep`.

    model: the bare nn.Module (not the DDP wrapper); state: everything else (picklable)."""
    from safetensors.torch import save_file

    root = os.path.join(output_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    name = checkpoint_name(step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    # safetensors refuses tensors that share storage; the tied decoder is word_embeddings itself (no copy)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"step": str(step)})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
    torch.save(state, os.path.join(tmp, "state.pt"))
    manifest = {"step": step, "files": {}}
    for fname in _FILES:
        p = os.path.join(tmp, fname)
        _fsync_file(p)
        manifest["files"][fname] = {"size": os.path.getsize(p), "sha256": _sha256(p)}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. the end of a resumed run that had just saved)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    atomic_write_text(os.path.join(root, "latest"), name + "\n")
    prune_checkpoints(output_dir, keep)
    return final


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint folder, newest first (not validated)."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _NAME.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found, reverse=True)


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and leftovers of interrupted writes)."""
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    for name in os.listdir(root):
        if name.startswith(".tmp-") and not name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep and keep > 0:
        for _, path in list_checkpoints(output_dir)[keep:]:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load
def verify_checkpoint(path: str) -> None:
    """Raise CheckpointError naming what is wrong if `path` is not a complete, intact checkpoint."""
    name = os.path.basename(path)
    mpath = os.path.join(path, "manifest.json")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {name} is partial or corrupt: manifest.json unreadable ({e})") from None
    for fname in _FILES:
        p = os.path.join(path, fname)
        want = files.get(fname)
        if want is None:
            raise CheckpointError(f"checkpoint {name} is corrupt: manifest.json does not list {fname}")
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


@dataclass
class FoundCheckpoint:
    step: int
    path: str
    skipped: list[str]  # messages about newer checkpoints that were corrupt or partial


def find_latest_checkpoint(output_dir: str) -> FoundCheckpoint | None:
    """The newest intact checkpoint in output_dir (None if there is none); corrupt ones are listed in `skipped`."""
    skipped = []
    for step, path in list_checkpoints(output_dir):
        try:
            verify_checkpoint(path)
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
