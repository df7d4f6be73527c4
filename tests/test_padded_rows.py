"""Issue 31: bucket-padded token rows are inert. The same batch with its exact token count and padded to the next
and to the largest bucket gives the same loss and gradients, with uninitialised memory poisoned (NaN)."""
import pytest
import torch

from bertfast import BertConfig, BertForPreTraining, ops
from bertfast.data.batch import PretrainingCollator
from bertfast.ops import padding

CFG = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                 max_len=16, dropout=0.0, attention_dropout=0.0)
B, MAX_LEN, BUCKETS = 3, 16, 4


@pytest.fixture
def poisoned():
    """torch.empty returns NaN (fill_uninitialized_memory, on by default under deterministic algorithms)."""
    was, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all()
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _samples(seed=0, lens=(11, 16, 7)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lens):
        ids = [2] + torch.randint(5, CFG.vocab_size, (n - 2,), generator=g).tolist() + [3]
        out.append(dict(input_ids=ids, len_a=n // 2, is_next=i % 2, seed=seed * 10 + i))
    return out


def collator(buckets):
    return PretrainingCollator(vocab_size=CFG.vocab_size, pad_token_id=0, mask_token_id=4, max_len=MAX_LEN,
                               max_predictions=4, token_buckets=buckets)


def batches(lens=(11, 16, 7)):
    """{name: batch}: exact token count, the next bucket up, the largest bucket (batch * max_len)."""
    exact = collator(0)(_samples(lens=lens))
    tokens = int(exact.attention_mask.sum())
    nxt = padding.bucket_rows(tokens, B * MAX_LEN, BUCKETS)
    out = {"exact": exact, "next": collator(BUCKETS)(_samples(lens=lens)),
           "largest": collator(0).add_layout(exact, token_buckets=1)}
    assert exact.rows == tokens and out["next"].rows == nxt and tokens < nxt < B * MAX_LEN
    assert out["largest"].rows == B * MAX_LEN
    return out


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch.model_inputs()).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, tol):
    got = {k: loss_and_grads(model, b) for k, b in batches().items()}
    loss0, grads0 = got["exact"]
    assert torch.isfinite(loss0)
    for name in ("next", "largest"):
        loss, grads = got[name]
        torch.testing.assert_close(loss, loss0, **tol, msg=name)
        assert grads.keys() == grads0.keys()
        for n in grads0:
            torch.testing.assert_close(grads[n], grads0[n], **tol, msg=f"{name}: {n}")


def test_bucket_rows():
    assert padding.bucket_rows(1, 512, 8) == 64 and padding.bucket_rows(64, 512, 8) == 64
    assert padding.bucket_rows(65, 512, 8) == 128 and padding.bucket_rows(512, 512, 8) == 512
    assert padding.bucket_rows(37, 48, 4) == 40 and padding.bucket_rows(37, 48, 0) == 37
    assert {padding.bucket_rows(t, 512, 8) for t in range(1, 513)} == {64 * k for k in range(1, 9)}


def test_padded_rows_are_inert_default_impls(poisoned):
    torch.manual_seed(0)
    model = BertForPreTraining(CFG)
    assert_same(model, dict(rtol=1e-5, atol=1e-6))


def test_varlen_attention_padded_rows_torch(poisoned):
    """The op contract itself: zero outputs and zero gradients at padding rows, real rows unchanged."""
    _varlen_contract("torch", torch.float32)


def _varlen_contract(impl, dtype):
    torch.manual_seed(1)
    cu = torch.tensor([0, 5, 9, 12], dtype=torch.int32)
    q, k, v = (torch.randn(16, 2, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    out = ops.varlen_attention(q, k, v, cu, 8, impl=impl)
    assert (out[12:] == 0).all()
    ref = ops.varlen_attention(*(t.detach()[:12].requires_grad_() for t in (q, k, v)), cu, 8, impl=impl)
    torch.testing.assert_close(out[:12], ref)
    out.float().square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and (t.grad[12:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_attention_padded_rows_triton(poisoned, dtype):
    _varlen_contract("triton", dtype)


def _triton_model_is_inert(dtype):
    torch.manual_seed(0)
    model = BertForPreTraining(CFG, impl="triton").to(dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    assert_same(model, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_rows_are_inert_with_the_models_guard(poisoned, dtype, monkeypatch):
    """An impl not known to honour padded rows gets them masked around it by the model (PADDED_ROWS_HONOURED)."""
    from bertfast.model import bert

    monkeypatch.setattr(bert, "PADDED_ROWS_HONOURED", frozenset({"torch"}))
    _triton_model_is_inert(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padded_rows_are_inert_triton_kernel_alone(poisoned, dtype, monkeypatch):
    """The kernel itself, without the model's guard: what lets "triton" join PADDED_ROWS_HONOURED."""
    from bertfast.model import bert

    monkeypatch.setattr(bert, "PADDED_ROWS_HONOURED", frozenset({"torch", "triton"}))
    _triton_model_is_inert(dtype)


@pytest.mark.parametrize("buckets", [8, 1])  # 8: the smallest bucket that holds the batch; 1: the largest
def test_one_trainer_step_is_the_same_with_bucket_padding(poisoned, tmp_path, monkeypatch, buckets):
    """One optimizer step through the trainer ends with the same parameters as the exact batch's step."""
    pytest.importorskip("datasets")
    from safetensors.torch import load_file

    from bertfast.train import TrainConfig, train
    from bertfast.train import checkpoint as ckpt

    def run(name, forced, tokenizer=None):
        orig = PretrainingCollator.add_layout
        monkeypatch.setattr(PretrainingCollator, "add_layout",
                            lambda self, b, token_buckets=None: orig(self, b, forced))
        rows = []
        monkeypatch.setattr(PretrainingCollator, "__call__", _recording(PretrainingCollator.__call__, rows))
        cfg = TrainConfig(preset="tiny", max_len=64, builtin_docs=40, batch_size=8, max_steps=1, lr=1e-2,
                          warmup_steps=0, log_every=1, checkpoint_every=1, output_dir=str(tmp_path / name),
                          progress=False, threads=1, seed=2, device="cpu", dropout=0.0, num_workers=0,
                          eval_fraction=0.0, tokenizer=tokenizer)
        train(cfg, log=lambda *_: None)
        monkeypatch.undo()
        step = tmp_path / name / "checkpoints" / ckpt.checkpoint_name(1)
        return load_file(str(step / "model.safetensors")), rows, str(tmp_path / name / "tokenizer")

    exact, rows0, tok = run("exact", 0)
    padded, rows1, _ = run("padded", buckets, tok)
    assert rows0 and set(rows0) == {0} and max(rows1) > 0, (rows0, rows1)  # the padded run had padding rows
    assert exact.keys() == padded.keys()
    for k in exact:
        torch.testing.assert_close(padded[k], exact[k], rtol=1e-5, atol=1e-6, msg=k)


def _recording(call, rows):
    def wrapped(self, samples):
        batch = call(self, samples)
        rows.append(batch.rows - int(batch.attention_mask.sum()) if batch.unpad_indices is not None else -1)
        return batch
    return wrapped
