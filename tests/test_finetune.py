"""bertfast.downstream.tasks and `python -m bertfast.finetune`: metrics against scikit-learn / scipy, GLUE through local parquet
shaped like the hub's, local files in every format, bad input, the built-in task, and whole runs (tiny model)."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from bertfast.downstream import finetune
from bertfast.downstream.tasks import GLUE, Examples, TaskError, builtin_task, compute_metrics, load_files, load_glue, load_task

from _utils import assert_one_line_error

# ---------------------------------------------------------------------------------------------- helpers
SENTS = [("the cat sat on the mat", "a cat was on a mat", 1), ("he ran to the big house", "she ate a red apple", 0),
         ("they saw the river bank", "the river bank was seen", 1), ("it is small and blue", "it was huge", 0),
         ("she saw a dog", "a dog was seen by her", 1), ("the city is big", "the mat is red", 0)]


def _vocab_words():
    words = set()
    tr, va = builtin_task(200, 100)
    for ex in (tr, va):
        for t in ex.text + (ex.text_pair or []):
            words.update(re.findall(r"\w+|[^\w\s]", t.lower()))
    for a, b, _ in SENTS:
        words.update((a + " " + b).split())
    return sorted(words)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A transformers BertForPreTraining (2 layers x 32) with a word-level vocabulary, saved as a folder."""
    import transformers

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _vocab_words()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertForPreTraining(cfg).save_pretrained(folder)
    return str(folder)


def _write(path, rows: dict):
    """rows: {column: values} -> a .csv / .tsv / .jsonl / .parquet file."""
    import pandas as pd

    df = pd.DataFrame(rows)
    ext = os.path.splitext(str(path))[1]
    if ext == ".csv":
        df.to_csv(path, index=False)
    elif ext == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif ext == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path, index=False)
    return str(path)


def _pairs(n=None, label=lambda i, y: y):
    rows = SENTS if n is None else [SENTS[i % len(SENTS)] for i in range(n)]
    return {"premise": [a for a, _, _ in rows], "hypothesis": [b for _, b, _ in rows],
            "label": [label(i, y) for i, (_, _, y) in enumerate(rows)]}


def _quick(tiny_model, out, **kw) -> finetune.FinetuneConfig:
    fields = dict(model=tiny_model, epochs=1, batch_size=16, lr=1e-3, output_dir=str(out), progress=False,
                  device="cpu", builtin_train=240, builtin_validation=80)
    fields.update(kw)
    return finetune.FinetuneConfig(**fields)


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_match_hand_computed_values_and_sklearn_scipy():
    from scipy import stats
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    y = [1, 0, 1, 1, 0, 0, 1, 0]
    p = [1, 0, 0, 1, 0, 1, 1, 1]  # TP 3, TN 2, FP 2, FN 1
    m = compute_metrics(("accuracy", "f1", "matthews", "macro_f1"), p, y)
    assert m["accuracy"] == pytest.approx(5 / 8) == accuracy_score(y, p)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1)) == pytest.approx(f1_score(y, p))
    mcc = (3 * 2 - 2 * 1) / np.sqrt((3 + 2) * (3 + 1) * (2 + 2) * (2 + 1))
    assert m["matthews"] == pytest.approx(mcc) == pytest.approx(matthews_corrcoef(y, p))
    f1_neg = 2 * 2 / (2 * 2 + 1 + 2)
    assert m["macro_f1"] == pytest.approx((m["f1"] + f1_neg) / 2)

    s = [0.5, 2.0, 1.0, 4.5, 3.0]
    t = [1.0, 1.5, 2.0, 5.0, 2.5]
    r = compute_metrics(("pearson", "spearman", "mse"), s, t)
    assert r["pearson"] == pytest.approx(stats.pearsonr(s, t)[0]) == pytest.approx(np.corrcoef(s, t)[0, 1])
    # ranks 1 3 2 5 4 vs 1 2 3 5 4: d^2 = 0 1 1 0 0 -> 1 - 6 * 2 / (5 * 24)
    assert r["spearman"] == pytest.approx(1 - 6 * 2 / (5 * 24)) == pytest.approx(stats.spearmanr(s, t)[0])
    assert r["mse"] == pytest.approx(np.mean((np.array(s) - np.array(t)) ** 2))
    # constant predictions: no correlation can be measured -> 0, not NaN
    assert compute_metrics(("pearson", "spearman"), [1.0] * 5, t) == {"pearson": 0.0, "spearman": 0.0}
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(("bleu",), p, y)
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        compute_metrics(("accuracy",), [0, 1, 1], [0, 1])


