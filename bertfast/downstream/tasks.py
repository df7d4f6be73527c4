"""Downstream tasks for `python -m bertfast.finetune`: GLUE, local files, the built-in acceptability task; metrics.

A task becomes a `TaskData`: train and validation `Examples` (first text, optional second text, label), the
kind (classification with `label_names`, or regression) and the metrics reported. Everything here reads or
generates data and scores predictions; the model and the training loop live in bertfast.downstream.finetune.

Metrics (`compute_metrics`) are the GLUE ones, computed with scikit-learn and scipy: accuracy; F1 of the positive
class and accuracy (MRPC, QQP); Matthews correlation (CoLA); Pearson and Spearman correlation (STS-B).
"""
from __future__ import annotations

import glob
import math
import os
import random
from dataclasses import dataclass, field

import numpy as np


class TaskError(ValueError):
    """Bad task input (unknown task, a missing file or column, labels of the wrong type, an empty file): the
    message names it and says what to do."""


@dataclass
class Examples:
    text: list[str]
    text_pair: list[str] | None
    labels: list  # class ids (int) or scores (float)

    def __len__(self) -> int:
        return len(self.text)


@dataclass
class TaskData:
    name: str  # "glue/mrpc", "builtin", or "files"
    train: Examples
    validation: Examples
    regression: bool
    label_names: list[str] = field(default_factory=list)  # class id -> name (classification)
    metrics: tuple[str, ...] = ("accuracy",)

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.label_names)


# ---------------------------------------------------------------------------------------------- metrics
METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman", "macro_f1", "mse")


