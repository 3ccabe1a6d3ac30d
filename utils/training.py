"""The one training loop: seeding, the output folder, exact resume, steps, metrics.jsonl, checkpoints.

A trainer keeps its model, data and loss and hands the rest to this module, in the style of
torchvision's references/detection (train.py over engine.py). A trainer reads top to bottom:

    loop = LoopSettings.from_solver(cfg["solver"])            # max_iter, seed, periods, AMP, clipping
    seed_all(loop.seed)                                       # the same initial weights on every rank
    model = build_model(cfg).to(info.device)
    optimizer = torch.optim.SGD(...)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, ...)
    run = TrainingRun(cfg["output_dir"], model, optimizer, scheduler, loop, info, config=cfg,
                      fingerprint=fingerprint("my_trainer", cfg, HARMLESS_KEYS + ("model.test_*",)),
                      extra={"categories": categories})     # kept in every checkpoint
    run.prepare(resume=resume, overwrite=overwrite)           # refuse mixing runs; restore; config.yaml
    loader = resumable_loader(dataset, batch, loop.seed, info.rank, info.world_size, run.start_iter, workers)
    model.train()

    def step(model, batch) -> dict[str, torch.Tensor]:        # forward only: the named losses
        images, targets = batch
        return model([i.to(info.device) for i in images], targets)

    final_checkpoint = run.train(step, loader, evaluate=None)

`run.train` does, for every iteration:
  1. reseed python, numpy and torch from (seed, rank, iteration) (`iteration_seed`);
  2. take the next batch (a worker's UserError comes back as its one line, `utils.samplers.worker_batches`);
  3. call `step(model, batch)` under autocast (AMP in `loop.amp_dtype` on CUDA when `loop.amp`); the
     model passed in is the DistributedDataParallel wrapper under torchrun;
  4. sum the losses; a non-finite sum stops with a UserError naming the iteration and the losses;
  5. backward through the GradScaler, clip the gradient norm (`loop.clip_grad_norm` > 0), step the
     optimizer, then the scheduler (once per iteration);
  6. log {"iteration", "total_loss", <each loss>, "lr", "data_time", "time"[, "max_mem_mb"]} to
     OUTPUT/metrics.jsonl at iteration 1, every `log_period` and at the end (losses averaged over ranks);
  7. every `eval_period` (and at the end), call `evaluate()` when given: the dict it returns is logged
     with the iteration and kept as `run.evaluation`;
  8. save `model_XXXXXXX.pth` every `checkpoint_period` (the newest `keep_checkpoints` kept) and
     `loop.final_name` at the end; only rank 0 writes, atomically.
A progress bar (utils/progress.py) shows the count and the last loss.

Exact resume: checkpoints hold model, optimizer, scheduler, GradScaler, RNG states, the iteration and the
settings fingerprint (utils/fingerprint.py). The batches depend on (seed, sample position) only
(utils/samplers.py) and every iteration reseeds from (seed, rank, iteration), so a resumed run ends with the
weights of an uninterrupted one on every rank, although a checkpoint holds rank 0's RNG states only.
`prepare` locks the output folder for the run (utils/lock.py: a second trainer writing there is refused;
`train` releases it), refuses a folder holding checkpoints unless resuming or overwriting, refuses to resume from a
checkpoint made with other settings, weights or data (one line naming the first difference), and cuts
metrics.jsonl back to the checkpoint's iteration (a line torn by a kill is dropped).

Plugging in a new trainer: write its `step` (and `evaluate`, if it validates while training); give its
fingerprint a kind of its own and the config keys that cannot change the weights (`HARMLESS_KEYS` plus its
own), and name in `files=` the inputs that are not config values (initial weights); put in `extra` what
inference needs later. Options such as loss weights or a loss that drops terms live in the step; the solver
keys the loop reads are the fields of `LoopSettings`. The loop never switches train/eval modes (the linear
probe trains a head on a frozen model kept in eval mode): call `model.train()` before `run.train`. Training
in stages is one `TrainingRun` per stage, each in its own folder (utils/rounds.py runs such sequences
resumably); a stage that starts from the previous stage's weights loads them before `prepare` and names
them in `files=`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from utils.checkpoint import (latest_checkpoint, periodic_checkpoints, prune_checkpoints, read_torch_file,
                              restore_checkpoint, save_checkpoint)
from utils.coco_io import write_text
from utils.config import save_config
from utils.distributed import DistInfo, barrier
from utils.errors import UserError
from utils.fingerprint import check_fingerprint
from utils.lock import FolderLock
from utils.progress import Progress
from utils.samplers import worker_batches

METRICS_FILE = "metrics.jsonl"
# Config keys that never change the trained weights: a resume may change them.
HARMLESS_KEYS = ("output_dir", "device", "data.num_workers", "solver.log_period", "solver.checkpoint_period",
                 "solver.keep_checkpoints", "solver.eval_period")

Step = Callable[[nn.Module, Any], "dict[str, torch.Tensor]"]


def seed_all(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators: the CPU one, and this process's GPU once
    CUDA is in use (models are built on the CPU, so their initial weights follow the CPU generator)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # Not torch.manual_seed: until CUDA starts (always, on a CPU machine) it records a stack trace for a
    # deferred GPU seeding at every call, about 1 ms: too slow for every iteration.
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed(seed)


def iteration_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed of the global generators for one iteration of one process.

    Every random draw of an iteration (dropout, multi-scale sizes, RPN/RoI sampling) then depends on
    (seed, rank, iteration) only, so a resumed run repeats them on every rank.
    """
    digest = hashlib.blake2b(f"{seed}:{rank}:{iteration}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")  # 32 bits, as numpy's global seed must be