def test_each_glue_task_names_the_glue_metric():
    assert GLUE["cola"].metrics == ("matthews",)
    assert set(GLUE["mrpc"].metrics) == set(GLUE["qqp"].metrics) == {"f1", "accuracy"}
    assert GLUE["stsb"].metrics == ("pearson", "spearman") and GLUE["stsb"].label_names == ()
    for name in ("sst2", "mnli", "qnli", "rte", "wnli"):
        assert GLUE[name].metrics == ("accuracy",)
    assert GLUE["mnli"].validation == "validation_matched" and len(GLUE["mnli"].label_names) == 3


# ---------------------------------------------------------------------------------------------- GLUE
def _glue_dir(root, name, n_train=24, n_val=8):
    """A local copy shaped like the hub's nyu-mll/glue: NAME/SPLIT-00000-of-00001.parquet with its columns."""
    t = GLUE[name]
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), (t.validation, n_val), ("test", 4)):
        rows = [SENTS[i % len(SENTS)] for i in range(n)]
        cols = {t.columns[0]: [a for a, _, _ in rows]}
        if t.columns[1]:
            cols[t.columns[1]] = [b for _, b, _ in rows]
        if t.label_names:
            cols["label"] = [(-1 if split == "test" else (y if len(t.label_names) == 2 else i % 3))
                             for i, (_, _, y) in enumerate(rows)]
        else:
            cols["label"] = [float(2.5 * y + 0.1 * (i % 7)) for i, (_, _, y) in enumerate(rows)]
        cols["idx"] = list(range(n))
        _write(d / f"{split}-00000-of-00001.parquet", cols)
    return root


@pytest.mark.parametrize("name", sorted(GLUE))
def test_glue_tasks_through_datasets_on_local_parquet(tmp_path, name):
    data = load_glue(name, glue_dir=str(_glue_dir(tmp_path, name)))
    t = GLUE[name]
    assert data.name == f"glue/{name}" and len(data.train) == 24 and len(data.validation) == 8
    assert data.train.text[0] == SENTS[0][0]
    assert (data.train.text_pair is None) == (t.columns[1] is None)
    assert data.regression == (name == "stsb") and data.metrics == t.metrics
    if name == "stsb":
        assert all(isinstance(x, float) for x in data.train.labels)
    else:
        assert data.num_labels == len(t.label_names) and set(data.train.labels) <= set(range(data.num_labels))


def test_glue_bad_input(tmp_path):
    with pytest.raises(TaskError, match="has no mrpc/train-\\*.parquet"):
        load_glue("mrpc", glue_dir=str(tmp_path))
    _glue_dir(tmp_path, "mrpc")
    os.remove(tmp_path / "mrpc" / "validation-00000-of-00001.parquet")
    with pytest.raises(TaskError, match="has no mrpc/validation-\\*.parquet"):
        load_glue("mrpc", glue_dir=str(tmp_path))
    with pytest.raises(TaskError, match="unknown GLUE task; choose one of cola"):
        load_glue("squad", glue_dir=str(tmp_path))
    d = _glue_dir(tmp_path, "rte")
    _write(d / "rte" / "train-00000-of-00001.parquet", {"sentence1": ["a"], "label": [0]})  # no sentence2
    with pytest.raises(TaskError, match="split 'train' has no column 'sentence2'"):
        load_glue("rte", glue_dir=str(d))


def test_glue_from_the_hub_while_offline_says_what_to_do(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TaskError, match="could not be loaded from nyu-mll/glue.*--glue-dir"):
        load_glue("cola", cache_dir=None)