def compute_metrics(names, predictions, labels) -> dict[str, float]:
    """{name: value} for predictions (class ids, or scores for pearson / spearman / mse) against labels.

    f1 is the binary F1 of class 1 (MRPC's "equivalent", QQP's "duplicate"); macro_f1 the unweighted mean F1 over
    classes; a correlation of constant predictions is 0 (scipy gives NaN: no linear relation can be measured)."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape:
        raise ValueError(f"{p.shape[0]} predictions for {y.shape[0]} labels")
    if len(y) == 0:
        raise ValueError("no examples to score")
    out = {}
    for name in names:
        if name == "accuracy":
            from sklearn.metrics import accuracy_score

            out[name] = float(accuracy_score(y, p))
        elif name == "f1":
            from sklearn.metrics import f1_score

            out[name] = float(f1_score(y, p, pos_label=1, average="binary", zero_division=0))
        elif name == "macro_f1":
            from sklearn.metrics import f1_score

            out[name] = float(f1_score(y, p, average="macro", zero_division=0))
        elif name == "matthews":
            from sklearn.metrics import matthews_corrcoef

            out[name] = float(matthews_corrcoef(y, p))
        elif name in ("pearson", "spearman"):
            from scipy import stats

            if np.ptp(p) == 0 or np.ptp(y) == 0:
                out[name] = 0.0
            else:
                r = (stats.pearsonr if name == "pearson" else stats.spearmanr)(p, y)[0]
                out[name] = float(r)
        elif name == "mse":
            out[name] = float(np.mean((p.astype(np.float64) - y.astype(np.float64)) ** 2))
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return out


# ---------------------------------------------------------------------------------------------- GLUE
@dataclass(frozen=True)
class GlueTask:
    columns: tuple[str, str | None]
    label_names: tuple[str, ...]  # empty: regression
    metrics: tuple[str, ...]
    validation: str = "validation"


GLUE_HUB = "nyu-mll/glue"
GLUE = {
    "cola": GlueTask(("sentence", None), ("unacceptable", "acceptable"), ("matthews",)),
    "sst2": GlueTask(("sentence", None), ("negative", "positive"), ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy")),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy")),
    "stsb": GlueTask(("sentence1", "sentence2"), (), ("pearson", "spearman")),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
                     validation="validation_matched"),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
}
TASKS = ["builtin"] + [f"glue/{k}" for k in GLUE]


def load_glue(name: str, *, glue_dir: str | None = None, cache_dir: str | None = None) -> TaskData:
    """GLUE task `name` from the hub (`datasets.load_dataset("nyu-mll/glue", name)`), or from `glue_dir`, a local
    copy of that repository's parquet files (``NAME/train-*.parquet``, ``NAME/validation-*.parquet``; MNLI's
    validation is ``validation_matched``), read through the same `datasets` code."""
    if name not in GLUE:
        raise TaskError(f"--task glue/{name}: unknown GLUE task; choose one of {', '.join(GLUE)}")
    t = GLUE[name]
    import datasets

    asked = f"--task glue/{name}"
    try:
        if glue_dir is not None:
            files = {}
            for split in ("train", t.validation):
                found = sorted(glob.glob(os.path.join(glue_dir, name, f"{split}-*.parquet")))
                if not found:
                    raise TaskError(f"{asked}: --glue-dir {glue_dir} has no {name}/{split}-*.parquet (the layout of "
                                    f"the hub's {GLUE_HUB} repository)")
                files[split] = found
            # one split at a time: datasets would refuse splits whose columns differ before we could name them
            ds = {split: datasets.load_dataset("parquet", data_files={split: f}, split=split, cache_dir=cache_dir)
                  for split, f in files.items()}
        else:
            ds = datasets.load_dataset(GLUE_HUB, name, cache_dir=cache_dir)
    except TaskError:
        raise
    except Exception as e:  # offline, hub errors, unreadable files
        raise TaskError(f"{asked}: the dataset could not be loaded from "
                        f"{glue_dir or GLUE_HUB} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                        "Without network, point --glue-dir at a local copy of its parquet files, or use --task "
                        "builtin or --train/--validation files") from None
    regression = not t.label_names
    splits = []
    for split in ("train", t.validation):
        if split not in ds:
            raise TaskError(f"{asked}: the dataset has no {split!r} split (splits: {', '.join(ds)})")
        d = ds[split]
        cols = [c for c in (*t.columns, "label") if c is not None]
        missing = [c for c in cols if c not in d.column_names]
        if missing:
            raise TaskError(f"{asked}: split {split!r} has no column {missing[0]!r} (columns: {d.column_names})")
        labels = list(d["label"])
        if regression:
            labels = [float(x) for x in labels]
        else:
            bad = [x for x in labels if not isinstance(x, (int, np.integer)) or not 0 <= x < len(t.label_names)]
            if bad:
                raise TaskError(f"{asked}: split {split!r} holds label {bad[0]!r}, expected class ids 0.."
                                f"{len(t.label_names) - 1} ({', '.join(t.label_names)})")
        a = _texts(list(d[t.columns[0]]), f"{asked} split {split!r} column {t.columns[0]!r}")
        b = _texts(list(d[t.columns[1]]), f"{asked} split {split!r} column {t.columns[1]!r}") if t.columns[1] else None
        if not a:
            raise TaskError(f"{asked}: split {split!r} is empty")
        splits.append(Examples(a, b, labels))
    return TaskData(f"glue/{name}", splits[0], splits[1], regression, list(t.label_names), t.metrics)


def _texts(values: list, where: str) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            what = "missing" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{type(v).__name__} {v!r}"
            raise TaskError(f"{where}: row {i} holds {what}, expected text")
    return values


# ---------------------------------------------------------------------------------------------- local files
FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def read_table(path: str, flag: str):
    """A pandas DataFrame from a .csv, .tsv, .jsonl or .parquet file; TaskError naming `flag` and the file."""
    import pandas as pd

    if not os.path.exists(path):
        raise TaskError(f"{flag} {path}: no such file")
    if os.path.isdir(path):
        raise TaskError(f"{flag} {path}: is a folder; give a .csv, .tsv, .jsonl or .parquet file")
    fmt = FILE_FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise TaskError(f"{flag} {path}: unsupported file type; use .csv, .tsv, .jsonl or .parquet")
    if os.path.getsize(path) == 0:
        raise TaskError(f"{flag} {path}: the file is empty")
    try:
        if fmt == "csv":
            df = pd.read_csv(path, keep_default_na=False, na_values=[""])
        elif fmt == "tsv":  # GLUE's .tsv files hold unbalanced quotes: no quoting
            df = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False, na_values=[""])
        elif fmt == "jsonl":
            df = pd.read_json(path, lines=True)
        else:
            df = pd.read_parquet(path)
    except Exception as e:
        raise TaskError(f"{flag} {path}: cannot be read as {fmt} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if len(df) == 0:
        raise TaskError(f"{flag} {path}: the file holds no rows")
    return df


def _column(df, name: str, flag: str, path: str):
    if name not in df.columns:
        raise TaskError(f"{flag} {name!r}: {path} has no such column (columns: {', '.join(map(str, df.columns))})")
    return df[name]


def load_files(train: str, validation: str, *, text_column: str, text_pair_column: str | None,
               label_column: str) -> TaskData:
    """Examples from local files. Labels: text, booleans or integers are classes (each distinct value of the
    training file a class, in sorted order); floats are regression targets (scores)."""
    parts = {}
    for flag, path in (("--train", train), ("--validation", validation)):
        df = read_table(path, flag)
        a = _texts(_column(df, text_column, "--text-column", path).tolist(), f"{path} column {text_column!r}")
        b = None
        if text_pair_column:
            b = _texts(_column(df, text_pair_column, "--text-pair-column", path).tolist(),
                       f"{path} column {text_pair_column!r}")
        y = _column(df, label_column, "--label-column", path)
        parts[flag] = (a, b, y, path)
    kind_train = _label_kind(parts["--train"][2], parts["--train"][3], label_column)
    kind_val = _label_kind(parts["--validation"][2], parts["--validation"][3], label_column)
    if kind_train != kind_val:
        raise TaskError(f"--label-column {label_column!r}: {train} holds {kind_train} labels but {validation} holds "
                        f"{kind_val} ones; both files need the same kind")
    regression = kind_train == "float"
    if regression:
        out = [Examples(a, b, [float(v) for v in y]) for a, b, y, _ in parts.values()]
        return TaskData("files", out[0], out[1], True, [], ("pearson", "spearman", "mse"))
    classes = sorted(set(parts["--train"][2].tolist()))
    if len(classes) < 2:
        raise TaskError(f"--label-column {label_column!r}: {train} holds one class only ({classes[0]!r}); a "
                        "classifier needs at least two (float labels are read as a regression target)")
    ids = {c: i for i, c in enumerate(classes)}
    out = []
    for a, b, y, path in parts.values():
        unknown = [v for v in y.tolist() if v not in ids]
        if unknown:
            raise TaskError(f"--label-column {label_column!r}: {path} holds label {unknown[0]!r}, which {train} "
                            f"does not have (classes: {', '.join(map(str, classes))})")
        out.append(Examples(a, b, [ids[v] for v in y.tolist()]))
    metrics = ("accuracy", "f1") if len(classes) == 2 else ("accuracy", "macro_f1")
    return TaskData("files", out[0], out[1], False, [str(c) for c in classes], metrics)


def _label_kind(y, path: str, name: str) -> str:
    """'class' (strings, booleans, integers) or 'float'; TaskError for missing values or mixed types."""
    import pandas as pd

    values = y.tolist()
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise TaskError(f"--label-column {name!r}: {path} row {i} has no label")
    if pd.api.types.is_bool_dtype(y) or pd.api.types.is_integer_dtype(y):
        return "class"
    if pd.api.types.is_float_dtype(y):
        return "float"
    kinds = {type(v).__name__ for v in values}
    if kinds <= {"str"}:
        return "class"
    if kinds <= {"int", "float"}:
        return "float"
    raise TaskError(f"--label-column {name!r}: {path} holds labels of type {', '.join(sorted(kinds))}; expected "
                    "class names (text), integers or booleans for classification, or floats for regression")


# ---------------------------------------------------------------------------------------------- built-in task
# "Is the sentence well formed?" (acceptability, like GLUE's CoLA), in words of the built-in pretraining corpus
# (bertfast.data.builtin_corpus: the things, areas and verbs of its twelve places). Label 1 "acceptable": a template
# filled with a verb where a verb belongs and nouns where nouns belong; label 0 "unacceptable": the same sentence with
# its verb and one of its nouns swapped:
#   "Nobody had polished the hammer like that in years."   -> acceptable
#   "Nobody had hammer the polished like that in years."   -> unacceptable
# Why it needs the sentence and not a word: the two versions hold the same words (a bag of words cannot tell them
# apart) and every template, name and word is drawn independently of the label; only which word stands in which
# place of the sentence decides. No article precedes a swapped word (a/an would give the first letter away) and
# nouns of two words (ice axe, x-ray) are left out (two tokens in a verb's place would give the swap away), as are
# nouns that are also past tenses (saw, shed).
# What it needs from pretraining: the validation split uses only nouns and verbs the training split never shows (the
# last two areas, things and verbs of each place). Fine-tuned from scratch, the model has random vectors for them and
# is at chance there; a pretrained model can do better only through what pretraining taught about these words, which
# the corpus uses as nouns and verbs in its stories. The templates, names and towns are not in the corpus.
# (Version 1 asked whether sentence B fits A's person, version 2 whether A and B are set at the same place: the default
# pretraining did not learn which words belong to which place, and both stayed at chance; see docs/finetune.md.)
BUILTIN_LABELS = ("unacceptable", "acceptable")
BUILTIN_VERSION = 3
_TASK_SYL = ["ra", "vik", "sel", "da", "mon", "ju", "pe", "ter", "qui", "no", "ha", "zel", "bri", "os", "cu", "wen"]
_TASK_TOWNS = ["Amberley", "Brackwater", "Coldharbour", "Dinsmore", "Elmstead", "Foxley", "Glenmoor", "Hartwell"]
_TASK_ADJ = ["shiny", "dusty", "wooden", "curious", "famous", "spare", "borrowed", "lovely"]
_TASK_CATEGORIES = ("area", "things", "verbs")  # of builtin_corpus.TOPICS (people: too few per place to split)
_TASK_NOT_NOUNS = {"saw", "shed"}  # also past tenses of verbs: in a verb's place they would read as verbs
_TASK_TEMPLATES = [  # one {verb} and one or two nouns ({thing}, {area}) each; none is a corpus sentence
    "{Name} {verb} the {thing} twice before lunch.",
    "Nobody had {verb} the {thing} like that in years.",
    "Yesterday the {adj} {thing} was {verb} by {Name}.",
    "Everything in the {area} had been {verb} by noon.",
    "{Name} {verb} what was left in the {area} for a friend from {town}.",
    "Someone from {town} asked who {verb} the {thing} near the {area}.",
    "The {thing} by the {area} was {verb} before dawn.",
    "After the storm {Name} quietly {verb} the {adj} {thing}.",
]


def _task_world():
    """Per place: {category: (training words, validation words)}: the validation split takes the last two words of
    each category, the training split the others, leaving out words of which a part is used by two places (rope;
    chart of the hospital and star chart of the observatory)."""
    from collections import Counter

    from bertfast.data.builtin_corpus import TOPICS

    uses = Counter(p for t in TOPICS.values() for p in {p for k in _TASK_CATEGORIES for w in t[k] for p in w.split()})
    world = {}
    for name in sorted(TOPICS):
        world[name] = {}
        for k in _TASK_CATEGORIES:
            usable = [w for w in TOPICS[name][k] if all(uses[p] == 1 for p in w.split())]
            world[name][k] = (usable[:-2], usable[-2:])
            assert len(usable) >= 4, (name, k)  # builtin_corpus.TOPICS changed: pick other categories
    return world


def _task_words(part: int) -> dict[str, list[str]]:
    """{"thing", "area", "verb": words} of split `part` (0 training, 1 validation): nouns and verbs of one word of
    letters only (x-ray is three tokens)."""
    world = _task_world()
    out = {}
    for slot, k in (("thing", "things"), ("area", "area"), ("verb", "verbs")):
        out[slot] = sorted({w for p in world.values() for w in p[k][part]
                            if w.isalpha() and (slot == "verb" or w not in _TASK_NOT_NOUNS)})
    return out


def builtin_task(n_train: int = 2000, n_validation: int = 1000, seed: int = 0) -> tuple[Examples, Examples]:
    """The built-in task's (train, validation) examples; the same for the same arguments on every machine."""
    rng = random.Random(f"bertfast-builtin-task-v{BUILTIN_VERSION}-{seed}")
    names = set()
    while len(names) < 300:
        names.add("".join(rng.choice(_TASK_SYL) for _ in range(rng.randint(2, 3))).capitalize())
    names = sorted(names)
    out = []
    for part, n in ((0, n_train), (1, n_validation)):
        words = _task_words(part)
        texts, labels = [], []
        for _ in range(n):
            template, label = rng.choice(_TASK_TEMPLATES), rng.randrange(2)
            fill = {slot: rng.choice(pool) for slot, pool in words.items()}
            if not label:  # swap the verb with one of the template's nouns
                noun = rng.choice([s for s in ("thing", "area") if "{" + s + "}" in template])
                fill[noun], fill["verb"] = fill["verb"], fill[noun]
            texts.append(template.format(Name=rng.choice(names), town=rng.choice(_TASK_TOWNS),
                                         adj=rng.choice(_TASK_ADJ), **fill))
            labels.append(label)
        out.append(Examples(texts, None, labels))
    return out[0], out[1]


