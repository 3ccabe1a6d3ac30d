"""Dense CRF: refines blocky VOC ground truth towards the true masks; the folder command and its errors."""

import numpy as np
from PIL import Image

from segmentation import crf
from utils.crf import dense_crf, refine_labels
from tests.cli_helpers import run_main
from utils.images import load_rgb
from utils.label_png import read_label_png, write_label_png
from evaluation.metrics import confusion_matrix, iou_from_confusion

NAMES = ["2011_000003", "2011_000006", "2011_000025"]


def blocky(label: np.ndarray, block: int = 16) -> np.ndarray:
    """Block-downsample (centre pixel of each block) then upsample by repetition to the original size."""
    h, w = label.shape
    rows = np.minimum((np.arange(h) // block) * block + block // 2, h - 1)
    cols = np.minimum((np.arange(w) // block) * block + block // 2, w - 1)
    return label[rows][:, cols]


def _miou(pred, gt):
    pred = np.where(pred == 255, 0, pred)
    return iou_from_confusion(confusion_matrix(pred, gt, 21))[0], confusion_matrix(pred, gt, 21)


def test_crf_raises_iou_of_blocky_voc_masks(voc_mini):
    voc = voc_mini / "VOC2012"
    before_total = after_total = 0
    for name in NAMES:
        image = np.array(load_rgb(voc / "JPEGImages" / f"{name}.jpg"))
        gt = read_label_png(voc / "SegmentationClass" / f"{name}.png")
        coarse = blocky(gt)
        refined = refine_labels(image, coarse)
        before, conf_b = _miou(coarse, gt)
        after, conf_a = _miou(refined, gt)
        assert after > before, f"{name}: CRF lowered mIoU {before:.4f} -> {after:.4f}"
        before_total, after_total = before_total + conf_b, after_total + conf_a
    pooled_before = iou_from_confusion(before_total)[0]
    pooled_after = iou_from_confusion(after_total)[0]
    assert pooled_after - pooled_before > 0.01, (pooled_before, pooled_after)


def test_dense_crf_keeps_a_confident_softmax_and_sharpens_a_vague_one():
    image = np.zeros((24, 24, 3), np.uint8)
    image[:, 12:] = 255
    probs = np.full((2, 24, 24), 0.5, np.float32)
    probs[0, :, :10] = 0.9
    probs[1, :, :10] = 0.1
    probs[0, :, 14:] = 0.1
    probs[1, :, 14:] = 0.9
    out = dense_crf(image, probs)
    assert out.shape == (2, 24, 24) and np.allclose(out.sum(0), 1, atol=1e-4)
    assert (out.argmax(0)[:, :12] == 0).all() and (out.argmax(0)[:, 12:] == 1).all()


def test_cli_refines_binary_masks_with_a_pool(tmp_path, voc_mini):
    voc = voc_mini / "VOC2012"
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in NAMES[:2]:
        gt = read_label_png(voc / "SegmentationClass" / f"{name}.png")
        fg = (blocky(gt) > 0) & (blocky(gt) < 255)
        Image.fromarray(fg.astype(np.uint8) * 255, mode="L").save(masks / f"{name}.png")
    argv = ["--image_dir", str(voc / "JPEGImages"), "--mask_dir", str(masks), "--out_dir", str(tmp_path / "out"),
            "--workers", "2"]
    code, _, stderr = run_main(crf.main, argv)
    assert code == 0, stderr
    for name in NAMES[:2]:
        out = Image.open(tmp_path / "out" / f"{name}.png")
        values = set(np.unique(np.array(out)).tolist())
        assert out.mode == "L" and values <= {0, 255} and values == {0, 255}
    code, stdout, _ = run_main(crf.main, argv)
    assert code == 0 and "0 refined, 2 already done" in stdout


def test_cli_size_mismatch_is_one_clear_line(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("0", "a"):
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "img" / f"{name}.jpg")
    write_label_png(tmp_path / "masks" / "0.png", np.zeros((10, 12), np.uint8))  # good, and refined first
    write_label_png(tmp_path / "masks" / "a.png", np.zeros((10, 10), np.uint8))
    code, _, stderr = run_main(crf.main, ["--image_dir", str(tmp_path / "img"), "--mask_dir", str(tmp_path / "masks"),
                                          "--out_dir", str(tmp_path / "out"), "--workers", "1"])
    assert code == 2
    assert stderr.startswith("error: mask ") and "masks/a.png" in stderr
    assert stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()  # the sizes are checked before any mask is refined


def _literal_crf(image, unary, labels, params):
    """The CRF as it was written before `PairwiseCRF`: a new DenseCRF2D, unary first, then the kernels."""
    import pydensecrf.densecrf as dcrf

    h, w = image.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    return np.asarray(crf.inference(params.iterations), dtype=np.float32).reshape(labels, h, w)


def test_pairwise_terms_built_once_give_the_same_result_as_a_new_crf_per_unary(voc_mini):
    """MaskCut refines several masks of one image with one PairwiseCRF: bit for bit the same as before."""
    from pydensecrf.utils import unary_from_softmax

    from utils.crf import CRFParams, PairwiseCRF

    image = np.array(load_rgb(voc_mini / "VOC2012" / "JPEGImages" / "2011_000003.jpg"))[:120, :160].copy()
    params = CRFParams(10, 3.0, 7.0, 50.0, 5.0, 10.0)
    rng = np.random.default_rng(0)
    shared = PairwiseCRF(image, 2, params)
    for _ in range(3):
        fg = np.zeros(image.shape[:2], np.float32)
        y, x = rng.integers(0, 80, 2)
        fg[y:y + 40, x:x + 60] = 0.7
        unary = unary_from_softmax(np.stack([1 - fg, fg]).clip(0.1, 0.9))
        np.testing.assert_array_equal(shared.infer(unary), _literal_crf(image, unary, 2, params))
    probs = rng.dirichlet(np.ones(3), size=image.shape[:2]).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(dense_crf(image, probs), _literal_crf(
        image, unary_from_softmax(np.clip(probs, 1e-8, 1.0)), 3, CRFParams()))
