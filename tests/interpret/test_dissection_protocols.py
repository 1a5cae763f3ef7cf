"""Dissection protocols (issue 14, defect 7): the authors' released code's counting (imba-explain
``ConceptDetector``: per-batch quantile of the upsampled maps, ``>=``, OpenCV contours inside the union of
boxes, one entry per box label) on constructed activations with counts known by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interpret.dissection import PROTOCOLS, count_contours, dissect_activations

S = 16


def _acts() -> tuple[torch.Tensor, list, list]:
    """2 images, 2 units, 16 x 16 maps at a 16 px image (no resampling).

    Image 0, unit 0: two 2x2 blobs inside box 1 (2 contours) and a 5x5 ring with a one-pixel hole inside box 2
    (outer + hole: 2 contours); unit 1: a full-width bar, clipped by box 1 to one piece. Image 0 has box labels
    [0, 1, 0] (class 0 twice). Image 1: one class-0 box, both units zero."""
    a = torch.zeros(2, 2, S, S)
    a[0, 0, 2:4, 2:4] = 1
    a[0, 0, 2:4, 8:10] = 1
    a[0, 0, 10:15, 10:15] = 1
    a[0, 0, 12, 12] = 0                                            # the ring's hole
    a[0, 1, 4:6, :] = 1                                            # bar, partly outside every box
    boxes = [np.array([[0, 0, 11, 6], [9, 9, 16, 16], [12, 0, 16, 4]], np.float32),
             np.array([[0, 0, 16, 16]], np.float32)]
    labels = [np.array([0, 1, 0]), np.array([0])]
    return a, boxes, labels


def test_authors_code_counts_known_by_hand():
    a, boxes, labels = _acts()
    # q = .04, one batch of both images: 512 values per unit, the linear quantile at .96 (position 490.56)
    # falls among the ones (unit 0: 24 ones, unit 1: 32), so T = 1 and ">=" keeps exactly the ones.
    res = dissect_activations(a, boxes, labels, ["A", "B"], S, q=0.04, batch_size=2, protocol="authors_code")
    np.testing.assert_allclose(res.thresholds, [1.0, 1.0])
    # image 0: unit 0 has 4 contours, unit 1 one -> Disjoint 5, Unique 2; image 1: 0, 0.
    # class A entries: image 0 twice (two A boxes) + image 1 -> 10/3, 4/3; class B: image 0 once -> 5, 2;
    # global: 4 entries -> 15/4, 6/4
    pc = res.per_class
    assert pc.loc["A", "n_images"] == 3 and pc.loc["B", "n_images"] == 1
    assert pc.loc["A", "disjoint"] == pytest.approx(10 / 3) and pc.loc["A", "unique"] == pytest.approx(4 / 3)
    assert pc.loc["B", "disjoint"] == pytest.approx(5) and pc.loc["B", "unique"] == pytest.approx(2)
    assert res.overall["n_images"] == 4
    assert res.overall["disjoint"] == pytest.approx(15 / 4) and res.overall["unique"] == pytest.approx(6 / 4)
    assert res.params["protocol"] == "authors_code" and res.params["map_size"] == [S, S]
    assert np.isnan(res.iou).all()

    # per-batch quantile: with batches of one image, image 1 (all zeros) gets T = 0 and ">=" keeps its whole
    # box: one contour per unit -> image 1 counts Disjoint 2, Unique 2
    res1 = dissect_activations(a, boxes, labels, ["A", "B"], S, q=0.04, batch_size=1, protocol="authors_code")
    assert res1.per_class.loc["A", "disjoint"] == pytest.approx((5 + 5 + 2) / 3)
    assert res1.per_class.loc["A", "unique"] == pytest.approx((2 + 2 + 2) / 3)

    # the paper's protocol on the same maps: dataset quantile (rank floor(.96 * 511) = 490 -> 1) and ">",
    # so the ties at T are left out and nothing is counted
    paper = dissect_activations(a, boxes, labels, ["A", "B"], S, q=0.04, protocol="paper")
    assert paper.overall["disjoint"] == 0 and paper.params["protocol"] == "paper"


def test_paper_protocol_counts_components_that_overlap_a_box():
    """The paper's protocol with the background at -1 and q = .1 (rank floor(.9 * 511) = 459 falls in the
    background, so T = -1 and ">" keeps exactly the ones): the ring counts once (no hole contour) and the bar
    once although it runs outside the boxes."""
    a, boxes, labels = _acts()
    res = dissect_activations(2 * a - 1, boxes, labels, ["A", "B"], S, q=0.1, protocol="paper")
    np.testing.assert_allclose(res.thresholds, [-1.0, -1.0])
    per_image = res.per_image.set_index(["image_id", "class"])
    # unit 0: two blobs (class A box) + ring (class B box); unit 1: the bar (class A box) -> any: 4 components
    assert per_image.loc[("0", "any"), "components"] == 4 and per_image.loc[("0", "any"), "units"] == 2
    assert per_image.loc[("0", "A"), "components"] == 3 and per_image.loc[("0", "B"), "components"] == 1


def test_unknown_protocol_lists_the_valid_ones():
    a, boxes, labels = _acts()
    assert PROTOCOLS == ("paper", "authors_code")
    with pytest.raises(ValueError, match="valid: \\['paper', 'authors_code'\\]"):
        dissect_activations(a, boxes, labels, ["A", "B"], S, protocol="netdissect")


def test_count_contours_equals_opencv_retr_tree():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    masks = [rng.random((int(h), int(w))) < rng.uniform(0.2, 0.8) for h, w in rng.integers(3, 24, (200, 2))]
    for m in masks:
        contours, _ = cv2.findContours(m.astype(np.uint8) * 255, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
        assert count_contours(m[None])[0] == len(contours)
    stack = np.stack([np.pad(m, ((0, 24 - m.shape[0]), (0, 24 - m.shape[1]))) for m in masks[:20]])
    assert count_contours(stack).tolist() == [count_contours(m[None])[0] for m in stack]   # planes independent
