"""bertfast.ops.padding: the padded <-> unpadded layouts the model, the varlen reference, tests and benchmarks share."""
import pytest
import torch

from bertfast import padding, reference


def _mask(rows):
    return torch.tensor(rows, dtype=torch.long)


# right padding, left padding, an empty row, a full row
MASK = _mask([[1, 1, 1, 0, 0],
              [0, 0, 1, 1, 1],
              [0, 0, 0, 0, 0],
              [1, 1, 1, 1, 1]])


def test_layout_from_mask():
    lay = padding.layout_from_mask(MASK)
    assert lay.cu_seqlens.dtype == torch.int32 and lay.cu_seqlens.tolist() == [0, 3, 6, 6, 11]
    assert lay.max_seqlen == 5 and (lay.batch, lay.seqlen, lay.total) == (4, 5, 11)
    assert lay.indices.tolist() == MASK.reshape(-1).nonzero().squeeze(1).tolist()
    assert lay.seqlens.tolist() == [3, 3, 0, 5]
    assert lay.sequence_index().tolist() == [0] * 3 + [1] * 3 + [3] * 5
    # positions count from each sequence's first real token, whatever the padding side
    assert lay.position_ids().tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4]
    assert lay.first_token_index().tolist() == [0, 3, -1, 6]


def test_unpad_pad_roundtrip_and_gradient():
    x = torch.randn(4, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    xu, lay = padding.unpad_input(x, MASK)
    assert xu.shape == (11, 3, 2)
    torch.testing.assert_close(xu, x[MASK.bool()])
    back = padding.pad_input(xu, lay)
    torch.testing.assert_close(back, x * MASK[:, :, None, None])
    back.sum().backward()
    torch.testing.assert_close(x.grad, MASK[:, :, None, None].double().expand_as(x))


def test_layout_from_cu_seqlens_is_the_right_padded_layout():
    seqlens = torch.tensor([3, 0, 5, 1])
    cu = padding.cu_seqlens_from_seqlens(seqlens)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 3, 8, 9]
    a = padding.layout_from_cu_seqlens(cu, 6, total=9)
    b = padding.layout_from_seqlens(seqlens, seqlen=6)
    c = padding.layout_from_cu_seqlens(cu, 6)
    for other in (b, c):
        assert torch.equal(a.indices, other.indices) and torch.equal(a.cu_seqlens, other.cu_seqlens)
        assert (a.batch, a.seqlen) == (other.batch, other.seqlen) == (4, 6)
    assert padding.layout_from_seqlens(seqlens).seqlen == 5


def test_unpadded_rows_maps_padding_and_unused_to_minus_one():
    lay = padding.layout_from_mask(MASK)
    flat = torch.tensor([0, 2, 3, 7, 5, 10, 15, 19, -1])  # (row 0, col 0/2/3), (1, 2), (1, 0), (2, 0), (3, 0/4)
    assert lay.unpadded_rows(flat).tolist() == [0, 2, -1, 3, -1, -1, 6, 10, -1]


def test_first_token_columns():
    assert padding.first_token_columns(MASK).tolist() == [0, 2, 0, 0]


def test_check_mask():
    padding.check_mask(MASK)
    padding.check_mask(MASK.bool())
    with pytest.raises(ValueError, match="attention_mask row 1 has padding between real tokens"):
        padding.check_mask(_mask([[1, 1, 0], [1, 0, 1]]))
    with pytest.raises(ValueError, match="only 0 .padding. and 1"):
        padding.check_mask(_mask([[1, 2, 0]]))


@pytest.mark.parametrize("seqlens", [[5, 0, 33, 1], [7]])
def test_reference_varlen_attention_equals_padded_attention(seqlens):
    """reference.varlen_attention (built on padding) against reference.attention on the padded batch, float64."""
    seqlens = torch.tensor(seqlens)
    s, h, d = int(seqlens.max()), 2, 8
    lay = padding.layout_from_seqlens(seqlens)
    q, k, v = (torch.randn(len(seqlens), s, h, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.arange(s)[None, :] < seqlens[:, None]
    ref = reference.attention(q, k, v, mask)
    qu, ku, vu = (lay.unpad(t) for t in (q, k, v))
    out = reference.varlen_attention(qu, ku, vu, lay.cu_seqlens, lay.max_seqlen)
    torch.testing.assert_close(out, lay.unpad(ref))
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), dout)
    gr = torch.autograd.grad(lay.unpad(ref), (q, k, v), dout)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)