# ---------------------------------------------------------------------------------------------- local files
@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_local_files_every_format(tmp_path, ext):
    names = {1: "same", 0: "different"}
    tr = _write(tmp_path / f"train{ext}", _pairs(label=lambda i, y: names[y]))
    va = _write(tmp_path / f"val{ext}", _pairs(label=lambda i, y: names[y]))
    data = load_files(tr, va, text_column="premise", text_pair_column="hypothesis", label_column="label")
    assert data.label_names == ["different", "same"]  # sorted class names -> ids
    assert data.train.labels == [1 if y else 0 for _, _, y in SENTS]
    assert data.train.text == [a for a, _, _ in SENTS] and data.validation.text_pair == [b for _, b, _ in SENTS]
    assert not data.regression and data.metrics == ("accuracy", "f1")


def test_local_files_label_kinds(tmp_path):
    # integers: each distinct value a class, in order (here 3 classes -> macro F1 too)
    tr = _write(tmp_path / "t.csv", {"text": ["a b", "c d", "e f", "g h"], "y": [5, 7, 9, 5]})
    data = load_files(tr, tr, text_column="text", text_pair_column=None, label_column="y")
    assert data.label_names == ["5", "7", "9"] and data.train.labels == [0, 1, 2, 0]
    assert data.metrics == ("accuracy", "macro_f1") and data.train.text_pair is None
    # floats: regression
    tr = _write(tmp_path / "r.jsonl", {"text": ["a", "b", "c"], "score": [0.5, 1.25, 4.0]})
    data = load_files(tr, tr, text_column="text", text_pair_column=None, label_column="score")
    assert data.regression and data.num_labels == 1 and data.train.labels == [0.5, 1.25, 4.0]
    assert data.metrics == ("pearson", "spearman", "mse")
    # booleans: classes
    tr = _write(tmp_path / "b.parquet", {"text": ["a", "b", "c"], "ok": [True, False, True]})
    data = load_files(tr, tr, text_column="text", text_pair_column=None, label_column="ok")
    assert data.label_names == ["False", "True"] and data.train.labels == [1, 0, 1]


def _task_error(match, **kw):
    with pytest.raises(TaskError, match=match):
        load_files(**{"text_column": "premise", "text_pair_column": "hypothesis", "label_column": "label", **kw})


def test_local_files_bad_input_names_the_problem(tmp_path):
    good = _write(tmp_path / "good.csv", _pairs())
    _task_error(r"--text-column 'sentence': .*good.csv has no such column \(columns: premise, hypothesis, label\)",
                train=good, validation=good, text_column="sentence")
    _task_error("--text-pair-column 'sentence2'", train=good, validation=good, text_pair_column="sentence2")
    _task_error("--label-column 'gold'", train=good, validation=good, label_column="gold")
    _task_error(r"--train .*missing.csv: no such file", train=str(tmp_path / "missing.csv"), validation=good)
    (tmp_path / "empty.csv").write_text("")
    _task_error(r"--validation .*empty.csv: the file is empty", train=good, validation=str(tmp_path / "empty.csv"))
    (tmp_path / "header.csv").write_text("premise,hypothesis,label\n")
    _task_error(r"header.csv: the file holds no rows", train=str(tmp_path / "header.csv"), validation=good)
    (tmp_path / "x.txt").write_text("a\n")
    _task_error("unsupported file type", train=str(tmp_path / "x.txt"), validation=good)
    # labels of the wrong type: floats in one file, class names in the other; a list; a missing label
    strs = _write(tmp_path / "strs.csv", _pairs(label=lambda i, y: "yes" if y else "no"))
    floats = _write(tmp_path / "floats.csv", _pairs(label=lambda i, y: y + 0.5))
    _task_error(r"strs.csv holds class labels but .*floats.csv holds float ones", train=strs, validation=floats)
    lists = _write(tmp_path / "lists.jsonl", _pairs(label=lambda i, y: [y]))
    _task_error("holds labels of type list; expected class names", train=lists, validation=lists)
    holes = _write(tmp_path / "holes.csv", _pairs(label=lambda i, y: None if i == 2 else "x"))
    _task_error(r"holes.csv row 2 has no label", train=holes, validation=holes)
    # a class the training file does not have; one class only; a missing text
    other = _write(tmp_path / "other.csv", _pairs(label=lambda i, y: "maybe"))
    _task_error(r"other.csv holds label 'maybe', which .*strs.csv does not have", train=strs, validation=other)
    _task_error("one class only", train=other, validation=other)
    notext = _write(tmp_path / "notext.csv", {**_pairs(), "premise": ["a", None, "b", "c", "d", "e"]})
    _task_error(r"notext.csv column 'premise': row 1 holds missing, expected text", train=notext, validation=good)