def split_batch(total: int, world_size: int, key: str) -> int:
    """The per-process share of a total batch size, or a UserError naming the config key."""
    if int(total) <= 0 or int(total) % world_size:
        raise UserError(f"{key} ({total}) must be a positive multiple of the number of processes ({world_size})")
    return int(total) // world_size


def trim_metrics(path: str | os.PathLike, iteration: int) -> None:
    """Keep the records of iterations <= `iteration`; drop lines that are not JSON (torn by a kill)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("iteration", 0)) <= iteration:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def append_metrics(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@dataclass
class LoopSettings:
    """What the loop reads from a config's `solver` section (`from_solver`); the trainer fixes the rest."""
    max_iter: int
    seed: int = 0
    log_period: int = 20
    checkpoint_period: int = 0    # 0: the final checkpoint only
    keep_checkpoints: int = 0     # periodic checkpoints kept; 0: all
    eval_period: int = 0          # 0: evaluate at the end only (when the trainer gives `evaluate`)
    clip_grad_norm: float = 0.0   # 0: no clipping
    amp: bool = False             # mixed precision, CUDA only
    amp_dtype: str = "float16"    # float16 (with a GradScaler) or bfloat16
    final_name: str = "model_final.pth"
    desc: str = "train"
    nonfinite_hint: str = "lower solver.base_lr"

    def __post_init__(self) -> None:
        for name in ("max_iter", "log_period", "checkpoint_period", "keep_checkpoints", "eval_period"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "max_iter" else 0):
                raise UserError(f"solver.{name} must be an integer >= {1 if name == 'max_iter' else 0}, "
                                f"not {value!r}")
        if self.amp_dtype not in ("float16", "bfloat16"):
            raise UserError(f"solver.amp_dtype must be float16 or bfloat16, not {self.amp_dtype!r}")

    @classmethod
    def from_solver(cls, solver: dict, **fixed: Any) -> "LoopSettings":
        """The fields found in `solver`, then `fixed` (e.g. final_name, desc, nonfinite_hint)."""
        values = {f.name: solver[f.name] for f in fields(cls) if f.name in solver}
        return cls(**{**values, **fixed})


