"""A regex sentence splitter: good enough for BERT's sentence-pair construction, with no model and no download.

Rules, in order (the usual Punkt-style heuristics written out by hand):
  * a line break always ends a sentence (the original BERT input format is one sentence per line);
  * a candidate boundary is a run of ``.``, ``!``, ``?`` or an ellipsis, optional closing quotes/brackets, then
    whitespace (so decimals ``3.14`` and inner dots of ``e.g.`` / ``U.S.`` are never candidates);
  * no boundary after a title or a Latin abbreviation that never ends a sentence (``Mr.``, ``Dr.``, ``e.g.``,
    ``i.e.``, ``vs.``, ...) or after a single capital initial (``J. K. Rowling``);
  * after abbreviations that may end a sentence (``etc.``, ``Inc.``, ``U.S.``) and after ``...``, a boundary only
    when the next word starts with a capital letter or a digit;
  * in cased text, no boundary when the next word starts with a lower-case letter (``"Stop!" said Ann.``).
    All-lower-case text (bookcorpus style) skips this rule, since there every word is lower case.
"""

from __future__ import annotations

import re

# Abbreviations after which a period never ends a sentence (lower case, without the final period).
NEVER_END = frozenset(
    "mr mrs ms mx dr prof sr jr st mt ft rev hon gen col lt sgt capt cmdr adm gov pres sen rep fr "
    "e.g i.e cf vs viz approx ca fig figs eq eqs no nos vol vols pp ch sec art dept est al".split()
)
# Abbreviations that end a sentence when a capitalised word follows.
MAY_END = frozenset(
    "etc inc ltd co corp bros jan feb mar apr jun jul aug sep sept oct nov dec a.m p.m u.s u.k u.n ph.d "
    "b.a m.a b.sc m.sc".split()
)

_CANDIDATE = re.compile(r"(?P<punct>\.\.\.|…|[.!?]+)(?P<close>[\"'”’)\]]*)(?P<space>\s+)")
_LAST_WORD = re.compile(r"(\S+)$")
_OPENERS = "\"'“‘([`"


def _next_char(text: str, i: int) -> str:
    """The first character from ``i`` on that is not an opening quote or bracket ("" at the end): the same as
    ``text[i:].lstrip(_OPENERS)[:1]`` without copying the rest of the line (quadratic on long paragraphs)."""
    n = len(text)
    while i < n and text[i] in _OPENERS:
        i += 1
    return text[i : i + 1]


def _word_before(text: str, end: int) -> str:
    """The run of non-space characters ending at ``end`` (what ``_LAST_WORD.search(text, 0, end)`` finds, without
    scanning the line from its start at every candidate)."""
    start = end
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:end]


def _is_boundary(text: str, m: re.Match, cased: bool) -> bool:
    punct = m.group("punct")
    nxt = text[m.end() : m.end() + 1]
    if not nxt:
        return True
    nxt_word = _next_char(text, m.end())
    if cased and nxt_word.islower():
        return False
    if punct == ".":
        raw = _word_before(text, m.start())
        word = raw.lstrip(_OPENERS).lower()
        if word in NEVER_END:
            return False
        if len(word) == 1 and word.isalpha() and raw[-1].isupper():
            return False  # an initial ("J.") never ends a sentence
        if word in MAY_END or re.fullmatch(r"(?:[a-z]\.)+[a-z]", word):
            return nxt_word.isupper() or nxt_word.isdigit()
    elif punct in ("...", "…"):
        return nxt_word.isupper() or nxt_word.isdigit()
    return True


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences (stripped, non-empty), see the module docstring for the rules."""
    out: list[str] = []
    cased = any(c.isupper() for c in text)
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        start = 0
        for m in _CANDIDATE.finditer(line):
            if _is_boundary(line, m, cased):
                out.append(line[start : m.end("close")].strip())
                start = m.end()
        tail = line[start:].strip()
        if tail:
            out.append(tail)
    return [s for s in out if s]