def test_load_task_routes_and_refuses(tmp_path):
    with pytest.raises(TaskError, match="unknown task; choose one of builtin, glue/cola"):
        load_task("imdb")
    with pytest.raises(TaskError, match="write glue/sst2"):
        load_task("sst2")
    with pytest.raises(TaskError, match="--validation: give both"):
        load_task(None, train="x.csv")
    with pytest.raises(TaskError, match="not both"):
        load_task("builtin", train="x.csv", validation="y.csv")
    assert load_task("builtin", builtin_train=10, builtin_validation=5).label_names == ["unacceptable", "acceptable"]


# ---------------------------------------------------------------------------------------------- built-in task
def _corpus_categories():
    """word -> "noun" / "verb", from the pretraining corpus' own tables (what pretraining can teach)."""
    from bertfast.data.builtin_corpus import TOPICS

    cats = {}
    for t in TOPICS.values():
        for k, cat in (("things", "noun"), ("area", "noun"), ("verbs", "verb")):
            for w in t[k]:
                cats.setdefault(w, set()).add(cat)
    return cats


def _slots(sentence):
    """The words standing in the {thing} / {area} / {verb} places of the template `sentence` was made from."""
    from bertfast.downstream.tasks import _TASK_TEMPLATES

    for t in _TASK_TEMPLATES:
        pattern = re.escape(t)
        for field in ("thing", "area", "verb"):
            pattern = pattern.replace(re.escape("{" + field + "}"), rf"(?P<{field}>[a-z]+)")
        pattern = re.sub(r"\\\{\w+\\\}", r"[\\w ]+?", pattern)
        m = re.fullmatch(pattern, sentence)
        if m:
            return m.groupdict()
    raise AssertionError(f"no template makes {sentence!r}")


def test_builtin_task_is_fixed_balanced_and_decided_by_word_order():
    tr, va = builtin_task(2000, 1000)
    tr2, va2 = builtin_task(2000, 1000)
    assert (tr.text, tr.labels, va.text, va.labels) == (tr2.text, tr2.labels, va2.text, va2.labels)
    assert tr.text_pair is None and va.text_pair is None
    assert builtin_task(50, 10, seed=1)[0].text != tr.text[:50]
    assert 0.45 < np.mean(tr.labels) < 0.55 and 0.45 < np.mean(va.labels) < 0.55
    # the label is "a verb stands where the verb belongs": knowing which corpus words are verbs and which nouns (what
    # the corpus teaches) decides every sentence
    cats = _corpus_categories()
    for ex in (tr, va):
        for s, y in zip(ex.text, ex.labels):
            slots = _slots(s)
            want = {f: ("verb" if f == "verb" else "noun") for f in slots}
            assert all(len(cats[w]) == 1 for w in slots.values()), s  # no word is both a noun and a verb
            assert all(want[f] in cats[w] for f, w in slots.items()) == bool(y), (s, y)
    # no shortcut: a bag-of-words model (the two versions hold the same words), one of the sentence's length, and the
    # template alone (every word but the swapped ones) score at chance on validation, even fitted on half of it
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = CountVectorizer().fit(tr.text + va.text)
    skeleton = lambda e: [" ".join("_" if w in cats else w for w in re.findall(r"[\w-]+", s)) for s in e.text]
    skel_vec = CountVectorizer(ngram_range=(1, 3)).fit(skeleton(tr) + skeleton(va))
    half = len(va) // 2
    va_a, va_b = Examples(va.text[:half], None, va.labels[:half]), Examples(va.text[half:], None, va.labels[half:])
    for fit_on, score_on in ((tr, va), (va_a, va_b)):
        for feats in (lambda e: vec.transform(e.text), lambda e: np.array([[len(s.split())] for s in e.text]),
                      lambda e: skel_vec.transform(skeleton(e))):
            clf = LogisticRegression(max_iter=2000).fit(feats(fit_on), fit_on.labels)
            assert clf.score(feats(score_on), score_on.labels) < 0.58


