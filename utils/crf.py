"""Dense CRF refinement (pydensecrf2) with MaskDistill's defaults, shared by every stage that refines masks.

`dense_crf(image, probs)` refines a (C, H, W) softmax; `refine_labels(image, label)` refines a label map from
the labels alone (unary from labels with a ground-truth probability); `PairwiseCRF` builds an image's pairwise
terms once for several unaries (MaskCut's masks of one image). The folder command is `segmentation/crf.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from utils.label_png import IGNORE_INDEX


@dataclass(frozen=True)
class CRFParams:
    """MaskDistill's defaults: 10 mean-field iterations, Gaussian (1, 3), bilateral (67, 3, 4)."""
    iterations: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0


class PairwiseCRF:
    """A dense CRF over one image whose pairwise terms (Gaussian and bilateral, the costly part to
    build) are built once; `infer` runs mean-field inference for a unary, and may be called again
    with other unaries (MaskCut refines several masks of an image) with the same result as a new CRF."""

    def __init__(self, image: np.ndarray, num_labels: int, params: CRFParams = CRFParams()) -> None:
        import pydensecrf.densecrf as dcrf

        h, w = image.shape[:2]
        self.shape = (num_labels, h, w)
        self.iterations = params.iterations
        self._crf = dcrf.DenseCRF2D(w, h, num_labels)
        self._crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
        self._crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                                       rgbim=np.array(image, dtype=np.uint8, order="C"),  # a writable copy
                                       compat=params.bilateral_compat)

    def infer(self, unary: np.ndarray) -> np.ndarray:
        """Refined (C, H, W) probabilities for a (C, H*W) unary energy (negative log-probabilities)."""
        self._crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        q = self._crf.inference(self.iterations)
        return np.asarray(q, dtype=np.float32).reshape(self.shape)


def _inference(image: np.ndarray, unary: np.ndarray, num_labels: int, params: CRFParams) -> np.ndarray:
    return PairwiseCRF(image, num_labels, params).infer(unary)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine a (C, H, W) softmax with the HxWx3 uint8 image; returns refined (C, H, W) probabilities."""
    from pydensecrf.utils import unary_from_softmax

    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probabilities {probs.shape} do not match the image {image.shape[:2]}")
    unary = unary_from_softmax(np.clip(probs, 1e-8, 1.0))
    return _inference(image, unary, probs.shape[0], params)


def refine_labels(image: np.ndarray, label: np.ndarray, params: CRFParams = CRFParams(), gt_prob: float = 0.8,
                  fill_ignore: bool = False) -> np.ndarray:
    """Refine an HxW class map (255 = ignore, treated as "unsure") with the image; returns a new class map.

    Ignore pixels stay 255 unless `fill_ignore`, which lets the CRF label them too.
    """
    from pydensecrf.utils import unary_from_labels

    if label.shape != image.shape[:2]:
        raise ValueError(f"label {label.shape} does not match the image {image.shape[:2]}")
    classes = np.unique(label[label != IGNORE_INDEX])
    if classes.size < 2:  # nothing to separate
        out = label.copy()
        if fill_ignore and classes.size == 1:
            out[out == IGNORE_INDEX] = classes[0]
        return out
    # Compact ids 1..n with 0 = unsure (pydensecrf's convention), then back to the original ids.
    lookup = np.zeros(256, dtype=np.int64)
    lookup[classes] = np.arange(1, classes.size + 1)
    compact = lookup[label]
    unary = unary_from_labels(compact, classes.size, gt_prob=gt_prob, zero_unsure=True)
    q = _inference(image, unary, classes.size, params)
    refined = classes[np.argmax(q, axis=0)].astype(np.uint8)
    if not fill_ignore:
        refined[label == IGNORE_INDEX] = IGNORE_INDEX
    return refined
