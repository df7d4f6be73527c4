"""bertfast.train.pretrained.load_pretrained: run folders, checkpoints, transformers folders, hub names, and bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch

from bertfast import BertConfig, BertForPreTraining
from bertfast.train import checkpoint as ckpt
from bertfast.train.pretrained import load_pretrained

WORDS = ("the a cat dog sat on mat ran to house big small red blue is was and he she it they saw "
         "paris london city river bank").split()


def make_tokenizer(folder=None):
    """A small BertTokenizerFast (special tokens + WORDS), saved to `folder` when given."""
    import tempfile

    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vocab.txt")
        with open(path, "w") as f:
            f.write("\n".join(vocab) + "\n")
        tok = BertTokenizerFast(vocab=path, do_lower_case=True)
    assert len(tok) == len(vocab)
    if folder is not None:
        tok.save_pretrained(folder)
    return tok


def tiny_config(**kw) -> BertConfig:
    fields = dict(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_len=32)
    fields.update(kw)
    return BertConfig(**fields)


def hf_tiny_config():
    import transformers

    c = tiny_config()
    return transformers.BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                   num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                                   intermediate_size=c.intermediate_size, max_position_embeddings=c.max_len)


def make_run(root, steps=(1, 2), seed=0):
    """A folder laid out as `python -m bertfast.pretrain --output-dir root` leaves it; returns {step: model}."""
    tok = make_tokenizer(os.path.join(root, "tokenizer"))
    config = tiny_config(vocab_size=len(tok))
    with open(os.path.join(root, "model_config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    models = {}
    for i, step in enumerate(steps):
        torch.manual_seed(seed + i)
        m = BertForPreTraining(config)
        ckpt.save_checkpoint(str(root), step, m, config.to_dict(), {"step": step}, keep=10)
        models[step] = m
    return models


def batch(tok):
    enc = tok(["the cat sat on the mat", "he saw a big red house"], ["it ran", "they ran to the city river bank"],
              padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------- bertfast runs
def test_run_folder_gives_latest_checkpoint_and_run_tokenizer(tmp_path):
    models = make_run(tmp_path)
    loaded = load_pretrained(tmp_path)
    model, tok = loaded
    assert loaded.kind == "run" and loaded.step == 2 and loaded.config == models[2].config
    assert loaded.path.endswith("step_00000002")
    same_weights(model, models[2])
    assert not model.training
    assert tok.convert_tokens_to_ids("paris") == WORDS.index("paris") + 5
    assert "step 2" in loaded.describe()


def test_run_folder_skips_a_damaged_newest_checkpoint_with_a_warning(tmp_path):
    models = make_run(tmp_path)
    weights = os.path.join(tmp_path, "checkpoints", "step_00000002", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="step_00000002"):
        loaded = load_pretrained(tmp_path)
    assert loaded.step == 1
    same_weights(loaded.model, models[1])


def test_run_folder_with_every_checkpoint_damaged_or_none(tmp_path):
    make_run(tmp_path, steps=(3,))
    with open(os.path.join(tmp_path, "checkpoints", "step_00000003", "model.safetensors"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="every checkpoint .* damaged.*model.safetensors"):
        load_pretrained(tmp_path)
    empty_run = tmp_path / "other"
    (empty_run / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_pretrained(empty_run)


def test_checkpoint_folder_finds_its_run_tokenizer(tmp_path):
    models = make_run(tmp_path)
    loaded = load_pretrained(tmp_path / "checkpoints" / "step_00000001")
    assert loaded.kind == "checkpoint" and loaded.step == 1
    same_weights(loaded.model, models[1])
    assert len(loaded.tokenizer) == loaded.config.vocab_size


def test_damaged_checkpoint_folder_is_named(tmp_path):
    make_run(tmp_path, steps=(1,))
    step = tmp_path / "checkpoints" / "step_00000001"
    with open(step / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"garbage!")
    with pytest.raises(ValueError, match=r"step_00000001.*model.safetensors"):
        load_pretrained(step)


def test_checkpoint_without_tokenizer_anywhere(tmp_path):
    make_run(tmp_path, steps=(1,))
    import shutil

    shutil.rmtree(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="holds no tokenizer") as e:
        load_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)
    # ... unless one is named
    loaded = load_pretrained(tmp_path, tokenizer=make_tokenizer())
    assert loaded.step == 1


def test_device_and_impl_are_passed_on(tmp_path):
    make_run(tmp_path, steps=(1,))
    model, _ = load_pretrained(tmp_path, device="cpu", impl="torch", unpad=False)
    assert model.impl == "torch" and model.unpad is False
    assert next(model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("cls_name, new_heads", [
    ("BertModel", ["the MLM head", "the NSP head"]),
    ("BertForMaskedLM", ["the NSP head", "the pooler"]),
    ("BertForPreTraining", []),
])
def test_transformers_folder(tmp_path, cls_name, new_heads):
    import transformers

    torch.manual_seed(1)
    hf = getattr(transformers, cls_name)(hf_tiny_config()).eval()
    hf.save_pretrained(tmp_path)
    tok = make_tokenizer(tmp_path)
    loaded = load_pretrained(tmp_path)
    model, tok2 = loaded
    assert loaded.kind == "transformers" and len(tok2) == len(tok)
    assert sorted(loaded.new_heads()) == sorted(new_heads)
    # the encoder is the saved one: the same hidden states as transformers' model on the same input
    ids, mask, types = batch(tok)
    hf_base = hf if cls_name == "BertModel" else hf.bert
    with torch.no_grad():
        want = hf_base(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        ours = BertForPreTraining.from_hf(model.to_hf_state_dict(), config=model.config)
        ref = transformers.BertForPreTraining(hf_tiny_config()).eval()
        ref.load_state_dict(ours.to_hf_state_dict(), strict=True)
        got = ref.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
    if cls_name == "BertForPreTraining":  # whole model, heads included, through bertfast's own forward
        with torch.no_grad():
            want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
            _, scores, nsp = model(ids, mask, types)
        torch.testing.assert_close(scores[mask.bool()], want.prediction_logits[mask.bool()], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(nsp, want.seq_relationship_logits, rtol=1e-4, atol=1e-4)
    else:
        assert "freshly initialised" in loaded.describe()


def test_transformers_folder_without_tokenizer_or_with_damaged_weights(tmp_path):
    import transformers

    hf = transformers.BertForPreTraining(hf_tiny_config())
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no tokenizer") as e:
        load_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)
    make_tokenizer(tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "model.safetensors") // 2)
    with pytest.raises(ValueError, match="cannot be read") as e:
        load_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_transformers_folder_of_another_model_type(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 40}, f)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="'gpt2' model"):
        load_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- bad input
def test_empty_missing_and_weightless_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="is empty: expected a bertfast run folder") as e:
        load_pretrained(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no model"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pretrained(str(tmp_path / "nope" / "deeper" / "x"))
    with pytest.raises(ValueError, match="is a file"):
        load_pretrained(tmp_path / "notes.txt")
    (tmp_path / "config.json").write_text(json.dumps(hf_tiny_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_pretrained(tmp_path)


def test_hub_name_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a model in the local Hugging Face cache") as e:
        load_pretrained("someone/bert-that-is-not-cached")
    assert "someone/bert-that-is-not-cached" in str(e.value)


def test_hub_name_from_the_local_cache(tmp_path, monkeypatch):
    """A hub name resolves through transformers' own lookup; a snapshot in the cache layout is found offline."""
    import transformers

    hf_home = tmp_path / "hf_home"
    snap = hf_home / "hub" / "models--someone--tiny-bert" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (hf_home / "hub" / "models--someone--tiny-bert" / "refs").mkdir()
    (hf_home / "hub" / "models--someone--tiny-bert" / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(3)
    hf = transformers.BertForMaskedLM(hf_tiny_config())
    hf.save_pretrained(snap)
    make_tokenizer(snap)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "HF_HUB_CACHE", str(hf_home / "hub"), raising=False)
    monkeypatch.chdir(tmp_path)
    loaded = load_pretrained("someone/tiny-bert")
    assert loaded.kind == "hub"
    torch.testing.assert_close(loaded.model.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight)
    assert sorted(loaded.new_heads()) == ["the NSP head", "the pooler"]
