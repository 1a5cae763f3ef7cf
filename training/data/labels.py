"""Finding names: the class lists (NIH, phantom) and the canonical spelling of a source's label.

:data:`NIH_CLASSES` and :data:`PHANTOM_CLASSES` are the class orders models and reports use;
:func:`canonical_label` maps every source's spelling (``Infiltrate``, ``Pleural effusion``, ``No findings``)
to the one manifests store. Pure Python: no pandas, no pyarrow.
"""
from __future__ import annotations

import functools
import re

__all__ = ["NIH_CLASSES", "PHANTOM_CLASSES", "NO_FINDING", "canonical_label"]

#: The 14 findings of NIH ChestX-ray14 in their canonical spelling and the usual order.
NIH_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)

#: The findings the phantom draws (a subset of :data:`NIH_CLASSES`, same order as there).
PHANTOM_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax",
    "Consolidation", "Hernia",
)

#: The "nothing found" pseudo-label of the sources; never stored in ``labels`` (empty list instead).
NO_FINDING = "No Finding"


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_ALIASES: dict[str, str] = {_key(c): c for c in NIH_CLASSES}
_ALIASES.update({
    # NIH bounding-box list and general synonyms
    "infiltrate": "Infiltration", "infiltrates": "Infiltration",
    "pleural effusion": "Effusion", "effusions": "Effusion",
    "pleural thickening": "Pleural_Thickening",
    "pulmonary fibrosis": "Fibrosis",
    "oedema": "Edema", "pulmonary edema": "Edema", "pulmonary oedema": "Edema",
    "atelectases": "Atelectasis", "nodules": "Nodule", "masses": "Mass",
    "pneumothoraces": "Pneumothorax", "enlarged heart": "Cardiomegaly",
    # "nothing found" in its many spellings
    "no finding": NO_FINDING, "no findings": NO_FINDING, "normal": NO_FINDING,
})


def canonical_label(name: str, *, strict: bool = False) -> str:
    """Map a source's finding name to the canonical spelling used in manifests.

    NIH names and their aliases become the NIH spelling (``Infiltrate`` -> ``Infiltration``,
    ``Pleural effusion`` -> ``Effusion``, ``Pleural thickening`` -> ``Pleural_Thickening``,
    ``Pulmonary fibrosis`` -> ``Fibrosis``; case, spaces, hyphens and underscores do not matter).
    "No finding" in any spelling becomes :data:`NO_FINDING`. A name without an NIH equivalent keeps
    its words, capitalised and joined by ``_`` like ``Pleural_Thickening``
    (``Aortic enlargement`` -> ``Aortic_Enlargement``, ``Nodule/Mass`` -> ``Nodule_Mass``,
    ``ILD`` -> ``ILD``), so the same finding from two sources gets one name.

    Args:
        name: the source's label.
        strict: raise for names that are neither NIH classes nor "no finding".

    Returns:
        The canonical label.

    Raises:
        ValueError: ``name`` is empty or not a string, or (``strict``) has no NIH equivalent.

    Example:
        >>> canonical_label("Infiltrate"), canonical_label("Pleural effusion")
        ('Infiltration', 'Effusion')
        >>> canonical_label("Aortic enlargement")
        'Aortic_Enlargement'
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a finding label must be a non-empty string, got {name!r}")
    return _canonical(name, bool(strict))


@functools.lru_cache(maxsize=4096)
def _canonical(name: str, strict: bool) -> str:
    hit = _ALIASES.get(_key(name))
    if hit is not None:
        return hit
    if strict:
        raise ValueError(f"unknown finding {name!r}; valid: {list(NIH_CLASSES)} (or '{NO_FINDING}')")
    words = [w for w in re.split(r"[\s_/\-]+", name.strip()) if w]
    return "_".join(w if w.isupper() else w[:1].upper() + w[1:].lower() for w in words)