class TrainingRun:
    """One training job in one output folder; see the module docstring for the order of calls."""

    def __init__(self, output_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, loop: LoopSettings, info: DistInfo, config: dict, fingerprint: dict,
                 extra: dict | None = None):
        self.output_dir = Path(output_dir)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loop, self.info, self.config = loop, info, config
        self.fingerprint = fingerprint
        self.extra = dict(extra or {})
        self.use_amp = bool(loop.amp) and info.device.type == "cuda"
        self.amp_dtype = getattr(torch, loop.amp_dtype)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and loop.amp_dtype == "float16")
        self.start_iter = 0
        self.resumed_from: Path | None = None
        self.evaluation: dict | None = None
        self.lock: FolderLock | None = None

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    @property
    def final_path(self) -> Path:
        return self.output_dir / self.loop.final_name

    def checkpoint_files(self) -> list[Path]:
        final = [self.final_path] if self.final_path.is_file() else []
        return periodic_checkpoints(self.output_dir) + final

    def prepare(self, resume: bool, overwrite: bool) -> int:
        """Refuse to mix runs, clear the folder (`overwrite`), restore the newest checkpoint (`resume`).

        Then (rank 0) save config.yaml and cut metrics.jsonl back to the starting iteration.
        Returns the starting iteration (also `self.start_iter`).
        """
        if self.info.is_main:  # one writer per folder, until `train` ends: a second trainer here is refused
            self.lock = FolderLock(self.output_dir, "--output_dir").acquire()
        try:
            return self._prepare(resume, overwrite)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let another run write into the output folder (`train` does it when it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _prepare(self, resume: bool, overwrite: bool) -> int:
        old = self.checkpoint_files()
        if old and not (resume or overwrite):
            raise UserError(f"{self.output_dir} already holds checkpoints ({old[-1].name}); pass --resume to "
                            f"continue that run or --overwrite to start again")
        barrier()  # every rank has looked before rank 0 deletes
        if overwrite and self.info.is_main:
            for path in old + [self.metrics_path]:
                path.unlink(missing_ok=True)
        barrier()
        checkpoint = self.checkpoint_to_resume() if resume else None
        if checkpoint is not None:
            self._restore(checkpoint)
        if self.info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.output_dir / "config.yaml")
            trim_metrics(self.metrics_path, self.start_iter)
            if checkpoint is not None:
                print(f"resuming from {checkpoint} at iteration {self.start_iter}")
        barrier()
        return self.start_iter

    def checkpoint_to_resume(self) -> Path | None:
        return self.final_path if self.final_path.is_file() else latest_checkpoint(self.output_dir)

    def _restore(self, path: Path) -> None:
        state = read_torch_file(path, "checkpoint")
        check_fingerprint(state.get("fingerprint"), self.fingerprint, str(path))
        try:
            restore_checkpoint(state, self.model, self.optimizer, self.scheduler, self.scaler)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"cannot resume from {path}: it does not fit the configured model "
                            f"({str(exc).strip().splitlines()[0]}); pass --overwrite to start again") from None
        self.start_iter = int(state["iteration"])
        self.resumed_from = path
        self.evaluation = (state.get("extra") or {}).get("evaluation")

    def save(self, path: Path, iteration: int) -> None:
        if self.info.is_main:
            save_checkpoint(path, self.model, self.optimizer, self.scheduler, iteration, self.config,
                            extra={**self.extra, "evaluation": self.evaluation}, scaler=self.scaler,
                            fingerprint=self.fingerprint)
        barrier()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the steps (CUDA with `loop.amp` only)."""
        if not self.use_amp:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def wrapped_model(self) -> nn.Module:
        """The model to call in steps: DistributedDataParallel under torchrun, else the model itself."""
        if not self.info.distributed:
            return self.model
        device = self.info.device
        return nn.parallel.DistributedDataParallel(self.model,
                                                   device_ids=[device.index] if device.type == "cuda" else None)

    def train(self, step: Step, loader: Iterable, evaluate: Callable[[], dict] | None = None) -> Path:
        """Run iterations start_iter .. max_iter - 1 (see the module docstring); returns the final checkpoint."""
        try:
            return self._train(step, loader, evaluate)
        finally:
            self.release()

    def _train(self, step: Step, loader: Iterable, evaluate: Callable[[], dict] | None) -> Path:
        loop, info = self.loop, self.info
        if self.start_iter >= loop.max_iter:
            if info.is_main:
                print(f"training already finished ({self.resumed_from}); nothing to resume")
            return self.final_path
        model = self.wrapped_model()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        batches = worker_batches(loader)
        bar = Progress(total=loop.max_iter, initial=self.start_iter, desc=loop.desc, unit="it", enabled=info.is_main)
        tick = time.perf_counter()
        for iteration in range(self.start_iter, loop.max_iter):
            seed_all(iteration_seed(loop.seed, info.rank, iteration))
            batch = next(batches)
            data_time = time.perf_counter() - tick
            with self.autocast():
                losses = step(model, batch)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                values = {k: round(float(v), 4) for k, v in losses.items()}
                raise UserError(f"loss became {float(loss)} at iteration {iteration + 1} ({values}); "
                                f"{loop.nonfinite_hint}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if loop.clip_grad_norm:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, loop.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]
            if self.scheduler is not None:
                self.scheduler.step()
            done = iteration + 1
            bar.update(1)
            last = done == loop.max_iter
            if done == 1 or last or (loop.log_period and done % loop.log_period == 0):
                total = self._log_losses(done, losses, lr, data_time, time.perf_counter() - tick)
                bar.set_postfix(loss=f"{total:.4g}", lr=f"{lr:.3g}")
            if evaluate is not None and (last or (loop.eval_period and done % loop.eval_period == 0)):
                self._evaluate(done, evaluate)
            if last:
                self.save(self.final_path, done)
            elif loop.checkpoint_period and done % loop.checkpoint_period == 0:
                self.save(self.output_dir / f"model_{done:07d}.pth", done)
                if info.is_main:
                    prune_checkpoints(self.output_dir, loop.keep_checkpoints)
            tick = time.perf_counter()
        bar.close()
        batches.close()  # lets the loader's worker processes go
        return self.final_path

    def _log_losses(self, iteration: int, losses: dict, lr: float, data_time: float, step_time: float) -> float:
        """Average the losses over ranks (a collective: every rank calls it) and log them on rank 0."""
        values = torch.stack([v.detach().float() for v in losses.values()])
        if self.info.distributed:
            torch.distributed.all_reduce(values)
            values /= self.info.world_size
        reduced = dict(zip(losses, values.tolist()))
        total = sum(reduced.values())
        if self.info.is_main:
            record = {"iteration": iteration, "total_loss": total, **reduced, "lr": lr,
                      "data_time": round(data_time, 4), "time": round(step_time, 4)}
            if self.info.device.type == "cuda":
                record["max_mem_mb"] = round(torch.cuda.max_memory_allocated(self.info.device) / 2**20)
            append_metrics(self.metrics_path, record)
        return total

    def _evaluate(self, iteration: int, evaluate: Callable[[], dict]) -> None:
        self.evaluation = evaluate()
        if self.info.is_main:
            append_metrics(self.metrics_path, {"iteration": iteration, **self.evaluation})
