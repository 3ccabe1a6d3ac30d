"""The structure rules: the import rule between the layers (utils < evaluation < the stages < orchestrate < the root
scripts), no import cycle between modules, and the shared pieces exist once (the object category, the
confident-else-best rule, ImageNet normalisation, the tiny ResNet, the checkpoint key-cleaner)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.coco_io import OBJECT_CATEGORY, confident_else_best, make_annotation
from utils.resnets import TinyResNet, load_resnet_weights
from utils.state_dicts import state_dict_mismatch, unwrap_state_dict

REPO = Path(__file__).resolve().parents[1]
STAGE_PACKAGES = ("distill", "segmentation", "detectron2_train", "orchestrate")
# The one exception: the clustering stage's documented entry-point script (argparse + one call into distill/).
ENTRY_POINT_SCRIPTS = {"utils/cluster.py": {"orchestrate.cluster"}}


def imported_modules(path: Path, with_members: bool = False) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included); `with_members` adds
    `package.name` for each `from package import name` (a name that may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if with_members:
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


STAGES = ("distill", "segmentation", "detectron2_train")


def root_scripts(repo: Path) -> set[str]:
    """The root scripts' module names (gen_masks, pipeline, eval_instances, ...)."""
    return {p.stem for p in repo.glob("*.py")}


def import_rule_violations(repo: Path) -> list[str]:
    """`file imports module` for every import that runs the wrong way: a stage package importing another stage,
    orchestrate or a root script; utils importing a stage, orchestrate or evaluation (but the documented entry
    script); evaluation importing anything of the repository but utils; orchestrate importing a root script or a
    stage's command module (one that defines `cli()`: it calls the stages' libraries, not their parsers)."""
    scripts = root_scripts(repo)
    allowed = {stage: {stage, "utils", "evaluation"} for stage in STAGES}
    allowed |= {"utils": {"utils"}, "evaluation": {"utils", "evaluation"},
                "orchestrate": {"orchestrate", "utils", "evaluation", *STAGES}}
    ours = set(allowed) | scripts
    found = []
    for package, may in allowed.items():
        for path in sorted((repo / package).glob("*.py")):
            name = path.relative_to(repo).as_posix()
            for module in sorted(imported_modules(path)):
                top = module.split(".")[0]
                if top in ours and top not in may and module not in ENTRY_POINT_SCRIPTS.get(name, set()):
                    found.append(f"{name} imports {module}")
    for path in sorted((repo / "orchestrate").glob("*.py")):  # the stages' libraries, not their commands
        for module in sorted(imported_modules(path, with_members=True)):
            command = repo / (module.replace(".", "/") + ".py")
            if module.split(".")[0] in STAGES and command.is_file() and "\ndef cli(" in command.read_text():
                found.append(f"{path.relative_to(repo).as_posix()} imports the command {module}")
    return found


def test_the_import_rule_holds():
    assert import_rule_violations(REPO) == []


def test_the_import_rule_catches_each_wrong_way(tmp_path):
    """The imports the rule forbids, one per file, as the old tree had them (distill/pipeline.py imported the
    gen_masks script and the other stages; distill/maskcut.py imported segmentation.crf)."""
    wrong = {"distill/maskcut.py": "from segmentation.crf import PairwiseCRF",
             "distill/pipeline.py": "import gen_masks",
             "detectron2_train/engine.py": "from orchestrate.pipeline import run_pipeline",
             "segmentation/rounds.py": "def f():\n    from detectron2_train.engine import run",
             "utils/steps.py": "from distill.engine import generate_masks",
             "utils/report.py": "from evaluation.metrics import accuracy",
             "evaluation/corloc.py": "from distill.data import folder_entries",
             "orchestrate/pipeline.py": "import eval_instances",
             "orchestrate/pa_source.py": "from detectron2_train import train_net"}
    allowed = {"distill/engine.py": "from utils.vit import build_vit\nfrom evaluation.metrics import x",
               "orchestrate/cluster.py": "from distill.cluster import cluster_masks\nfrom segmentation import engine"}
    for name, text in {**wrong, **allowed}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    for script in ("gen_masks.py", "eval_instances.py"):
        (tmp_path / script).write_text("")
    (tmp_path / "detectron2_train" / "train_net.py").write_text("def main(): ...\n\n\ndef cli(): ...\n")
    found = import_rule_violations(tmp_path)
    assert sorted(f.split(" imports ")[0] for f in found) == sorted(wrong), found


def test_nothing_in_utils_imports_a_stage_package():
    for path in sorted((REPO / "utils").glob("*.py")):
        name = path.relative_to(REPO).as_posix()
        upward = {m for m in imported_modules(path) if m.split(".")[0] in STAGE_PACKAGES}
        assert upward == ENTRY_POINT_SCRIPTS.get(name, set()), f"{name} imports {sorted(upward)}"
    for name in ENTRY_POINT_SCRIPTS:
        doc = ast.get_docstring(ast.parse((REPO / name).read_text()))
        assert "entry-point script, not a library module" in " ".join(doc.split())
        assert not any(imported_modules(p) & {name[:-3].replace("/", ".")} for p in REPO.rglob("*.py")
                       if ".venv" not in p.parts and "tests" not in p.parts), f"a library module imports {name}"


