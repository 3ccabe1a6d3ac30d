"""A small mutation check of the core algorithm modules: do the tests catch a flipped comparison, a dropped
term, an off-by-one?

    .venv/bin/python tests/mutation/run_mutants.py            # every mutant (a few minutes on 2 cores)
    .venv/bin/python tests/mutation/run_mutants.py --only lost maskcut --list
    .venv/bin/python tests/mutation/run_mutants.py --numbers 9 16

The checkout's files (tracked and untracked, not ignored) are copied once to a temporary folder; each mutant
is applied there to one module (an exact, unique piece of its text replaced), the quick-tier test files of
that module run on the copy (`pytest -x`, no bytecode written), and the module is restored before the next
mutant. The checkout itself is never written. A mutant is killed when a test fails (or the run passes its
time limit); the first failing test is reported. The copy sees the real data (tiny_coco, voc_mini) when
`--shared` names a folder holding `data/` (default: the checkout's `../shared`, as tests/conftest.py looks).

Not collected by pytest (the file name does not start with `test_`). Exit status 1 when a mutant survives that
is not marked equivalent (a change no input can observe, with the reason in the table).
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    module: str  # path from the repository root
    old: str  # a piece of the module's text that occurs exactly once
    new: str  # what it becomes
    what: str  # the kind of change, for the table
    equivalent: str = ""  # why no test can kill it (it changes no behaviour), when that is so


# The test files run for each module's mutants: the quick tier's tests of that module.
TESTS = {
    "distill/ncut.py": ["tests/test_ncut.py", "tests/test_methods.py"],
    "distill/lost.py": ["tests/test_methods.py"],
    "distill/tokencut.py": ["tests/test_methods.py"],
    "distill/maskcut.py": ["tests/test_methods.py"],
    "distill/maskgen.py": ["tests/test_maskgen.py", "tests/test_dinov2_features.py"],
    "evaluation/corloc.py": ["tests/test_corloc.py"],
    "evaluation/coco_eval.py": ["tests/test_eval_instances.py", "tests/test_corloc.py", "tests/test_open_world_eval.py"],
    "detectron2_train/droploss.py": ["tests/test_maskrcnn_droploss.py"],
    "detectron2_train/transfer_head.py": ["tests/test_maskrcnn_transfer.py"],
}

MUTANTS = [
    # distill/ncut.py: TokenCut's graph, the Ncut solver, the Ncut value, the attention rule
    Mutant("distill/ncut.py", "unit.transpose(1, 2)) > tau", "unit.transpose(1, 2)) >= tau", "> to >="),
    Mutant("distill/ncut.py", "z = torch.where(peak[:, None] < 0, -z, z)", "z = torch.where(peak[:, None] > 0, -z, z)",
           "< to >"),
    Mutant("distill/ncut.py", "z = ritz_vectors[:, :, 1]", "z = ritz_vectors[:, :, 2]", "off by one"),
    Mutant("distill/ncut.py", "value = cut / vol_s.clamp_min(1e-300) + cut / vol_rest.clamp_min(1e-300)",
           "value = cut / vol_s.clamp_min(1e-300)", "term dropped"),
    Mutant("distill/ncut.py", "return 1.0 - ncut_value(affinity, masks) / 2.0", "return 1.0 - ncut_value(affinity, masks)",
           "term dropped"),
    Mutant("distill/ncut.py", "(not inside.size or outside.mean() > inside.mean())",
           "(not inside.size or outside.mean() < inside.mean())", "> to <"),
    # distill/lost.py: degree, seed, seed expansion over the k lowest-degree patches
    Mutant("distill/lost.py", "positive = similarity > 0", "positive = similarity >= 0", "> to >="),
    Mutant("distill/lost.py", "seed = int(order[0])", "seed = int(order[1])", "off by one"),
    Mutant("distill/lost.py", "candidates = order[:k_patches]", "candidates = order[:k_patches - 1]", "off by one"),
    Mutant("distill/lost.py", "candidates = order[:k_patches]", "candidates = order[:k_patches + 1]", "off by one"),
    Mutant("distill/lost.py", "similarity[b, seed, candidates] > 0", "similarity[b, seed, candidates] >= 0", "> to >="),
    Mutant("distill/lost.py", "similarity[b, similar].sum(0) > 0", "similarity[b, similar].sum(0) >= 0", "> to >="),
    # distill/tokencut.py: the seed (largest |y|) and the partition holding it
    Mutant("distill/tokencut.py", "seeds = vectors.abs().argmax(-1)", "seeds = vectors.argmax(-1)", "term dropped (abs)"),
    Mutant("distill/tokencut.py", "torch.where(seed_above, above, ~above)", "torch.where(seed_above, ~above, above)",
           "branches swapped"),
    Mutant("distill/tokencut.py", "if not masks[b].any():", "if False:", "rule dropped",
           equivalent="unreachable: the seed always lies in its own side of the mean (with either foreground rule), "
                      "so the seed's component is never empty, even for a one-patch grid"),
    # distill/maskcut.py: the corner rule, the largest-|x| rule, the drop rules, the pixel steps
    Mutant("distill/maskcut.py", "if corners >= 3 or", "if corners >= 5 or", "rule disabled (>= 5)"),
    Mutant("distill/maskcut.py", "if corners >= 3 or", "if corners >= 4 or", "off by one"),
    Mutant("distill/maskcut.py", "if corners >= 3 or", "if corners >= 2 or", "off by one"),
    Mutant("distill/maskcut.py", "or not above.flat[np.abs(vector).argmax()]", "and not above.flat[np.abs(vector).argmax()]",
           "or to and"),
    Mutant("distill/maskcut.py", "mask.mean() <= MIN_AREA_FRACTION", "mask.mean() < MIN_AREA_FRACTION", "<= to <"),
    Mutant("distill/maskcut.py", "_iou(previous[b], mask) > MAX_IOU_WITH_PREVIOUS or ", "", "term dropped"),
    Mutant("distill/maskcut.py", "removed |= torch", "removed = torch", "term dropped (earlier cuts)"),
    Mutant("distill/maskcut.py", "        taken |= cut\n", "", "term dropped"),
    Mutant("distill/maskcut.py", "if _iou(cut, refined) < MIN_CRF_IOU:", "if _iou(cut, refined) > MIN_CRF_IOU:", "< to >"),
    # distill/maskgen.py: DINO's mass threshold, the CLS token, the candidates and the sources
    Mutant("distill/maskgen.py", "keep_sorted = cumulative > (1.0 - mass)", "keep_sorted = cumulative >= (1.0 - mass)",
           "> to >="),
    Mutant("distill/maskgen.py", "q_cls = query[:, :heads, 0, :]", "q_cls = query[:, :heads, 1, :]", "off by one"),
    Mutant("distill/maskgen.py", "num_candidates = max(1, int(topk * num_patches))",
           "num_candidates = max(1, int(topk * num_patches) - 1)", "off by one"),
    Mutant("distill/maskgen.py", "candidate_keys) > 0", "candidate_keys) >= 0", "> to >="),
    Mutant("distill/maskgen.py", "foreground = (object_scores > 0)", "foreground = (object_scores >= 0)", "> to >="),
    # evaluation/corloc.py: the most confident prediction, IoU >= 0.5, no_hard, LOST's rounding
    Mutant("evaluation/corloc.py", 'ann["score"] > best[key]["score"]', 'ann["score"] >= best[key]["score"]',
           "> to >= (ties: the last)"),
    Mutant("evaluation/corloc.py", "[0] >= iou_threshold).any())", "[0] > iou_threshold).any())", ">= to >"),
    Mutant("evaluation/corloc.py", "if gt.no_hard:", "if False:", "rule dropped"),
    Mutant("evaluation/corloc.py", "(o.difficult or o.truncated)", "(o.difficult and o.truncated)", "or to and"),
    Mutant("evaluation/corloc.py", "corners = np.round(", "corners = np.floor(", "rounding changed"),
    # evaluation/coco_eval.py: the most-confident protocol, mask AP's areas, crowd regions
    Mutant("evaluation/coco_eval.py", 'ann["score"] > best[ann["image_id"]]["score"]',
           'ann["score"] >= best[ann["image_id"]]["score"]', "> to >= (ties: the last)"),
    Mutant("evaluation/coco_eval.py", "paired.append(candidates[int(np.argmax(ious))])",
           "paired.append(candidates[int(np.argmin(ious))])", "max to min"),
    Mutant("evaluation/coco_eval.py", '        if not ann.get("iscrowd", 0):\n            gt_by_image',
           "        if True:\n            gt_by_image", "rule dropped (crowd)"),
    Mutant("evaluation/coco_eval.py", '            ann.pop("bbox", None)\n        else:', "            pass\n        else:",
           "term dropped (segm keeps bbox)"),
    # detectron2_train/droploss.py: max IoU <= thresh dropped, images without boxes kept, the divisor
    Mutant("detectron2_train/droploss.py", "(max_iou > iou_thresh)", "(max_iou >= iou_thresh)", "> to >="),
    Mutant("detectron2_train/droploss.py", "box_iou(roi_boxes, gt).max(dim=1)", "box_iou(roi_boxes, gt).min(dim=1)",
           "max to min"),
    Mutant("detectron2_train/droploss.py", "weights.append(roi_boxes.new_ones(roi_boxes.shape[0]))",
           "weights.append(roi_boxes.new_zeros(roi_boxes.shape[0]))", "rule flipped"),
    Mutant("detectron2_train/droploss.py", "best = class_logits.detach()[:, 1:].argmax(dim=1) + 1",
           "best = class_logits.detach()[:, 1:].argmax(dim=1)", "off by one"),
    Mutant("detectron2_train/droploss.py", "loss_cls = (weights * per_roi).sum() / max(labels_all.numel(), 1)",
           "loss_cls = (weights * per_roi).sum() / weights.sum().clamp_min(1)", "divisor changed"),
    # detectron2_train/transfer_head.py: stop-gradient, the class rows, T's layers, weights vs bias
    Mutant("detectron2_train/transfer_head.py", "if not self.transfer_grad:", "if self.transfer_grad:", "not dropped"),
    Mutant("detectron2_train/transfer_head.py", "        if i < num_layers - 1:\n            layers.append(",
           "        if i < num_layers:\n            layers.append(", "off by one"),
    Mutant("detectron2_train/transfer_head.py", 'w_seg[:, :-1]) + w_seg[:, -1][None, :, None, None]',
           'w_seg[:, 1:]) + w_seg[:, 0][None, :, None, None]', "off by one"),
    Mutant("detectron2_train/transfer_head.py", "vectors[0] = 0.0", "vectors[0] = vectors[0]", "term dropped"),
    Mutant("detectron2_train/transfer_head.py", 'return {"cls": 1, "box": 4, "cls+box": 5}[kind] * representation_size',
           'return {"cls": 1, "box": 4, "cls+box": 4}[kind] * representation_size', "term dropped"),
    Mutant("detectron2_train/transfer_head.py", "rows.append(torch.tensor([found[w][1] for w in key.split()]).mean(dim=0))",
           "rows.append(torch.tensor([found[w][1] for w in key.split()]).sum(dim=0))", "mean to sum"),
]


@dataclass
class Outcome:
    number: int  # in MUTANTS, from 1
    mutant: Mutant
    line: int
    killed: bool
    by: str  # the first failing test, "timeout", or "" (survived)
    seconds: float


def copy_checkout(source: Path, target: Path) -> None:
    """The checkout's tracked and untracked (not ignored) files, as they are on disk."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=source,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = source / name
        if src.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / name)


