"""Free-text radiology reports for phantom cases.

A report is written from the structured description of what the phantom drew (:class:`Finding`,
devices, view), so every side, zone and size in the text matches the picture. Wording, sentence
order, the use of a FINDINGS/IMPRESSION layout, which absent findings are negated and which normal or
incidental sentences appear all vary with the random generator, so a reader cannot find the labels by
fixed string position and keyword presence alone is fooled by negations ("No pneumothorax.").

Example:
    >>> import numpy as np
    >>> f = Finding("Nodule", side="right", zone="upper", size_mm=8.0)
    >>> text = write_report([f], devices=[], view="PA", rng=np.random.default_rng(0))
    >>> "nodul" in text.lower() and "right" in text.lower()
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Finding", "write_report", "LABEL_TERMS", "NEGATIONS", "location_phrase"]


@dataclass
class Finding:
    """One drawn finding instance, as the report writer needs it.

    Attributes:
        label: canonical class name (e.g. ``"Effusion"``).
        side: ``"right"`` / ``"left"`` (patient side; right is on the image left) or ``"midline"``.
        zone: ``"upper"``, ``"mid"``, ``"lower"`` or ``"central"``.
        size_mm: largest diameter in millimetres where meaningful (nodule, mass), else 0.
        severity: ``"small"``, ``"moderate"`` or ``"large"`` (effusion, pneumothorax, cardiomegaly ...).
        extra: finding-specific details, e.g. ``{"air_bronchograms": True}``, ``{"ctr": 0.58}``,
            ``{"medial": True}``.
    """

    label: str
    side: str = "midline"
    zone: str = "central"
    size_mm: float = 0.0
    severity: str = "moderate"
    extra: dict = field(default_factory=dict)


# Synonyms that name each class; a test checks that every positive label is mentioned by one.
LABEL_TERMS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelecta", "volume loss", "collapse"),
    "Cardiomegaly": ("cardiomegaly", "enlarged cardiac silhouette", "heart is enlarged",
                     "cardiac silhouette is enlarged",
                     "cardiac enlargement", "enlargement of the cardiac silhouette"),
    "Effusion": ("effusion", "costophrenic angle", "pleural fluid"),
    "Infiltration": ("infiltrat", "hazy opacit", "interstitial opacit", "ground-glass"),
    "Mass": ("mass",),
    "Nodule": ("nodul",),
    "Pneumothorax": ("pneumothorax", "pleural line"),
    "Consolidation": ("consolidat", "airspace opacit", "airspace disease"),
    "Hernia": ("hernia",),
}

# Sentences that state a class is absent (only used for absent classes).
NEGATIONS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("No atelectasis.", "No evidence of collapse or volume loss."),
    "Cardiomegaly": ("Heart size is normal.", "The cardiac silhouette is not enlarged.",
                     "Normal cardiomediastinal silhouette.", "No cardiomegaly."),
    "Effusion": ("No pleural effusion.", "No pleural effusions.",
                 "The costophrenic angles are sharp.", "No effusion is seen."),
    "Infiltration": ("No infiltrate.", "No interstitial opacities."),
    "Mass": ("No mass is seen.", "No pulmonary mass."),
    "Nodule": ("No suspicious pulmonary nodules.", "No nodule is identified."),
    "Pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."),
    "Consolidation": ("No focal consolidation.", "No consolidation.",
                      "No focal airspace consolidation is seen."),
    "Hernia": ("No hiatal hernia.",),
}

_LOBES = {
    ("right", "upper"): ("right upper lobe", "right upper zone"),
    ("right", "mid"): ("right middle lobe", "right mid zone"),
    ("right", "lower"): ("right lower lobe", "right lung base"),
    ("left", "upper"): ("left upper lobe", "left upper zone"),
    ("left", "mid"): ("lingula", "left mid zone"),
    ("left", "lower"): ("left lower lobe", "left lung base"),
}

_NORMAL = (
    "Osseous structures are intact.",
    "No acute osseous abnormality.",
    "The visualized osseous structures are unremarkable.",
    "Mediastinal contours are within normal limits.",
    "The trachea is midline.",
    "Soft tissues are unremarkable.",
    "Degenerative changes of the thoracic spine.",
    "Upper abdomen is unremarkable.",
)
_CLEAR = ("The lungs are clear.", "Lungs are clear bilaterally.", "No acute cardiopulmonary process.",
          "The lungs are well expanded and clear.")
_COMPARISON = ("Comparison: none.", "No prior studies for comparison.", "Compared with prior study.",
               "")
_DEVICE_TEXT = {
    "cvc": ("Right internal jugular central venous catheter with tip in the SVC.",
            "Right IJ line tip in the SVC.", "A right IJ catheter terminates in the superior vena cava."),
    "ett": ("Endotracheal tube in place, tip {cm} cm above the carina.",
            "ET tube terminates {cm} cm above the carina."),
    "ecg": ("ECG leads overlie the chest.", "Monitoring leads project over the chest.",
            "External cardiac monitoring wires."),
}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def location_phrase(f: Finding, rng: np.random.Generator) -> str:
    """A location phrase for a lung finding that matches its side and zone (e.g. "right upper lobe")."""
    if (f.side, f.zone) in _LOBES:
        return _pick(rng, _LOBES[(f.side, f.zone)])
    if f.side in ("right", "left"):
        return f"{f.side} lung"
    return "both lungs"


def _size_text(mm: float, rng: np.random.Generator) -> str:
    if mm >= 30 and rng.random() < 0.7:
        return f"{mm / 10:.1f} cm"
    return f"{int(round(mm))} mm"


def _finding_sentence(f: Finding, rng: np.random.Generator) -> str:
    """One sentence describing one finding instance."""
    loc = location_phrase(f, rng)
    lab = f.label
    if lab == "Nodule":
        size = _size_text(f.size_mm, rng)
        return _pick(rng, (
            f"A {size} nodule in the {loc}.",
            f"{'Small' if f.size_mm < 10 else 'Solitary'} {loc} nodule measuring {size}.",
            f"There is a {size} nodular opacity in the {loc}.",
            f"{size.capitalize() if size[0].isalpha() else size} pulmonary nodule projects over the {loc}.",
        ))
    if lab == "Mass":
        size = _size_text(f.size_mm, rng)
        return _pick(rng, (
            f"A {size} mass in the {loc}.",
            f"There is a lobulated {loc} mass measuring {size}.",
            f"Large rounded opacity in the {loc} measuring {size}, concerning for a mass.",
        ))
    if lab == "Effusion":
        side = f.side
        return _pick(rng, (
            f"{f.severity.capitalize()} {side} pleural effusion.",
            f"Blunting of the {side} costophrenic angle, compatible with a {f.severity} effusion.",
            f"There is a {f.severity} {side} pleural effusion with a meniscus.",
            f"{side.capitalize()} basal opacity with meniscus, consistent with pleural fluid.",
        ))
    if lab == "Pneumothorax":
        side = f.side
        return _pick(rng, (
            f"{f.severity.capitalize()} {side} apical pneumothorax.",
            f"There is a {f.severity} {side} pneumothorax.",
            f"A visible pleural line at the {side} apex with absent lung markings beyond it, "
            f"consistent with pneumothorax.",
        ))
    if lab == "Atelectasis":
        plain = (f"Plate-like atelectasis in the {loc}.", f"Subsegmental atelectasis at the {loc}.",
                 f"Linear opacity in the {loc}, likely atelectasis.")
        if f.extra.get("dome_lift", 0) > 0:
            plain += (f"Linear opacity in the {loc} with volume loss, likely atelectasis.",
                      f"{loc.capitalize()} atelectasis with mild elevation of the {f.side} "
                      f"hemidiaphragm.")
        return _pick(rng, plain)
    if lab == "Consolidation":
        air = f.extra.get("air_bronchograms", False)
        tail = " with air bronchograms" if air else ""
        return _pick(rng, (
            f"Dense consolidation in the {loc}{tail}.",
            f"Focal airspace consolidation in the {loc}{tail}.",
            f"Patchy airspace opacity in the {loc}{tail}, consistent with consolidation.",
        ))
    if lab == "Infiltration":
        return _pick(rng, (
            f"Hazy opacities in the {loc}, which may represent infiltrate.",
            f"Diffuse interstitial opacities in the {f.side} lung.",
            f"Ill-defined infiltrate in the {loc}.",
            f"Ground-glass infiltration in the {f.side} mid and lower zones.",
        ))
    if lab == "Cardiomegaly":
        return _pick(rng, (
            "The cardiac silhouette is enlarged.",
            "Enlarged cardiac silhouette.",
            "Cardiomegaly.",
            f"The heart is enlarged (cardiothoracic ratio {f.extra.get('ctr', 0.6):.2f}).",
            f"{f.severity.capitalize()} cardiomegaly.",
        ))
    if lab == "Hernia":
        return _pick(rng, (
            "Retrocardiac air-fluid level consistent with a hiatal hernia.",
            "Moderate hiatal hernia.",
            "Rounded retrocardiac opacity with an air bubble, compatible with hiatus hernia.",
        ))
    raise ValueError(f"no report template for label {lab!r}; valid: {sorted(LABEL_TERMS)}")


def _bilateral_sentence(label: str, group: list[Finding], rng: np.random.Generator) -> str | None:
    """A single sentence for a finding drawn on both sides, or None to describe each side."""
    if label == "Effusion":
        sev = group[0].severity
        return _pick(rng, ("Bilateral pleural effusions.",
                           f"{sev.capitalize()} bilateral pleural effusions.",
                           "Blunting of both costophrenic angles, compatible with bilateral effusions."))
    if label == "Infiltration":
        return _pick(rng, ("Bilateral hazy infiltrates.", "Diffuse bilateral interstitial opacities.",
                           "Bilateral patchy infiltration in the mid and lower zones."))
    return None


def write_report(findings: list[Finding], devices: list[dict], view: str,
                 rng: np.random.Generator) -> str:
    """Write a radiology report for one phantom case.

    Args:
        findings: drawn finding instances (several per class possible, e.g. two nodules or a
            bilateral effusion).
        devices: drawn support devices, dicts with ``kind`` in ``{"cvc", "ett", "ecg"}`` (``ett`` may
            carry ``cm``, the tip-to-carina distance).
        view: ``"PA"`` or ``"AP"``.
        rng: random generator that picks wording, order and which absent findings to negate.

    Returns:
        The report text. Positive findings are described with a synonym and a location that matches
        the drawn side/zone; some absent findings are negated; normal and device sentences are mixed in.

    Raises:
        ValueError: a finding label without templates.
    """
    present = {f.label for f in findings}
    positive: list[str] = []
    by_label: dict[str, list[Finding]] = {}
    for f in findings:
        by_label.setdefault(f.label, []).append(f)
    for label, group in by_label.items():
        sides = {f.side for f in group}
        joined = _bilateral_sentence(label, group, rng) if sides >= {"left", "right"} else None
        if joined is not None and rng.random() < 0.7:
            positive.append(joined)
        else:
            positive.extend(_finding_sentence(f, rng) for f in group)
    order = rng.permutation(len(positive))
    positive = [positive[i] for i in order]

    absent = [lab for lab in NEGATIONS if lab not in present]
    n_neg = int(rng.integers(0, min(len(absent), 4) + 1)) if absent else 0
    negs = [_pick(rng, NEGATIONS[absent[i]]) for i in rng.permutation(len(absent))[:n_neg]]
    lung_findings = present - {"Cardiomegaly", "Hernia"}
    normal = [_pick(rng, _NORMAL) for _ in range(int(rng.integers(0, 3)))]
    if not lung_findings and rng.random() < 0.8:
        normal.insert(0, _pick(rng, _CLEAR))
    normal = list(dict.fromkeys(normal))
    dev = []
    for d in devices:
        text = _pick(rng, _DEVICE_TEXT[d["kind"]])
        dev.append(text.format(cm=d.get("cm", 4)))

    body = positive + negs
    body = [body[i] for i in rng.permutation(len(body))]
    # devices usually first, normal sentences usually last, but not always
    if rng.random() < 0.7:
        body = dev + body
    else:
        body = body + dev
    insert_at = int(rng.integers(0, len(body) + 1)) if rng.random() < 0.3 else len(body)
    body = body[:insert_at] + normal + body[insert_at:]

    style = int(rng.integers(3))
    comparison = _pick(rng, _COMPARISON)
    technique = f"{'PA and lateral' if view == 'PA' and rng.random() < 0.5 else view} view of the chest."
    if style == 0:
        impression = " ".join(positive[:2]) if positive else _pick(rng, _CLEAR)
        parts = [f"EXAMINATION: {technique}", comparison, "FINDINGS: " + " ".join(body),
                 "IMPRESSION: " + impression]
    elif style == 1:
        parts = ["FINDINGS: " + " ".join(body)]
    else:
        parts = [technique, comparison, " ".join(body)]
    return "\n".join(p for p in parts if p).strip()