def local_top_level_packages() -> set[str]:
    """The repository's own importable names: its packages and its root scripts."""
    return {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()} | {p.stem for p in REPO.glob("*.py")}


def test_evaluation_imports_only_utils():
    """evaluation/ is below the stages: it imports utils/ and itself, no stage, no orchestration, no script."""
    local = local_top_level_packages()
    for path in sorted((REPO / "evaluation").glob("*.py")):
        found = {m for m in imported_modules(path) if m.split(".")[0] in local}
        outside = {m for m in found if m.split(".")[0] not in ("utils", "evaluation")}
        assert outside == set(), f"{path.relative_to(REPO).as_posix()} imports {sorted(outside)}"
    assert "utils" in local and "distill" in local and "pipeline" in local  # the rule sees packages and scripts


def test_the_import_rule_sees_function_level_imports(tmp_path):
    (tmp_path / "m.py").write_text("import os\n\ndef f():\n    from utils.vit import build_vit\n")
    assert imported_modules(tmp_path / "m.py") == {"os", "utils.vit"}


PACKAGES = ("utils", "evaluation", *STAGE_PACKAGES)


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports, at any depth (`from pkg import module` counts as importing
    the module); the modules are the .py files directly under each package folder."""
    modules = {f"{package}.{p.stem}": p for package in packages for p in sorted((root / package).glob("*.py"))}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                          for alias in node.names}
        graph[name] = {m for m in edges if m in modules and m != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: one list of modules per strongly connected component of more than one
    module (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_no_import_cycle_between_modules():
    """Imports run one way: no module imports (even inside a function) one that imports it back, directly or not."""
    assert import_cycles(import_graph(REPO)) == []


def test_the_cycle_check_sees_indirect_and_function_level_cycles(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg import c\n")
    (tmp_path / "pkg" / "c.py").write_text("import os\n\ndef g():\n    import pkg.a\n")
    (tmp_path / "pkg" / "d.py").write_text("import pkg.a\n")  # imports the cycle, is not part of it
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    (tmp_path / "pkg" / "c.py").write_text("import os\n")
    assert import_cycles(import_graph(tmp_path, ("pkg",))) == []


def namespace_parameters(path: Path) -> list[str]:
    """`function(parameter)` for every parameter of a function in `path` that takes an argparse Namespace: annotated
    `argparse.Namespace`/`Namespace`, or an unannotated one named `args`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
                annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                if "Namespace" in annotation or (arg.arg == "args" and not annotation):
                    found.append(f"{node.name}({arg.arg})")
    return found


def test_library_functions_take_typed_settings_not_a_namespace():
    """Only the command boundary takes parsed flags: the entry-point modules themselves (they define `cli()`) and
    the `*_from_args` converters; the library (every package) takes dataclasses or checked config dicts."""
    offenders = {}
    for package in ("orchestrate", "evaluation", "distill", "segmentation", "detectron2_train", "utils"):
        for path in sorted((REPO / package).glob("*.py")):
            if "\ndef cli(" in path.read_text():
                continue
            found = [f for f in namespace_parameters(path) if not f.split("(")[0].endswith("_from_args")]
            if found:
                offenders[path.relative_to(REPO).as_posix()] = found
    assert offenders == {}


def test_the_namespace_rule_sees_annotated_and_bare_args(tmp_path):
    (tmp_path / "m.py").write_text("import argparse\nfrom argparse import Namespace\n\n"
                                   "def a(x: argparse.Namespace): ...\ndef b(*, y: 'Namespace | None'): ...\n"
                                   "def c(args): ...\ndef d(*args): ...\ndef e(args: dict): ...\n")
    assert namespace_parameters(tmp_path / "m.py") == ["a(x)", "b(y)", "c(args)"]