def load_task(task: str | None, *, train: str | None = None, validation: str | None = None,
              text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
              glue_dir: str | None = None, cache_dir: str | None = None, builtin_train: int = 2000,
              builtin_validation: int = 1000) -> TaskData:
    """The task the finetune flags name: `--task builtin`, `--task glue/NAME`, or `--train F --validation F`."""
    if task is not None and (train or validation):
        raise TaskError("--task and --train/--validation: give one of them, not both")
    if task is None:
        if not train or not validation:
            raise TaskError(f"{'--validation' if train else '--train'}: give both --train FILE and --validation "
                            "FILE, or a --task (" + ", ".join(TASKS) + ")")
        return load_files(train, validation, text_column=text_column, text_pair_column=text_pair_column,
                          label_column=label_column)
    if task == "builtin":
        tr, va = builtin_task(builtin_train, builtin_validation)
        return TaskData("builtin", tr, va, False, list(BUILTIN_LABELS), ("accuracy",))
    if task.startswith("glue/"):
        return load_glue(task[len("glue/"):], glue_dir=glue_dir, cache_dir=cache_dir)
    if task in GLUE:
        raise TaskError(f"--task {task}: write glue/{task}")
    raise TaskError(f"--task {task}: unknown task; choose one of {', '.join(TASKS)}, or give --train/--validation "
                    "files")


__all__ = ["Examples", "TaskData", "TaskError", "GLUE", "TASKS", "builtin_task", "compute_metrics", "load_glue",
           "load_files", "load_task", "read_table"]
