"""utils/config.py: the schema (keys, types, ranges, choices), `_base_` chains and `--set`, and its errors
through every config-taking command line, run in this process."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from detectron2_train import train_net
from segmentation import eval_cluster, linear_finetune, train, train_plus_crf
from tests.cli_helpers import error_line, run_main
from utils.cli import float_range, int_range
from utils.config import ConfigSchema, apply_flags, load_config, load_yaml, parse_override
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]

DEFAULTS = {"output_dir": "out", "data": {"train_json": None, "num_workers": 2, "class_names": None},
            "solver": {"base_lr": 0.02, "max_iter": 100, "steps": [60, 80], "amp": True, "scales": [0.5, 2.0]},
            "model": {"norm": "bn"}}
SCHEMA = ConfigSchema(DEFAULTS, types={"data.train_json": str, "data.class_names": list[str]},
                      ranges={"data.num_workers": int_range(0), "solver.base_lr": float_range(0, min_inclusive=False),
                              "solver.max_iter": int_range(1), "solver.steps": int_range(1), "model.norm": ("bn", "gn")})


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- the schema itself


def test_layers_merge_in_order_and_values_are_normalised(tmp_path):
    write(tmp_path / "base.yaml", {"solver": {"base_lr": 1, "steps": [10, 20]}, "data": {"num_workers": 0}})
    write(tmp_path / "extra.yaml", {"solver": {"max_iter": 7}, "model": {"norm": "gn"}})
    write(tmp_path / "run.yaml", {"_base_": ["base.yaml", "extra.yaml"], "solver": {"max_iter": 9}})
    config = load_config(tmp_path / "run.yaml", ["solver.base_lr=1e-3", "data.train_json=/x.json",
                                                 "data.class_names=[a, b]", "solver.amp=false"], SCHEMA)
    assert config == {"output_dir": "out",
                      "data": {"train_json": "/x.json", "num_workers": 0, "class_names": ["a", "b"]},
                      "solver": {"base_lr": 0.001, "max_iter": 9, "steps": [10, 20], "amp": False, "scales": [0.5, 2.0]},
                      "model": {"norm": "gn"}}
    assert isinstance(load_config(tmp_path / "base.yaml", [], SCHEMA)["solver"]["base_lr"], float)  # 1 -> 1.0
    assert load_config(tmp_path / "run.yaml", ["data.train_json=null"], SCHEMA)["data"]["train_json"] is None


@pytest.mark.parametrize("layer,message", [
    ({"solver": {"max_iterr": 5}}, "unknown config key 'solver.max_iterr' (did you mean 'solver.max_iter'?)"),
    ({"solverr": {"max_iter": 5}}, "unknown config key 'solverr' (did you mean 'solver'?)"),
    ({"data": {"zzz": 1}}, "unknown config key 'data.zzz'; the keys of 'data' are: class_names, num_workers, train_json"),
    ({"solver": 5}, "solver is a section, not a value; set its keys, e.g. solver.amp=..."),
    ({"solver": {"max_iter": "abc"}}, "solver.max_iter must be an integer, got 'abc'"),
    ({"solver": {"max_iter": 2.5}}, "solver.max_iter must be an integer, got 2.5"),
    ({"solver": {"max_iter": True}}, "solver.max_iter must be an integer, got True"),
    ({"solver": {"max_iter": None}}, "solver.max_iter must be an integer, got None"),
    ({"solver": {"amp": "yes please"}}, "solver.amp must be true or false, got 'yes please'"),
    ({"solver": {"base_lr": "fast"}}, "solver.base_lr must be a number, got 'fast'"),
    ({"solver": {"base_lr": float("nan")}}, "solver.base_lr must be a number, got nan"),
    ({"solver": {"steps": [10, "x"]}}, "solver.steps must be a list of integers, got [10, 'x']"),
    ({"solver": {"steps": 10}}, "solver.steps must be a list of integers, got 10"),
    ({"data": {"train_json": 3}}, "data.train_json must be a string (or null), got 3"),
    ({"data": {"class_names": "cat"}}, "data.class_names must be a list of strings (or null), got 'cat'"),
    ({"solver": {"base_lr": 0}}, "solver.base_lr must be > 0, got 0.0"),
    ({"solver": {"base_lr": -0.1}}, "solver.base_lr must be > 0, got -0.1"),
    ({"solver": {"max_iter": 0}}, "solver.max_iter must be >= 1, got 0"),
    ({"data": {"num_workers": -1}}, "data.num_workers must be >= 0, got -1"),
    ({"solver": {"steps": [10, 0]}}, "solver.steps must be >= 1 (every element), got [10, 0]"),
    ({"model": {"norm": "frozen"}}, "model.norm must be one of bn, gn, got 'frozen'"),
])
def test_each_bad_value_is_one_error_naming_the_file_and_the_key(tmp_path, layer, message):
    path = write(tmp_path / "bad.yaml", layer)
    with pytest.raises(UserError) as info:
        load_config(path, [], SCHEMA)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize("override,message", [
    ("solver.max_iter", "--set 'solver.max_iter': an override must look like key.sub=value, e.g. solver.max_iter=1000"),
    ("=5", "--set '=5': an override must look like key.sub=value"),
    ("solver..max_iter=5", "--set 'solver..max_iter=5': an override must look like key.sub=value"),
    ("solver.max_iterr=5", "--set solver.max_iterr=5: unknown config key 'solver.max_iterr' (did you mean"),
    ("solver.max_iter=[1", "--set solver.max_iter=[1: solver.max_iter must be an integer, got '[1'"),
    ("solver.base_lr=-1", "--set solver.base_lr=-1: solver.base_lr must be > 0, got -1.0"),
])
def test_bad_overrides_are_one_error_naming_the_override(tmp_path, override, message):
    path = write(tmp_path / "ok.yaml", {"solver": {"max_iter": 5}})
    with pytest.raises(UserError) as info:
        load_config(path, [override], SCHEMA)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_file_errors_cycles_missing_bases_empty_and_invalid_files(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml", "solver": {"max_iter": 1}})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(UserError) as info:
        load_config(tmp_path / "a.yaml", [], SCHEMA)
    a, b = (tmp_path / "a.yaml").resolve(), (tmp_path / "b.yaml").resolve()
    assert str(info.value) == f"_base_ cycle: {a} -> {b} -> {a}"
    write(tmp_path / "self.yaml", {"_base_": "self.yaml"})
    with pytest.raises(UserError, match="_base_ cycle: .*self.yaml -> .*self.yaml$"):
        load_yaml(tmp_path / "self.yaml", SCHEMA)
    write(tmp_path / "orphan.yaml", {"_base_": "gone.yaml"})
    with pytest.raises(UserError) as info:
        load_config(tmp_path / "orphan.yaml", [], SCHEMA)
    assert str(info.value) == f"{tmp_path / 'orphan.yaml'}: _base_ file gone.yaml not found (looked for {tmp_path / 'gone.yaml'})"
    write(tmp_path / "list.yaml", {"_base_": [1]})
    with pytest.raises(UserError, match=r"list.yaml: _base_ must be a file name or a list of file names, got \[1\]"):
        load_config(tmp_path / "list.yaml", [], SCHEMA)
    for text in ("", "# only a comment\n", "{}\n"):
        write(tmp_path / "empty.yaml", text)
        with pytest.raises(UserError) as info:
            load_config(tmp_path / "empty.yaml", [], SCHEMA)
        assert str(info.value).startswith(f"config {tmp_path / 'empty.yaml'} is empty;")
    write(tmp_path / "list_top.yaml", "- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping of keys at the top level, not list"):
        load_config(tmp_path / "list_top.yaml", [], SCHEMA)
    write(tmp_path / "broken.yaml", "solver: {max_iter: 5\n")
    with pytest.raises(UserError) as info:
        load_config(tmp_path / "broken.yaml", [], SCHEMA)
    assert str(info.value).startswith(f"config {tmp_path / 'broken.yaml'} is not valid YAML: ") and "\n" not in str(info.value)
    with pytest.raises(UserError, match="config not found: .*nowhere.yaml"):
        load_config(tmp_path / "nowhere.yaml", [], SCHEMA)


def test_a_base_file_is_checked_and_named_too(tmp_path):
    write(tmp_path / "base.yaml", {"solver": {"base_lr": -1}})
    write(tmp_path / "run.yaml", {"_base_": "base.yaml", "solver": {"max_iter": 3}})
    with pytest.raises(UserError) as info:
        load_config(tmp_path / "run.yaml", [], SCHEMA)
    assert str(info.value) == f"{tmp_path / 'base.yaml'}: solver.base_lr must be > 0, got -1.0"


def test_schema_declarations_are_checked_when_written():
    with pytest.raises(ValueError, match="config default data.path is None: declare its type"):
        ConfigSchema({"data": {"path": None}})
    positive = float_range(0, min_inclusive=False)
    with pytest.raises(ValueError, match="schema ranges names 'solver.lr'"):
        ConfigSchema({"solver": {"base_lr": 0.1}}, ranges={"solver.lr": positive})
    with pytest.raises(UserError, match="the built-in defaults: solver.base_lr must be > 0"):
        ConfigSchema({"solver": {"base_lr": 0.0}}, ranges={"solver.base_lr": positive})
    lenient = ConfigSchema({"data": {"path": None}}, strict=False)  # a bare defaults dict: None keys take anything
    assert lenient.check({"data": {"path": 3}}, "x") == {"data": {"path": 3}}
    # the command-line flags' ranges (utils/cli.py) serve the schema: membership and the same wording
    assert 0.5 in float_range(0, 1) and 1 not in float_range(0, 1, max_inclusive=False) and 0 not in int_range(1)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2]) and parse_override("a=C:/w.pth") == ("a", "C:/w.pth")
    assert parse_override("data.val_list=") == ("data.val_list", None)


def test_probe_schema_extends_the_segmentation_schema():
    from segmentation.engine import SCHEMA as SEG
    from segmentation.probe import PROBE_SCHEMA

    assert set(PROBE_SCHEMA.keys) == set(SEG.keys) | {"pretrained"}
    assert PROBE_SCHEMA.defaults["solver"]["base_lr"] == 0.1 and SEG.defaults["solver"]["base_lr"] == 0.01
    with pytest.raises(UserError, match="x: solver.batch_size must be >= 1, got 0"):
        PROBE_SCHEMA.check({"solver": {"batch_size": 0}}, "x")


# ----------------------------------------------------------------------------- every config-taking command line


def _argv_train_net(config: Path, out: Path, overrides: list[str]) -> list[str]:
    return ["--config", str(config), "--output_dir", str(out), "--device", "cpu", "--train_json", str(out / "t.json"),
            "--train_root", str(out), "--set", *overrides]


def _argv_seg(config: Path, out: Path, overrides: list[str]) -> list[str]:
    return ["--config", str(config), "--output_dir", str(out), "--device", "cpu", "--set", *overrides]


def _argv_eval_cluster(config: Path, out: Path, overrides: list[str]) -> list[str]:
    return ["--config", str(config), "--model_path", str(out / "model_final.pth"), "--device", "cpu",
            "--set", *overrides]


def _argv_probe(config: Path, out: Path, overrides: list[str]) -> list[str]:
    env = write(out.parent / "configs" / "env.yml", {"root_dir": str(out)})  # never next to a repo config
    return ["--config_env", str(env), "--config_exp", str(config), "--device", "cpu", "--set", *overrides]


# name, main, argv builder, tiny config it starts from, the batch-size key
CLIS = [
    ("train_net", train_net.main, _argv_train_net, REPO / "configs/detectron2/tiny_test.yaml", "ims_per_batch"),
    ("train", train.main, _argv_seg, REPO / "configs/segmentation/tiny_test.yml", "batch_size"),
    ("train_plus_crf", train_plus_crf.main, _argv_seg, REPO / "configs/segmentation/tiny_test.yml", "batch_size"),
    ("linear_finetune", linear_finetune.main, _argv_probe, REPO / "configs/segmentation/tiny_linear_voc.yml",
     "batch_size"),
    ("eval_cluster", eval_cluster.main, _argv_eval_cluster, REPO / "configs/segmentation/tiny_test.yml", "batch_size"),
]

# case, YAML written over the CLI's tiny config (None: the tiny config itself), --set overrides, expected error
CASES = [
    ("unknown key", {"solver": {"max_iterr": 5}}, [], "{file}: unknown config key 'solver.max_iterr' (did you mean "
                                                     "'solver.max_iter'?)"),
    ("unknown --set key", None, ["solver.max_iterr=5"], "--set solver.max_iterr=5: unknown config key 'solver.max_iterr'"),
    ("wrong type", {"solver": {"max_iter": "many"}}, [], "{file}: solver.max_iter must be an integer, got 'many'"),
    ("wrong --set type", None, ["solver.amp=sometimes"], "--set solver.amp=sometimes: solver.amp must be true or false"),
    ("bad --set syntax", None, ["solver.max_iter"], "--set 'solver.max_iter': an override must look like key.sub=value"),
    ("cycle", "cycle", [], "_base_ cycle: "),
    ("missing base", {"_base_": "nowhere.yaml"}, [], "{file}: _base_ file nowhere.yaml not found"),
    ("empty file", "", [], "config {file} is empty;"),
    ("batch 0", {"solver": {"BATCH": 0}}, [], "{file}: solver.BATCH must be >= 1, got 0"),
    ("negative lr", None, ["solver.base_lr=-0.01"], "--set solver.base_lr=-0.01: solver.base_lr must be > 0, got -0.01"),
    ("checkpoint_period -1", {"solver": {"checkpoint_period": -1}}, [], "{file}: solver.checkpoint_period must be >= "),
    ("max_iter 0", None, ["solver.max_iter=0"], "--set solver.max_iter=0: solver.max_iter must be >= 1, got 0"),
    ("max_iter negative", {"solver": {"max_iter": -5}}, [], "{file}: solver.max_iter must be >= 1, got -5"),
    ("workers -1", None, ["data.num_workers=-1"], "--set data.num_workers=-1: data.num_workers must be >= 0, got -1"),
]


@pytest.mark.parametrize("case,layer,overrides,expected", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name,main,argv_of,tiny,batch_key", CLIS, ids=[c[0] for c in CLIS])
def test_config_errors_through_every_cli(tmp_path, name, main, argv_of, tiny, batch_key, case, layer,
                                         overrides, expected):
    """Exit 2, one `error:` line naming the file (or the --set) and the key, and no file created."""
    configs = tmp_path / "configs"
    configs.mkdir()
    config = configs / ("run.yml" if tiny.suffix == ".yml" else "run.yaml")
    if layer is None:
        config = tiny
    elif layer == "cycle":
        write(configs / "other.yaml", {"_base_": config.name})
        write(config, {"_base_": [str(tiny), "other.yaml"]})
    elif isinstance(layer, str):
        write(config, layer)
    else:
        layer = yaml.safe_load(yaml.safe_dump(layer).replace("BATCH", batch_key))
        write(config, {"_base_": str(tiny), **layer} if "_base_" not in layer else layer)
    expected = expected.replace("{file}", str(config)).replace("BATCH", batch_key)
    out = tmp_path / "out"
    code, _, stderr = run_main(main, argv_of(config, out, overrides))
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert error_line(stderr).startswith(f"error: {expected}"), stderr
    assert not out.exists()
    assert sorted(tmp_path.rglob("*")) == sorted([configs, *configs.rglob("*")])


def test_mask_rcnn_checkpoint_period_zero_is_refused(tmp_path):
    """Mask R-CNN saves every checkpoint_period iterations (0 divided by zero); DeepLab's 0 means final only."""
    argv = ["--config", str(REPO / "configs/detectron2/tiny_test.yaml"), "--output_dir", str(tmp_path / "out"),
            "--set", "solver.checkpoint_period=0"]
    code, _, stderr = run_main(train_net.main, argv)
    assert code == 2 and not (tmp_path / "out").exists()
    assert stderr.strip() == "error: --set solver.checkpoint_period=0: solver.checkpoint_period must be >= 1, got 0"


def test_the_flags_of_train_net_are_checked_like_the_config(tmp_path):
    """Flags that set config keys go through the schema too (the parser refuses --num_workers -1 first, with the
    same range: tests/test_cli_errors.py)."""
    from detectron2_train.engine import SCHEMA as RCNN

    with pytest.raises(UserError) as info:
        apply_flags(RCNN.defaults, {"data.num_workers": -1, "data.train_json": None}, RCNN)
    assert str(info.value) == "the flag for data.num_workers: data.num_workers must be >= 0, got -1"


@pytest.mark.parametrize("name,main,argv_of,tiny,batch_key", CLIS[1:], ids=[c[0] for c in CLIS[1:]])
def test_segmentation_crop_size_zero_is_refused(tmp_path, name, main, argv_of, tiny, batch_key):
    (tmp_path / "configs").mkdir()
    code, _, stderr = run_main(main, argv_of(tiny, tmp_path / "out", ["data.crop_size=0"]))
    assert code == 2 and not (tmp_path / "out").exists()
    assert stderr.strip() == "error: --set data.crop_size=0: data.crop_size must be >= 1, got 0"
