"""Issue 26: forward + backward reads nothing back to the host (with input checks off), given the collator's
layout; the trainer's own host reads go through one helper and are counted per optimizer step."""
import collections

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
    import pytest

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
