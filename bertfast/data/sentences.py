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


def _is_boundary(text: str, m: re.Match, cased: bool) -> bool:
    punct = m.group("punct")
    nxt = text[m.end() : m.end() + 1]
    nxt_word = text[m.end() :].lstrip(_OPENERS)[:1]
    if not nxt:
        return True
    if cased and nxt_word.islower():
        return False
    if punct == ".":
        w = _LAST_WORD.search(text, 0, m.start())
        word = w.group(1).lstrip(_OPENERS).lower() if w else ""
        if word in NEVER_END:
            return False
        if len(word) == 1 and word.isalpha() and w.group(1)[-1].isupper():
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
