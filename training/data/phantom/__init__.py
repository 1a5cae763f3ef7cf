"""The phantom: a deterministic generator of synthetic chest radiographs with known ground truth.

Every image is rendered from a small anatomical model evaluated on the pixel grid with vectorised
numpy: body outline and soft tissue, two lungs (dark) with vessel markings radiating from the hila,
heart (on the image right: radiological convention, patient's left on the image right), mediastinum
with trachea and spine, curved posterior ribs, clavicles, diaphragm domes (the right one higher) and
an optional gastric bubble. Variation that is *not* a finding (patient size, small rotation and
shift, exposure/contrast/gamma, noise, support devices and an "L"/"R" text marker) is drawn
independently of the findings, so a model can learn shortcuts if nothing stops it; ``meta`` records
all of it for shortcut audits.

Findings have distinct signatures and places: Cardiomegaly (heart shadow with cardiothoracic ratio
> 0.5), Effusion (basal opacity with a meniscus blunting the costophrenic angle), Pneumothorax
(apical lucency without lung markings and a visible pleural line), Nodule (small round opacity), Mass
(larger lobulated opacity), Atelectasis (plate-like band with elevation of the hemidiaphragm: volume
loss), Consolidation (dense patchy opacity, optional air bronchograms), Infiltration (diffuse hazy
reticular opacity) and Hernia (rare retrocardiac opacity with an air bubble above the diaphragm).
Each finding is an additive density layer with compact support; its box is the bounding box of the
pixels it changed (by at least half an 8-bit grey level), so boxes are tight by construction.

Image ``i`` depends only on ``(seed, i)`` (``numpy.random.SeedSequence([seed, i, stream])``), so
generation can run in parallel and any subset can be re-rendered. Images ``2g`` and ``2g + 1`` share a
patient (same anatomy, different findings and exposure) for 20 % of groups ``g``; the split is
patient-wise, 14/3/3 out of every 20 groups (70/15/15).

Example:
    >>> case = render_case(seed=0, index=3, size=128)
    >>> case.image.shape, case.image.dtype
    ((128, 128), dtype('float32'))
    >>> all(b["label"] in case.labels for b in case.boxes)
    True

The package: :mod:`~training.data.phantom.canvas` (pixel grid, shape helpers),
:mod:`~training.data.phantom.anatomy` (patient, lungs, heart, base image),
:mod:`~training.data.phantom.findings` (one registered drawer per class, :func:`list_findings`),
:mod:`~training.data.phantom.artefacts` (devices, side marker, shortcut tag) and
:mod:`~training.data.phantom.generator` (case sampling, rendering, writing a data set).
"""
from __future__ import annotations

from training.data.phantom.findings import list_findings, register_finding
from training.data.phantom.generator import (MAX_SIZE, MIN_SIZE, PREVALENCE, PhantomCase, case_row,
                                             generate_phantom, render_case)

__all__ = ["PhantomCase", "render_case", "generate_phantom", "PREVALENCE", "MIN_SIZE", "MAX_SIZE",
           "case_row", "list_findings", "register_finding"]
