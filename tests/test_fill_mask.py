"""`python -m bertfast.fill_mask`: top-k predictions per [MASK], equal to transformers' MLM head; clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from bertfast.downstream.fill_mask import FillMaskError, fill_mask, main

from _utils import assert_one_line_error

WORDS = "the a cat dog sat on mat ran to house big small paris london is capital of france".split()


@pytest.fixture(scope="module")
def mlm_folder(tmp_path_factory):
    """A transformers BertForMaskedLM (2 layers x 32) and its word-level tokenizer; the MLM bias favours 'paris'."""
    import transformers

    folder = tmp_path_factory.mktemp("mlm")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=24)
    hf = transformers.BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        hf.cls.predictions.bias[vocab.index("paris")] = 6.0
    hf.save_pretrained(folder)
    return str(folder), hf, tok


def test_probabilities_equal_transformers(mlm_folder):
    from bertfast.train.pretrained import load_pretrained

    folder, hf, tok = mlm_folder
    model, tok2 = load_pretrained(folder)
    text = "[MASK] is the capital of [MASK] ."
    preds = fill_mask(model, tok2, text, top_k=4)
    assert len(preds) == 2 and all(len(row) == 4 for row in preds)
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**enc).logits[0]
    where = (enc["input_ids"][0] == tok.mask_token_id).nonzero().squeeze(1)
    probs = logits[where].softmax(-1)
    for row, p in zip(preds, probs):
        top = p.topk(4)
        assert [t for t, _ in row] == tok.convert_ids_to_tokens(top.indices.tolist())
        torch.testing.assert_close(torch.tensor([q for _, q in row]), top.values, rtol=1e-4, atol=1e-5)
        assert row[0][0] == "paris" and row[0][1] > 0.5  # the bias set above
    assert all(row[i][1] >= row[i + 1][1] for row in preds for i in range(3))


def test_cli_prints_table_and_json(mlm_folder, capsys):
    folder, _, _ = mlm_folder
    assert main([folder, "the cat sat on the [MASK]", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "[MASK] 1: paris " in out and "-> the cat sat on the paris\n" in out
    assert main([folder, "a [MASK] dog", "[MASK] ran", "--json", "--top-k", "2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["a [MASK] dog", "[MASK] ran"]
    assert all(len(x["masks"]) == 1 and len(x["masks"][0]) == 2 for x in lines)
    assert lines[0]["masks"][0][0]["token"] == "paris" and lines[1]["filled"] == "paris ran"


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    return err


def test_errors(mlm_folder, tmp_path, capsys):
    folder, _, _ = mlm_folder
    err = _error([folder, "no mask here"], capsys)
    assert "argument text: no [MASK] in the text 'no mask here'" in err
    err = _error([str(tmp_path / "missing"), "a [MASK]"], capsys)
    assert "argument model:" in err and "missing" in err and "no such folder" in err
    err = _error([str(tmp_path), "a [MASK]"], capsys)
    assert "is empty" in err
    err = _error([folder, "a [MASK]", "--top-k", "0"], capsys)
    assert "--top-k: must be >= 1" in err
    err = _error([folder, " ".join(["cat"] * 30) + " [MASK]"], capsys)
    assert "tokens long, the model takes at most 24" in err


def test_no_mask_token_in_tokenizer_is_refused(mlm_folder):
    from bertfast.train.pretrained import load_pretrained

    folder, _, _ = mlm_folder
    model, tok = load_pretrained(folder)
    with pytest.raises(FillMaskError, match="no \\[MASK\\]"):
        fill_mask(model, tok, "the cat")


def test_a_padded_vocabulary_is_never_proposed(mlm_folder, tmp_path):
    """A model whose vocabulary is padded past the tokenizer's (a multiple of 8): the padded ids keep their share
    of the softmax (the probabilities stay the model's) but are never among the predictions, however likely."""
    import transformers

    from bertfast.train.pretrained import load_pretrained

    folder, hf, tok = mlm_folder
    cfg = hf.config.to_dict()
    cfg["vocab_size"] = -(-len(tok) // 8) * 8 + 8  # at least 8 padded ids
    padded = transformers.BertForMaskedLM(transformers.BertConfig(**cfg)).eval()
    with torch.no_grad():
        padded.cls.predictions.bias[len(tok):] = 50.0  # each padded id would win the top 5
    padded.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_pretrained(str(tmp_path))
    preds = fill_mask(model, tok2, "the cat sat on the [MASK] .", top_k=5)
    assert len(preds[0]) == 5 and all(word in tok.get_vocab() for word, _ in preds[0])
    assert sum(p for _, p in preds[0]) < 1e-6  # the padded ids hold nearly all the mass, as in the model
