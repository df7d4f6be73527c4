"""Issue 26: forward + backward reads nothing back to the host (with input checks off), given the collator's
layout; the trainer's own host reads go through one helper and are counted per optimizer step."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bertfast import BertConfig, BertForPreTraining
from bertfast.data.batch import PretrainingCollator

HOST_READS = {"aten._local_scalar_dense", "aten.nonzero", "aten.item"}


class HostReads(TorchDispatchMode):
    """Counts the aten ops that read a tensor's values back to the host."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in HOST_READS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


CFG = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                 max_len=16)


def _batch():
    g = torch.Generator().manual_seed(0)
    samples = [dict(input_ids=[2] + torch.randint(5, 40, (n - 2,), generator=g).tolist() + [3], len_a=n // 2,
                    is_next=i % 2, seed=i) for i, n in enumerate((11, 16, 7))]
    return PretrainingCollator(vocab_size=40, pad_token_id=0, mask_token_id=4, max_len=16, max_predictions=4)(samples)


def test_forward_backward_reads_nothing_back(monkeypatch):
    """As on a GPU: the ops' value checks (which always run on CPU tensors) follow check_values, as they do for
    CUDA tensors; the model passes check_values=check_inputs, which the trainer turns off on a GPU."""
    from bertfast.ops import _checks

    monkeypatch.setattr(_checks, "_values_checked", lambda t, check_values: check_values)
    torch.manual_seed(0)
    model = BertForPreTraining(CFG)
    model.check_inputs = False
    batch = _batch()
    assert batch.unpad_indices is not None
    with HostReads() as reads:
        model(**batch.model_inputs()).loss.backward()
    assert not reads.counts, dict(reads.counts)
    # the counter can fail: the layout derived on the device (no collator layout) reads back
    model.zero_grad()
    inputs = {k: v for k, v in batch.model_inputs().items() if k not in ("unpad_indices", "cu_seqlens", "max_seqlen")}
    with HostReads() as reads:
        model(**inputs).loss.backward()
    assert reads.counts["aten.nonzero"] >= 1 and reads.counts["aten._local_scalar_dense"] >= 1


def test_trainer_reads_once_per_optimizer_step(tmp_path):
    """One small read (the step's flags) per optimizer step in one process with fp32; the metrics are read at the
    logged steps, the window sums at the checkpoint."""
    pytest.importorskip("datasets")
    from bertfast.train import TrainConfig, train
    from bertfast.train.state import HOST_READS

    steps, log_every = 6, 3
    cfg = TrainConfig(preset="tiny", max_len=32, builtin_docs=40, batch_size=4, max_steps=steps, warmup_steps=0,
                      log_every=log_every, checkpoint_every=0, output_dir=str(tmp_path / "run"), progress=False,
                      threads=1, seed=0, device="cpu", eval_fraction=0.0, grad_accum=2)
    HOST_READS.clear()
    train(cfg, log=lambda *_: None)
    reads = dict(HOST_READS)
    logs = steps // log_every
    assert reads.pop("step") == steps, reads
    assert reads.pop("log") == logs and logs <= reads.pop("metrics") <= logs + 2, reads  # + ended epochs
    assert reads.pop("checkpoint", 0) <= 2 and not reads, reads  # the final checkpoint's window sums only


STEP_FUNCTIONS = {"bertfast/train/trainer.py": ("_optimizer_step", "_global_counts", "_micro_step", "_update"),
                  "bertfast/train/state.py": ("device_values", "add_batch", "count", "on_device")}


def _copies_to_a_device(path: str, names) -> list[str]:
    """Calls torch.tensor / torch.as_tensor with a device= in the named functions: on CUDA each is a copy from
    pageable host memory followed by a stream synchronisation (what set_sync_debug_mode("error") refuses)."""
    import ast
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, path)).read())
    found, seen = [], set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name in names:
            seen.add(fn.name)
            for call in ast.walk(fn):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr in ("tensor", "as_tensor") and any(k.arg == "device" for k in call.keywords)):
                    found.append(f"{path}:{call.lineno} {fn.name}")
    assert seen == set(names), f"{path}: functions not found: {set(names) - seen}"
    return found


def test_the_training_step_builds_no_device_tensor_by_copying_from_the_host():
    """The counter above sees reads, not host-to-device copies; those are found in the step's source instead."""
    found = [hit for path, names in STEP_FUNCTIONS.items() for hit in _copies_to_a_device(path, names)]
    assert not found, found


# Not marked `gpu` (DESIGN.md keeps those free of `datasets`, which the GPU image lacks): it runs in gpu_run.sh's
# whole-suite stage when the wheels of scripts/gpu_wheels.sh are carried.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer,precision", [("adamw", "bf16"), ("lamb", "fp16"), ("adamw", "fp32")])
def test_steady_state_steps_never_synchronise_on_a_gpu(tmp_path, optimizer, precision):
    """On a GPU: optimizer steps 2-5 (forward, backward, clipping, the update, the metric sums) run under
    torch.cuda.set_sync_debug_mode("error"); only the counted reads of host_read are let through."""
    pytest.importorskip("datasets")
    from bertfast.train import TrainConfig, train
    from bertfast.train.state import HOST_READS

    def strict_from_step_2(step, loss):
        torch.cuda.set_sync_debug_mode("error" if 2 <= step < 6 else 0)
        return loss

    cfg = TrainConfig(preset="tiny", max_len=64, builtin_docs=80, batch_size=8, max_steps=8, warmup_steps=0,
                      log_every=100, checkpoint_every=0, output_dir=str(tmp_path / "run"), progress=False, seed=0,
                      device="cuda", eval_fraction=0.0, grad_accum=2, optimizer=optimizer, precision=precision)
    HOST_READS.clear()
    try:
        summary = train(cfg, log=lambda *_: None, loss_hook=strict_from_step_2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert summary["step"] == 8 and HOST_READS["step"] == 8
