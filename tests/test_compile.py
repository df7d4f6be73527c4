"""torch.compile traces the model and its custom ops (fake kernels, autograd registrations)."""
import pytest
import torch

from bertfast import BertConfig, BertForPreTraining

CFG = BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                 max_len=16, dropout=0.0, attention_dropout=0.0)


@pytest.mark.parametrize("unpad", [True, False])
def test_compiled_model_matches_eager(unpad):
    torch._dynamo.reset()
    model = BertForPreTraining(CFG, unpad=unpad)
    model.check_inputs = False
    ids = torch.randint(1, CFG.vocab_size, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    positions = torch.tensor([[1, 4], [2, -1]])
    mlm_labels = torch.tensor([[5, 6], [7, -100]])
    nsp = torch.tensor([1, 0])
    kwargs = dict(attention_mask=mask, mlm_positions=positions, mlm_labels=mlm_labels, next_sentence_label=nsp)
    eager = model(ids, **kwargs).loss
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(ids, **kwargs).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)