def test_builtin_task_holds_out_words_and_sentences_from_pretraining():
    from bertfast.data.builtin_corpus import builtin_texts

    tr, va = builtin_task(2000, 1000)
    words = lambda ex: {w for s in ex.text for w in _slots(s).values()}
    train_words, val_words = words(tr), words(va)
    assert len(train_words) >= 100 and len(val_words) >= 60 and not (train_words & val_words)
    corpus_text = " ".join(builtin_texts())
    corpus = {s.strip().rstrip(".") for doc in builtin_texts(200) for s in doc.split(". ")}
    assert not any(s.rstrip(".") in corpus for s in tr.text[:300] + va.text[:300])
    assert all(re.search(rf"\b{w}\b", corpus_text) for w in val_words)  # ... but the corpus holds every one of them
    from bertfast.downstream.tasks import _TASK_SYL, _TASK_TOWNS

    assert not any(t in corpus_text for t in _TASK_TOWNS)
    names = {s.split()[0] for s in tr.text + va.text} - {"Nobody", "Yesterday", "Everything", "Someone", "The",
                                                         "After"}
    assert names and all(n[:2].lower() in {x[:2] for x in _TASK_SYL} for n in names)
    assert not any(re.search(rf"\b{n}\b", corpus_text) for n in names)


# ---------------------------------------------------------------------------------------------- whole runs
def test_finetune_builtin_writes_metrics_and_results_and_is_reproducible(tiny_model, tmp_path):
    r1 = finetune.run(_quick(tiny_model, tmp_path / "a", task="builtin", epochs=2), log=lambda m: None)
    assert set(r1) >= {"accuracy", "eval_loss", "train_loss", "task", "labels"} and r1["task"] == "builtin"
    assert 0.0 <= r1["accuracy"] <= 1.0 and r1["num_train"] == 240 and r1["num_validation"] == 80
    lines = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [x["epoch"] for x in lines] == [1, 2] and all("accuracy" in x and "eval_loss" in x for x in lines)
    saved = json.load(open(tmp_path / "a" / "results.json"))
    assert saved["accuracy"] == lines[-1]["accuracy"] == r1["accuracy"]
    r2 = finetune.run(_quick(tiny_model, tmp_path / "b", task="builtin", epochs=2), log=lambda m: None)
    assert (r2["accuracy"], r2["train_loss"]) == (r1["accuracy"], r1["train_loss"])
    r3 = finetune.run(_quick(tiny_model, tmp_path / "c", task="builtin", epochs=2, seed=1), log=lambda m: None)
    assert r3["train_loss"] != r1["train_loss"]


def test_pretrained_encoder_is_used_unless_from_scratch(tiny_model):
    from bertfast.train.pretrained import load_pretrained

    pre = load_pretrained(tiny_model)
    task = load_task("builtin", builtin_train=4, builtin_validation=2)
    cfg = finetune.FinetuneConfig(model=tiny_model)
    m = finetune.build_model(cfg, pre, task)
    torch.testing.assert_close(m.word_embeddings.weight, pre.model.word_embeddings.weight, rtol=0, atol=0)
    torch.testing.assert_close(m.layers[1].ffn_out.weight, pre.model.layers[1].ffn_out.weight, rtol=0, atol=0)
    cfg.from_scratch = True
    s = finetune.build_model(cfg, pre, task)
    assert s.config == pre.config and not torch.equal(s.word_embeddings.weight, pre.model.word_embeddings.weight)


