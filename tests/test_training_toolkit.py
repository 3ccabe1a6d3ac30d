"""The shared training toolkit: sampler, worker errors, metrics trimming, fingerprints, progress, rounds."""
from __future__ import annotations

import gc
import io
import itertools
import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from utils.distributed import DistInfo
from utils.errors import UserError
from utils.fingerprint import check_fingerprint, difference, fingerprint
from utils.progress import Progress
from utils.rounds import RoundSpec, run_rounds
from utils.samplers import ResumableBatchSampler, worker_batches
from utils.training import LoopSettings, iteration_seed, trim_metrics


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_shards_ranks_and_resumes_exactly():
    # Unshuffled, 5 samples, batches of 2 per rank, 2 ranks: rank r takes global positions r, r + 2, ...
    assert _take(ResumableBatchSampler(5, 2, rank=0, world_size=2, shuffle=False), 3) == [
        [(0, 0), (2, 2)], [(4, 4), (1, 6)], [(3, 8), (0, 10)]]
    assert _take(ResumableBatchSampler(5, 2, rank=1, world_size=2, shuffle=False), 3) == [
        [(1, 1), (3, 3)], [(0, 5), (2, 7)], [(4, 9), (1, 11)]]
    # Shuffled: a resumed sampler continues the stream; every epoch is a permutation of the dataset.
    stream = _take(ResumableBatchSampler(5, 2, seed=3, rank=1, world_size=2), 6)
    assert _take(ResumableBatchSampler(5, 2, seed=3, rank=1, world_size=2, start_iter=2), 4) == stream[2:]
    single = [i for batch in _take(ResumableBatchSampler(5, 1, seed=3), 10) for i, _ in batch]
    assert sorted(single[:5]) == sorted(single[5:]) == [0, 1, 2, 3, 4] and single[:5] != single[5:]
    with pytest.raises(UserError, match="the training set is empty"):
        ResumableBatchSampler(0, 2)


class _BadImage(Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        if index == 1:
            raise UserError("cannot read image broken.png: truncated")
        return torch.zeros(1)


def test_worker_error_comes_back_as_its_own_line(monkeypatch):
    # After a worker error, torch waits this long for the worker when the loader goes (5 s by default).
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    loader = DataLoader(_BadImage(), batch_size=1, num_workers=1)
    batches = worker_batches(loader)
    assert torch.equal(next(batches), torch.zeros(1, 1))
    with pytest.raises(UserError) as caught:
        next(batches)
    assert str(caught.value) == "cannot read image broken.png: truncated"
    del batches, caught
    gc.collect()  # the loader goes now, while the short wait is patched in


def test_trim_metrics_keeps_the_checkpoint_past_and_drops_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "total_loss": 2.0}\n{"iteration": 2, "total_lo\n'
                    '{"iteration": 2, "mIoU": 0.5}\n{"iteration": 3, "total_loss": 1.0}\n{"iteration": 4, "tot')
    trim_metrics(path, 2)
    assert path.read_text() == '{"iteration": 1, "total_loss": 2.0}\n{"iteration": 2, "mIoU": 0.5}\n'
    trim_metrics(tmp_path / "absent.jsonl", 2)  # nothing to trim: no file is made
    assert not (tmp_path / "absent.jsonl").exists()