def run_tests(repo: Path, test_files: list[str], timeout: float) -> tuple[bool, str]:
    """(passed, first failing test or "timeout") of `pytest -x` over the files, in the copy."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "--tb=no", "-p", "no:randomly", *test_files]
    try:
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timeout"
    if done.returncode == 0:
        return True, ""
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    return False, found.group(1) if found else f"pytest exit {done.returncode}: {done.stdout.strip()[-200:]}"


def apply(repo: Path, mutant: Mutant) -> tuple[str, int]:
    """Mutate the copy's module; returns (its original text, the line of the change)."""
    path = repo / mutant.module
    text = path.read_text()
    if text.count(mutant.old) != 1:
        raise SystemExit(f"error: {mutant.module}: {mutant.old!r} occurs {text.count(mutant.old)} times, not once")
    path.write_text(text.replace(mutant.old, mutant.new))
    return text, text[:text.index(mutant.old)].count("\n") + 1 + (mutant.old[0] == "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", default=[], metavar="NAME",
                        help="mutants of the modules whose path contains one of these (default: every module)")
    parser.add_argument("--numbers", nargs="+", type=int, default=[], metavar="N",
                        help="only the mutants of these numbers (as --list numbers them)")
    parser.add_argument("--list", action="store_true", help="print the numbered mutants and run nothing")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds for one mutant's test run; past it the mutant counts as killed (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="mutants checked at once, each in its own copy of the checkout (default: %(default)s)")
    parser.add_argument("--skip_baseline", action="store_true",
                        help="do not first check that the unmutated copy passes the selected test files")
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared",
                        help="folder holding data/ for the tests (default: %(default)s, skipped when absent)")
    args = parser.parse_args()

    unknown = [n for n in args.numbers if not 1 <= n <= len(MUTANTS)]
    if unknown:
        raise SystemExit(f"error: --numbers {unknown[0]}: the mutants are numbered 1 to {len(MUTANTS)}")
    mutants = [(number, m) for number, m in enumerate(MUTANTS, 1)
               if (not args.only or any(name in m.module for name in args.only))
               and (not args.numbers or number in args.numbers)]
    if not mutants:
        raise SystemExit("error: --only and --numbers leave no mutant (see --list)")
    if args.list:
        for number, m in mutants:
            print(f"{number}. {m.module}: {m.what}: {m.old.strip()!r} -> {m.new.strip()!r}")
        return

    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs} must be at least 1")
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copies: queue.Queue[Path] = queue.Queue()
        for job in range(min(args.jobs, len(mutants))):
            repo = Path(tmp) / f"repo{job}"
            copy_checkout(REPO, repo)
            copies.put(repo)
        if args.shared.is_dir():  # tests/conftest.py finds the real data at ../shared of the checkout
            (Path(tmp) / "shared").symlink_to(args.shared.resolve())

        def baseline(files: tuple[str, ...]) -> tuple[tuple[str, ...], bool, str]:
            repo = copies.get()
            try:
                return (files, *run_tests(repo, list(files), args.timeout))
            finally:
                copies.put(repo)

        def check(item: tuple[int, Mutant]) -> Outcome:
            number, mutant = item
            repo = copies.get()
            original, line = apply(repo, mutant)
            start = time.perf_counter()
            try:
                passed, failure = run_tests(repo, TESTS[mutant.module], args.timeout)
            finally:
                (repo / mutant.module).write_text(original)
                copies.put(repo)
            print(f"#{number} {mutant.module}:{line} {'killed' if not passed else 'SURVIVED'}", file=sys.stderr,
                  flush=True)
            return Outcome(number, mutant, line, not passed, failure, time.perf_counter() - start)

        with ThreadPoolExecutor(args.jobs) as pool:
            if not args.skip_baseline:
                for files, passed, failure in pool.map(baseline, dict.fromkeys(tuple(TESTS[m.module])
                                                                               for _, m in mutants)):
                    if not passed:
                        raise SystemExit(f"error: the unmutated copy fails {failure} ({' '.join(files)}); fix that first")
            outcomes = list(pool.map(check, mutants))

    print("| # | mutant | file:line | result | killed by | s |")
    print("|---|---|---|---|---|---|")
    for o in outcomes:
        change = f"`{o.mutant.old.strip()}` -> `{o.mutant.new.strip()}`" if o.mutant.new.strip() else \
            f"`{o.mutant.old.strip()}` removed"
        print(f"| {o.number} | {o.mutant.what}: {change.replace('|', '/').replace(chr(10), ' ')} | "
              f"{o.mutant.module}:{o.line} | {result(o)} | {o.by} | {o.seconds:.0f} |")
    killed = sum(o.killed for o in outcomes)
    equivalent = sum(not o.killed and bool(o.mutant.equivalent) for o in outcomes)
    print(f"\n{killed} of {len(outcomes)} mutants killed, {equivalent} of the survivors equivalent")
    sys.exit(0 if killed + equivalent == len(outcomes) else 1)


def result(outcome: Outcome) -> str:
    if outcome.killed:
        return "killed"
    return f"survived (equivalent: {outcome.mutant.equivalent})" if outcome.mutant.equivalent else "**survived**"


if __name__ == "__main__":
    main()