def test_finetune_glue_regression_and_export_hf(tiny_model, tmp_path):
    import transformers

    glue = _glue_dir(tmp_path / "glue", "stsb", n_train=40, n_val=12)
    out, hf_dir = tmp_path / "run", tmp_path / "hf"
    rc = finetune.main(["--model", tiny_model, "--task", "glue/stsb", "--glue-dir", str(glue), "--epochs", "2",
                        "--batch-size", "8", "--lr", "1e-3", "--output-dir", str(out), "--export-hf", str(hf_dir),
                        "--no-progress", "--device", "cpu", "--seed", "3"])
    assert rc == 0
    res = json.load(open(out / "results.json"))
    assert res["task"] == "glue/stsb" and res["regression"] and {"pearson", "spearman"} <= set(res)
    # the exported folder loads in transformers and gives our model's outputs
    hf = transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval()
    tok = transformers.BertTokenizerFast.from_pretrained(hf_dir)
    assert hf.config.num_labels == 1 and hf.config.problem_type == "regression"
    enc = tok(["the cat sat on the mat", "it is small"], ["a cat was on a mat", "it was huge"], padding=True,
              return_tensors="pt")
    from bertfast import BertForSequenceClassification

    ours = BertForSequenceClassification.from_hf(hf).eval()
    with torch.no_grad():
        want = hf(**enc).logits
        got = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_finetune_files_classification_with_label_names_exported(tiny_model, tmp_path):
    import transformers

    tr = _write(tmp_path / "train.tsv", _pairs(48, label=lambda i, y: "same" if y else "different"))
    va = _write(tmp_path / "val.tsv", _pairs(12, label=lambda i, y: "same" if y else "different"))
    res = finetune.run(_quick(tiny_model, tmp_path / "run", train=tr, validation=va, text_column="premise",
                              text_pair_column="hypothesis", export_hf=str(tmp_path / "hf")), log=lambda m: None)
    assert res["labels"] == ["different", "same"] and {"accuracy", "f1"} <= set(res)
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert hf.config.id2label == {0: "different", 1: "same"}


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        finetune.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert_one_line_error(err)
    return err


def test_cli_bad_input_exits_2_before_any_work(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--model", tiny_model, "--output-dir", str(out), "--no-progress", "--device", "cpu"]
    err = _cli_error(base + ["--task", "glue/squad"], capsys)
    assert "argument --task: unknown task 'glue/squad'" in err or "unknown GLUE task" in err
    err = _cli_error(base + ["--task", "nope"], capsys)
    assert "argument --task: unknown task 'nope'" in err
    good = _write(tmp_path / "t.csv", _pairs())
    cols = ["--text-column", "premise", "--text-pair-column", "hypothesis"]
    err = _cli_error(base + cols + ["--train", good, "--validation", str(tmp_path / "absent.csv")], capsys)
    assert "--validation" in err and "absent.csv: no such file" in err
    err = _cli_error(base + ["--train", good, "--validation", good, "--text-column", "body"], capsys)
    assert "--text-column 'body'" in err and "columns: premise, hypothesis, label" in err
    (tmp_path / "e.jsonl").write_text("")
    err = _cli_error(base + cols + ["--train", str(tmp_path / "e.jsonl"), "--validation", good], capsys)
    assert "e.jsonl: the file is empty" in err
    err = _cli_error(["--model", str(tmp_path / "no_model"), "--task", "builtin", "--output-dir", str(out)], capsys)
    assert "argument --model" in err and "no_model" in err
    err = _cli_error(base + ["--task", "builtin", "--lr", "-1"], capsys)
    assert "argument --lr: must be a positive learning rate" in err
    err = _cli_error(base + ["--task", "builtin", "--max-len", "4096"], capsys)
    assert "argument --max-len: 4096 is longer than the model's 64 position embeddings" in err
    assert not out.exists()  # nothing was written


def test_finetuning_learns_a_learnable_task(tmp_path):
    """The loop really trains: 'does the text hold the word dog' goes from chance to (nearly) always right."""
    import random

    import transformers

    rng = random.Random(0)
    words = "the a cat dog sat on mat ran to house big small red blue".split()
    texts = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)]
    rows = {"text": texts, "label": [int("dog" in t.split()) for t in texts]}
    tr = _write(tmp_path / "tr.csv", {k: v[:300] for k, v in rows.items()})
    va = _write(tmp_path / "va.csv", {k: v[300:] for k, v in rows.items()})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    model = tmp_path / "model"
    transformers.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt")).save_pretrained(model)
    torch.manual_seed(0)
    transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)).save_pretrained(model)
    res = finetune.run(finetune.FinetuneConfig(model=str(model), train=tr, validation=va, epochs=8, batch_size=16,
                                               lr=1e-3, output_dir=str(tmp_path / "out"), progress=False,
                                               device="cpu"), log=lambda m: None)
    first = json.loads(open(tmp_path / "out" / "metrics.jsonl").readline())
    assert first["accuracy"] < 0.8 and res["accuracy"] >= 0.95 and res["train_loss"] < 0.3