def test_cluster_entry_point_runs_as_a_script_without_torch():
    """`python utils/cluster.py --help` as documented, in a fresh interpreter that never imports torch."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "utils/cluster.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--input_file" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "distill.cluster" in imported and "torch" not in imported


def test_single_copies_of_shared_constants():
    sources = {p.relative_to(REPO).as_posix(): p.read_text() for p in REPO.rglob("*.py")
               if ".venv" not in p.parts and "tests" not in p.parts}
    assert [n for n, text in sources.items() if "0.485" in text] == ["utils/images.py"]  # ImageNet mean/std
    assert [n for n, text in sources.items() if '"name": "object"' in text] == ["utils/coco_io.py"]
    assert OBJECT_CATEGORY == {"id": 1, "name": "object", "supercategory": "object"}
    for gone in ("detectron2_train/synthetic.py", "utils/coco_perturb.py", "utils/crop_features.py"):
        assert gone not in sources  # test fixtures live in tests/helpers/, clustering in distill/


def test_class_agnostic_outputs_share_the_object_category(tmp_path):
    from detectron2_train.data import categories_of
    from distill.data import class_agnostic

    assert class_agnostic({"annotations": [{"category_id": 7}], "images": []})["categories"] == [OBJECT_CATEGORY]
    assert categories_of({"categories": []}, class_agnostic=True) == [{"id": 1, "name": "object"}]


def _preds(*scores):
    mask = np.ones((4, 4), dtype=np.uint8)
    return [make_annotation(mask, 1, 1, s) for s in scores]


def test_confident_else_best_is_one_rule_for_self_training_and_painting():
    from detectron2_train.pseudo_labels import filter_predictions
    from segmentation.painting import paint_semantic

    preds = _preds(0.5, 0.7, 0.9)
    kept, rest = confident_else_best(preds, 0.7)
    assert [p["score"] for p in kept] == [0.7, 0.9] and [p["score"] for p in rest] == [0.5]  # 0.7 >= 0.7 is kept
    low = _preds(0.2, 0.6, 0.6)
    kept, rest = confident_else_best(low, 0.7)  # none passes: the first of the best
    assert len(kept) == 1 and kept[0] is low[1] and rest == [low[0], low[2]]
    assert confident_else_best([], 0.7) == ([], [])
    # Both stages apply it: a prediction scoring exactly the threshold is confident in each.
    assert [p["score"] for p in filter_predictions(preds, 0.7)] == [0.9, 0.7]
    boundary = [dict(preds[1], category_id=3), dict(preds[0], category_id=5, segmentation=preds[0]["segmentation"])]
    label = paint_semantic(boundary, 4, 4, threshold=0.7, ignore_uncertain=True)
    assert (label == 3).all()  # the 0.7 prediction is painted; the 0.5 one only marks pixels it alone covers


def test_one_tiny_resnet_for_both_trainers():
    from detectron2_train.engine import DEFAULTS
    from detectron2_train.modeling import build_backbone, norm_layer_factory
    from segmentation.model import build_deeplab

    rcnn = build_backbone({**DEFAULTS["model"], "backbone": "tiny", "norm": "gn", "trainable_layers": 5}).body
    reference = TinyResNet(DEFAULTS["model"]["tiny_widths"], norm_layer_factory("gn"))
    assert {k: v.shape for k, v in rcnn.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    deeplab = build_deeplab(3, "tiny", 8, head_channels=8).backbone
    assert {k: v.shape for k, v in deeplab.state_dict().items()} == {k: v.shape for k, v in TinyResNet().state_dict().items()}
    assert deeplab.layer4[0].conv1.stride == (1, 1)  # output stride 8 without dilation


@pytest.mark.parametrize("wrap", ["bare", "ddp", "dino_teacher", "moco_v2", "moco_v3", "torchvision_detection"])
def test_one_key_cleaner_for_every_checkpoint_layout(tmp_path, wrap):
    source = TinyResNet()
    plain = {**source.state_dict(), "fc.weight": torch.zeros(10, 128), "fc.bias": torch.zeros(10)}
    layouts = {
        "bare": plain,
        "ddp": {f"module.{k}": v for k, v in plain.items()},
        "dino_teacher": {"teacher": {f"module.backbone.{k}": v for k, v in plain.items()}, "epoch": 3,
                         "student": {"x": torch.zeros(1)}},
        "moco_v2": {"state_dict": {f"module.encoder_q.{k}": v for k, v in plain.items()}, "arch": "resnet18"},
        "moco_v3": {"state_dict": {f"module.base_encoder.{k}": v for k, v in plain.items()}},
        "torchvision_detection": {"model": {f"backbone.body.{k}": v for k, v in plain.items()}},
    }
    cleaned = unwrap_state_dict(layouts[wrap])
    assert set(cleaned) == {k for k in plain if not k.startswith("fc.")}
    torch.save(layouts[wrap], tmp_path / "w.pth")
    target = TinyResNet()
    load_resnet_weights(target, "tiny", str(tmp_path / "w.pth"))
    assert torch.equal(target.layer3[0].conv2.weight, source.layer3[0].conv2.weight)


def test_a_mismatch_is_described_in_one_whole_line():
    model = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    given = {"a": torch.zeros(3, 3), "b": torch.zeros(4), "d": torch.zeros(1)}
    assert state_dict_mismatch(model, given) == ("1 missing key(s), e.g. c; 1 unexpected key(s), e.g. d; "
                                                 "1 shape mismatch(es), e.g. a is (3, 3) in the checkpoint but (2, 3) "
                                                 "in the model")
    assert state_dict_mismatch(model, dict(model)) is None