def test_fingerprint_names_the_first_difference(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    config = {"output_dir": "a", "solver": {"base_lr": 0.1, "steps": (3, 4)}, "model": {"weights": str(weights)}}
    recorded = fingerprint("trainer", config, ignore=("output_dir",))
    assert recorded["settings"] == {"solver.base_lr": 0.1, "solver.steps": [3, 4]}
    assert list(recorded["files"]) == ["model.weights"]
    assert difference(recorded, fingerprint("trainer", {**config, "output_dir": "b"}, ("output_dir",))) is None
    changed = {**config, "solver": {"base_lr": 0.2, "steps": [3, 4]}}
    assert difference(recorded, fingerprint("trainer", changed, ("output_dir",))) == \
        "it was made with solver.base_lr=0.1, not 0.2"
    weights.write_bytes(b"two")  # same path, other content
    now = fingerprint("trainer", config, ("output_dir",))
    old_sha, new_sha = recorded["files"]["model.weights"]["sha256"], now["files"]["model.weights"]["sha256"]
    assert difference(recorded, now) == (f"it was made with model.weights={weights} (sha256 {old_sha[:12]}), "
                                         f"not {weights} (sha256 {new_sha[:12]})")
    assert difference(recorded, fingerprint("other", config, ("output_dir",))) == "it was made by trainer, not other"
    # Inputs outside the settings (--weights): a resume may leave them out, not change them.
    (tmp_path / "init.pth").write_bytes(b"init")
    (tmp_path / "other.pth").write_bytes(b"other")
    started = fingerprint("trainer", {"a": 1}, files={"init_weights": tmp_path / "init.pth"})
    assert difference(started, fingerprint("trainer", {"a": 1}, files={"init_weights": None})) is None
    assert difference(started, fingerprint("trainer", {"a": 1}, files={"init_weights": tmp_path / "other.pth"})) \
        .startswith(f"it was made with init_weights={tmp_path / 'init.pth'} (sha256 ")
    with pytest.raises(UserError, match=r"^cannot resume from ckpt\.pth: it records no settings to compare "
                                        r"\(another tool or an older version made it\); use another output folder"):
        check_fingerprint(None, now, "ckpt.pth")


def test_progress_prints_lines_when_stderr_is_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    with Progress(total=3, desc="train", unit="it", interval=1e-9, stream=stream) as bar:
        bar.update(1)
        bar.set_postfix(loss="0.5")
        bar.update(2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("train: 1/3 it (33%), ") and ", eta " in lines[0]
    assert lines[1].startswith("train: 3/3 it (100%), ") and lines[1].endswith(", loss=0.5")
    assert lines[2].startswith("train: 3/3 it (100%), ") and ", done in 0s, loss=0.5" in lines[2]
    quiet = io.StringIO()
    assert list(Progress(range(3), enabled=False, interval=1e-9, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""
    monkeypatch.setenv("MASKDISTILL_PROGRESS_SECONDS", "0")  # 0 turns the lines off
    off = io.StringIO()
    assert list(Progress(range(2), stream=off)) == [0, 1] and off.getvalue() == ""
    monkeypatch.setenv("MASKDISTILL_PROGRESS_SECONDS", "soon")
    with pytest.raises(UserError, match="MASKDISTILL_PROGRESS_SECONDS must be a number of seconds, got 'soon'"):
        Progress(total=1, stream=io.StringIO())


def test_loop_settings_and_iteration_seeds():
    loop = LoopSettings.from_solver({"max_iter": 5, "base_lr": 0.1, "log_period": 2}, final_name="probe.pth")
    assert (loop.max_iter, loop.log_period, loop.final_name, loop.checkpoint_period) == (5, 2, "probe.pth", 0)
    with pytest.raises(UserError, match="solver.checkpoint_period must be an integer >= 0, not -1"):
        LoopSettings(max_iter=5, checkpoint_period=-1)
    seeds = {iteration_seed(0, rank, it) for rank in range(2) for it in range(50)}
    assert len(seeds) == 100 and iteration_seed(0, 1, 7) == iteration_seed(0, 1, 7)


def _rounds(tmp_path, thresholds, calls, overwrite=False):
    specs = [RoundSpec(n, fingerprint("toy_rounds", {"thresh": t})) for n, t in enumerate(thresholds, start=1)]

    def run_round(round):
        calls.append(round.number)
        previous = round.previous.result["value"] if round.previous else 0
        (round.directory / "work.txt").write_text("partial")
        return {"value": previous + 10 * round.number}

    return run_rounds(tmp_path / "rounds", specs, run_round, DistInfo(), overwrite)


def test_rounds_skip_finished_refuse_changed_and_rerun_what_follows(tmp_path):
    calls: list[int] = []
    done = _rounds(tmp_path, [0.5, 0.7], calls)
    assert calls == [1, 2] and [r.result for r in done] == [{"value": 10}, {"value": 30}]
    marker = json.loads((tmp_path / "rounds" / "round2" / "round.json").read_text())
    assert marker["done"] and marker["result"] == {"value": 30}
    assert json.loads((tmp_path / "rounds" / "rounds.json").read_text()) == [
        {"round": 1, "directory": str(tmp_path / "rounds" / "round1"), "value": 10},
        {"round": 2, "directory": str(tmp_path / "rounds" / "round2"), "value": 30}]
    # A rerun, and one more round: only the new round runs, on the recorded result of round 2.
    calls.clear()
    assert [r.result["value"] for r in _rounds(tmp_path, [0.5, 0.7, 0.9], calls)] == [10, 30, 60]
    assert calls == [3]
    # Another threshold for round 2 is refused; --overwrite reruns round 2 and the round after it.
    with pytest.raises(UserError, match=r"round 2 in .*round2: it was made with thresh=0.7, not 0.8; use the same "
                                        r"settings, or --overwrite to run it again"):
        _rounds(tmp_path, [0.5, 0.8, 0.9], calls)
    calls.clear()
    _rounds(tmp_path, [0.5, 0.8, 0.9], calls, overwrite=True)
    assert calls == [2, 3]
    # An unfinished round runs again in its folder (what it wrote is still there for it to resume).
    marker_path = tmp_path / "rounds" / "round3" / "round.json"
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "done": False}))
    calls.clear()
    _rounds(tmp_path, [0.5, 0.8, 0.9], calls)
    assert calls == [3] and (tmp_path / "rounds" / "round3" / "work.txt").exists()


def test_rounds_are_checked_before_any_round_runs(tmp_path):
    """Round 1 unfinished and round 2 changed: the refusal comes first, round 1 is not resumed meanwhile."""
    calls: list[int] = []
    _rounds(tmp_path, [0.5, 0.7], calls)
    marker_path = tmp_path / "rounds" / "round1" / "round.json"
    marker_path.write_text(json.dumps({**json.loads(marker_path.read_text()), "done": False}))
    calls.clear()
    with pytest.raises(UserError, match=r"round 2 in .*round2: it was made with thresh=0.7, not 0.8"):
        _rounds(tmp_path, [0.5, 0.8], calls)
    assert calls == [] and (tmp_path / "rounds" / "round2" / "round.json").exists()


def test_resume_refuses_weights_rewritten_at_the_same_path(tmp_path):
    """A trainer's --resume: initial weights named by the config count by their content, not their path."""
    from torch import nn

    from utils.training import HARMLESS_KEYS, TrainingRun

    weights = tmp_path / "init.pth"
    weights.write_bytes(b"initial weights, first version")
    config = {"output_dir": str(tmp_path / "run"), "model": {"weights": str(weights)}, "solver": {"max_iter": 2}}

    def training_run() -> TrainingRun:
        torch.manual_seed(0)
        model = nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return TrainingRun(config["output_dir"], model, optimizer, None, LoopSettings(max_iter=2), DistInfo(),
                           config=config, fingerprint=fingerprint("toy_trainer", config, HARMLESS_KEYS))

    run = training_run()
    run.prepare(resume=False, overwrite=False)
    run.train(lambda model, batch: {"loss": model(batch).pow(2).mean()}, itertools.repeat(torch.ones(4, 2)))
    assert training_run().prepare(resume=True, overwrite=False) == 2  # same weights: resumes (finished)
    weights.write_bytes(b"initial weights, retrained")  # same path, other content
    with pytest.raises(UserError, match=rf"^cannot resume from .*model_final\.pth: it was made with model\.weights="
                                        rf"{weights} \(sha256 [0-9a-f]{{12}}\), not {weights} \(sha256 "):
        training_run().prepare(resume=True, overwrite=False)
