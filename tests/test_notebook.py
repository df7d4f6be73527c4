"""The seed notebook's calls (shared/seeds/000_*.txt) with bertfast's names: load_data(...) -> (tokenizer,
dataloader), the keyword BertForPreTraining, a trainer loop reading data.input_ids / data.labels / data.is_next
and unpacking total_loss, prediction_scores, seq_relationship_score. The hub corpora are replaced by the
built-in one (no network here); the hub code path is tested in test_data.py on local parquet files."""
import itertools

import pytest
import torch

from bertfast import BertForPreTraining
from bertfast.data import load_data


def test_notebook_flow(tmp_path):
    pytest.importorskip("datasets", reason="the data pipeline needs `datasets` (see scripts/gpu_wheels.sh)")
    tokenizer, book_dl = load_data("builtin", loading_ratio=0.1, batch_size=8, max_len=64, builtin_docs=120,
                                   vocab_size=600, output_dir=str(tmp_path))
    _, wiki_dl = load_data("builtin", loading_ratio=1 / 41 * 4, batch_size=8, max_len=64, builtin_docs=120,
                           tokenizer=tokenizer, seed=1)
    dataloader_size = len(book_dl) + len(wiki_dl)
    assert len(book_dl) > 0 and len(wiki_dl) > 0

    bert = BertForPreTraining(vocab_size=tokenizer.vocab_size, type_vocab_size=2, hidden_size=64, max_len=64,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, dropout=0.1,
                              pad_token_idx=tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(bert.parameters(), lr=1e-3, weight_decay=0.01)
    total_correct = total_element = 0
    losses = []
    for i, data in enumerate(itertools.islice(itertools.chain(book_dl, wiki_dl), 6)):
        outputs = bert.forward(input_ids=data.input_ids, attention_mask=data.attention_mask,
                               token_type_ids=data.token_type_ids, labels=data.labels,
                               next_sentence_label=data.is_next)
        total_loss, prediction_scores, seq_relationship_score = outputs
        optimizer.zero_grad()
        total_loss.backward()
        optimizer.step()
        correct = seq_relationship_score.argmax(dim=-1).eq(data.is_next.squeeze(-1)).sum().item()
        total_correct += correct
        total_element += data.is_next.nelement()
        losses.append(total_loss.item())
        assert prediction_scores.shape == (int((data.labels != -100).sum()), tokenizer.vocab_size)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert total_element == 6 * 8 and 0 <= total_correct <= total_element
    assert dataloader_size >= 6
