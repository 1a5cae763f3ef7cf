"""Radiology reports -> one report a line (the text corpus of CLIP training and concept mining).

Sources:

* IU / OpenI XML (``<AbstractText Label="FINDINGS">`` and ``Label="IMPRESSION"``), from a folder
  (searched recursively) or the ``.tgz`` / ``.tar.gz`` archive as downloaded. A report is its
  FINDINGS followed by its IMPRESSION; a file with neither is skipped (and counted in the log).
* MIMIC-CXR style: a folder of ``.txt`` files, one report each; the FINDINGS and IMPRESSION
  sections are kept when the report has them (``FINDINGS:`` headings), else the whole text.
* A text file with one report a line (blank lines skipped).

Whitespace (including new lines) inside a report is collapsed to single spaces, so
:func:`write_reports` writes exactly one report a line.

Example:
    >>> reports = read_iu_xml("NLMCXR_reports.tgz")  # doctest: +SKIP
    >>> write_reports(reports, "reports.txt")        # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from training.data.readers._common import open_text

logger = logging.getLogger(__name__)

__all__ = ["Report", "read_iu_xml", "parse_iu_xml", "read_text_reports", "parse_sections",
           "write_reports"]

_MAX_XML_BYTES = 10_000_000   # a report file is a few kB; refuse anything absurd inside an archive


def _clean(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


@dataclass
class Report:
    """One report.

    Attributes:
        report_id: the source's id (IU ``uId``, the file stem, or ``line-N``).
        findings: the FINDINGS section ("" when absent).
        impression: the IMPRESSION section ("" when absent).
        image_ids: images the report belongs to (IU ``parentImage`` ids), may be empty.
        body: the whole text when the source has no sections.
    """

    report_id: str
    findings: str = ""
    impression: str = ""
    image_ids: list[str] = field(default_factory=list)
    body: str = ""

    @property
    def text(self) -> str:
        """The report on one line: findings then impression, or the body."""
        parts = [p for p in (self.findings, self.impression) if p]
        return _clean(" ".join(parts) if parts else self.body)


def parse_iu_xml(data: bytes | str, name: str = "<xml>") -> Report | None:
    """One IU/OpenI XML document -> :class:`Report` (``None`` when it has no findings or impression).

    Raises:
        ValueError: not well-formed XML (names ``name``).
    """
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ValueError(f"{name}: not well-formed XML ({e})") from None
    sections = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").strip().upper()
        sections[label] = _clean("".join(el.itertext()))
    uid = root.find("uId")
    rid = uid.get("id") if uid is not None and uid.get("id") else Path(name).stem
    images = [el.get("id") for el in root.iter("parentImage") if el.get("id")]
    rep = Report(rid, sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""), images)
    return rep if rep.text else None


def _iu_documents(src: Path) -> Iterator[tuple[str, bytes]]:
    if src.is_dir():
        for p in sorted(src.rglob("*.xml"), key=lambda q: (len(q.stem), q.as_posix())):
            yield str(p), p.read_bytes()
        return
    if not src.is_file():
        raise FileNotFoundError(f"IU reports not found: {src}")
    try:
        tf = tarfile.open(src, "r:*")
    except tarfile.TarError as e:
        raise ValueError(f"{src}: neither a folder nor a readable tar archive ({e})") from None
    with tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith(".xml")]
        members.sort(key=lambda m: (len(Path(m.name).stem), m.name))
        for m in members:
            if m.size > _MAX_XML_BYTES:
                raise ValueError(f"{src}: member {m.name} is {m.size} bytes, too large for a report")
            f = tf.extractfile(m)
            if f is not None:
                yield f"{src}:{m.name}", f.read()


def read_iu_xml(src: str | os.PathLike) -> list[Report]:
    """Read IU/OpenI reports from a folder of XML files or the ``.tgz`` archive.

    Files are read in natural order of their names (``2.xml`` before ``10.xml``); archives are read
    without extracting anything to disk.

    Args:
        src: folder or ``.tgz`` / ``.tar.gz`` / ``.tar``.

    Returns:
        Reports with findings and/or impression (files with neither are skipped).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: not an archive, a malformed XML file, or no XML files at all.
    """
    src = Path(src)
    out, n, empty = [], 0, 0
    for name, data in _iu_documents(src):
        n += 1
        rep = parse_iu_xml(data, name)
        if rep is None:
            empty += 1
        else:
            out.append(rep)
    if n == 0:
        raise ValueError(f"no .xml reports found in {src}")
    if empty:
        logger.info("%s: %d of %d reports have neither FINDINGS nor IMPRESSION; skipped", src, empty, n)
    return out


_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z /&\-]{2,40}):", re.MULTILINE)


def parse_sections(text: str) -> dict[str, str]:
    """Split a free-text report into its ``HEADING:`` sections (MIMIC-CXR style).

    Returns:
        ``{heading: text}`` with upper-case headings; text before the first heading is under ``""``.

    Example:
        >>> parse_sections("FINAL REPORT\\nFINDINGS: Clear lungs.\\nIMPRESSION: Normal.")["IMPRESSION"]
        'Normal.'
    """
    out: dict[str, str] = {}
    marks = list(_HEADING.finditer(text))
    out[""] = _clean(text[: marks[0].start()] if marks else text)
    for m, nxt in zip(marks, marks[1:] + [None]):
        body = text[m.end(): nxt.start() if nxt is not None else len(text)]
        out[m.group(1).strip().upper()] = _clean(body)
    return out


def read_text_reports(src: str | os.PathLike) -> list[Report]:
    """Read plain-text reports: a folder of ``.txt`` files (one report each) or a file (one a line).

    Args:
        src: a folder (searched recursively, MIMIC-CXR ``files/p10/p10000032/s50414267.txt`` style)
            or a text file (plain or gzipped) with one report a line.

    Returns:
        The non-empty reports; for MIMIC-style files FINDINGS/IMPRESSION are split out when present.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: a folder without ``.txt`` files.
    """
    src = Path(src)
    out: list[Report] = []
    if src.is_dir():
        files = sorted(src.rglob("*.txt"))
        if not files:
            raise ValueError(f"no .txt reports found in {src}")
        for p in files:
            text = p.read_text(encoding="utf-8", errors="replace")
            sec = parse_sections(text)
            rep = Report(p.stem, sec.get("FINDINGS", ""), sec.get("IMPRESSION", ""), body=_clean(text))
            if rep.text:
                out.append(rep)
        return out
    with open_text(src) as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                out.append(Report(f"line-{i}", body=_clean(line)))
    return out


def write_reports(reports: Iterable[Report | str], out: str | os.PathLike) -> Path:
    """Write reports one a line (UTF-8), whitespace inside each collapsed.

    Args:
        reports: :class:`Report` objects or strings; empty ones are skipped.
        out: output text file (parent folders created).

    Returns:
        The written path.
    """
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in reports:
            t = r.text if isinstance(r, Report) else _clean(r)
            if t:
                f.write(t + "\n")
    return p
