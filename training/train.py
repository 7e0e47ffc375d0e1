"""The training loop, shared by every task and model.

Exact resume: the checkpoint holds the weights, the optimizer, the learning rate and
plateau counters, the RNG state, the position in the epoch's batch order and (for
language models) the hidden state carried into the next window. Batch orders are
functions of (seed, epoch), so a resumed run continues exactly where it stopped.

Under torchrun the same loop trains data-parallel (see distributed.py): the checkpoint
holds the whole carried state and every rank's RNG, so resuming works the same way.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from training import checkpoint, distributed
from training.averaging import WeightAverage, nonmonotone_trigger
from training.config import Config, ConfigError, anchored
from training.models.ngram import KneserNey
from training.tasks import make_task
from training.transfer import parameter_groups, transfer_from_lm, unfreeze_for_epoch

DRY_RUN_BATCHES = 3


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    index: int = 0  # next batch within the current epoch
    step: int = 0  # optimizer steps taken
    tokens: int = 0  # training tokens seen
    lr: float = 0.0
    best: float | None = None  # best validation metric so far
    bad_epochs: int = 0
    clipped_steps: int = 0
    history: list = field(default_factory=list)  # the validation metric after each epoch
    averaging_from: int = 0  # NT-ASGD: the step averaging started at (0: not yet)


def device_of(config: Config) -> torch.device:
    device = torch.device(config.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but torch sees no CUDA device")
    return device


def build_optimizer(config: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Every parameter, frozen ones too (they have no gradient, so no step moves them, and
    gradual unfreezing needs no new optimizer); with layer_lr_decay, one group per layer."""
    o = config.optimizer
    params = parameter_groups(model, config) or [{"params": list(model.parameters()),
                                                   "lr_scale": 1.0}]
    for group in params:
        group["lr"] = o.lr * group["lr_scale"]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


class _Stop:
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to save and stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricLog:
    """metrics.jsonl plus TensorBoard, one record per logged point (rank 0 only)."""

    def __init__(self, run_dir: Path, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, float | int) and key not in ("step", "epoch"):
                self.writer.add_scalar(f"{record['split']}/{key}", value, record["tokens"])

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def train(config: Config, run_dir: str | Path, resume: bool = False, dry_run: bool = False) -> dict:
    """Trains in this process, or as one rank of a torchrun job when WORLD_SIZE is set.
    Returns the run's summary (on rank 0; other ranks return {})."""
    world = distributed.from_environment()
    if world.distributed:
        distributed.check_batch_size(world, config.train.batch_size)
    device = distributed.start(world, device_of(config))
    try:
        summary = _train(config, Path(run_dir), resume, dry_run, world, device)
    except BaseException:
        distributed.stop(world, wait=False)
        raise
    distributed.stop(world)
    return summary if world.is_main else {}


def _train(config: Config, run_dir: Path, resume: bool, dry_run: bool,
           world: distributed.World, device: torch.device) -> dict:
    t = config.train
    torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    if t.unfreeze_every and world.distributed:
        raise ConfigError("train.unfreeze_every trains in one process (DistributedDataParallel "
                          "fixes the trainable parameters when it wraps the model)")
    if config.data.level == "bpe" and world.distributed and not resume:
        raise ConfigError("data.level = 'bpe' trains its tokenizer in one process: train the "
                          "first epoch without --nproc (or with train.max_steps), then resume "
                          "it with --nproc")
    task = make_task(config, run_dir if resume else None)
    task.world = world
    model = task.build_model()  # refuses what only the vocabulary shows before anything is written
    transferred = None
    if config.model.init_from and not resume:  # refused, too, before anything is written
        transferred = transfer_from_lm(model, task.vocab, config.model.init_from)
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        task.vocab.save(run_dir / "vocab.json")
        if task.labels is not None:
            task.labels.save(run_dir / "labels.json")
        (run_dir / "config.toml").write_text(anchored(config, Path.cwd()).to_toml())
    if dry_run:
        task.eval_limit = 2000
    if isinstance(model, KneserNey):
        if world.distributed:
            raise ConfigError("model.type = 'kn' (a count-based model) trains in one process")
        return _finish_count_model(task, model, run_dir, device)

    if transferred is not None and world.is_main:
        (run_dir / "transfer.json").write_text(json.dumps(transferred, indent=2) + "\n")
        print(f"from {transferred['from']}: {transferred['words']} of "
              f"{transferred['vocabulary']} word vectors, "
              f"{transferred['recurrent_layers']} recurrent layer(s)")
    model.to(device)
    if world.rank > 0:  # other dropout masks than rank 0's (which match a single process)
        torch.manual_seed(t.seed + world.rank)
    optimizer = build_optimizer(config, model)
    progress = Progress(lr=config.optimizer.lr)
    average = WeightAverage()
    if resume:
        saved = checkpoint.load(run_dir / checkpoint.LAST, device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        average.load_state_dict(model, saved.get("average"))
        progress = Progress(**saved["progress"])
        carry = saved.get("carry")
        task.carry = (None if carry is None
                      else carry[:, distributed.own_slice(world, carry.shape[1])].contiguous())
        _restore_rng(saved, world, t.seed)
    model = distributed.wrap(model, world, device)
    log = MetricLog(run_dir, progress.step if resume else None, enabled=world.is_main)
    epochs = 1 if dry_run else t.epochs
    started, first_epoch = time.monotonic(), progress.epoch
    stopped_early = False

    def save_last() -> None:
        carry = distributed.gather_rows(world, task.carry, dim=1)  # every rank takes part
        rngs = distributed.gather_objects(world, checkpoint.rng_state())
        if world.is_main:
            checkpoint.save_atomic(
                {"model": distributed.unwrap(model).state_dict(),
                 "optimizer": optimizer.state_dict(), "progress": asdict(progress),
                 "average": average.state_dict(), "carry": carry, "rng": rngs[0],
                 "rng_by_rank": rngs}, run_dir / checkpoint.LAST)

    with _Stop() as stop:
        while progress.epoch < epochs and not stopped_early:
            total, iterate = task.epoch_batches(progress.epoch, device)
            if dry_run:
                total = min(total, DRY_RUN_BATCHES)
            if progress.index == 0:
                task.start_epoch()
            if t.unfreeze_every:
                unfreeze_for_epoch(distributed.unwrap(model), t.unfreeze_every, progress.epoch)
            window = _new_window()
            bar = tqdm(total=total, initial=progress.index, desc=f"epoch {progress.epoch + 1}",
                       dynamic_ncols=True, leave=False, disable=None if world.is_main else True)
            for index, *batch in iterate(progress.index):
                if index >= total:
                    break
                model.train()
                loss, logged, tokens, counts = task.loss(model, batch)
                logged_loss = logged.item()
                interrupted = stop.requested
                out_of_time = t.max_minutes > 0 and time.monotonic() - started > t.max_minutes * 60
                if world.distributed:
                    loss, logged_loss, tokens, counts, interrupted, out_of_time = _agree(
                        world, device, loss, logged_loss, tokens, counts, interrupted,
                        out_of_time)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                limit = t.clip if t.clip > 0 else math.inf
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), limit))
                optimizer.step()
                average.update(distributed.unwrap(model))
                clipped = norm > limit
                progress.index, progress.step = index + 1, progress.step + 1
                progress.tokens += tokens
                progress.clipped_steps += int(clipped)
                window["loss"] += logged_loss * tokens
                window["tokens"] += tokens
                window["batches"] += 1
                window["norm"] += norm
                window["clipped"] += int(clipped)
                if counts is not None:
                    window["correct"] += counts[0]
                    window["counted"] += counts[1]
                bar.update(min(index + 1, total) - bar.n)
                last_of_epoch = progress.index >= total
                if progress.step % t.log_every == 0 or last_of_epoch:
                    record = _train_record(task, progress, window)
                    log.write(record)
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in
                                     ("loss", task.metric, "tokens_per_s") if k in record})
                    window = _new_window()
                if interrupted or (t.max_steps and progress.step >= t.max_steps):
                    save_last()
                    bar.close()
                    log.close()
                    reason = "interrupted" if interrupted else "max_steps"
                    if world.is_main:
                        print(f"stopped ({reason}) at step {progress.step}; "
                              f"resume with: recur train --resume {run_dir}")
                    return {"stopped": reason, "step": progress.step}
                if out_of_time:
                    stopped_early = True
                    break
                if t.checkpoint_every and progress.step % t.checkpoint_every == 0:
                    save_last()
            bar.close()
            progress.epoch, progress.index = progress.epoch + 1, 0
            left = distributed.from_main(world, _epochs_left(
                t, epochs - progress.epoch, time.monotonic() - started,
                progress.epoch - first_epoch))
            _end_of_epoch(task, distributed.unwrap(model), optimizer, progress, config, log,
                          run_dir, device, world, left, average)
            save_last()
    log.close()
    if not world.is_main:
        return {}
    return _finish(task, distributed.unwrap(model), run_dir, device, progress)


def _agree(world: distributed.World, device: torch.device, loss: torch.Tensor,
           logged_loss: float, tokens: int, counts, interrupted: bool, out_of_time: bool):
    """One all_reduce per step: the global mean logged loss and counts for the log, and the
    stop flags, so that all ranks stop after the same step.
    The local mean loss is rescaled so that DDP's gradient average equals the gradient of
    the mean over all ranks' loss terms (ranks may hold different numbers of them)."""
    terms = counts[1] if counts is not None else tokens  # what the mean loss averages over
    correct, counted = counts if counts is not None else (0, 0)
    total = distributed.sum_across(
        world, [logged_loss * terms, terms, tokens, correct, counted, interrupted, out_of_time],
        device)
    scaled = loss * (terms * world.size / max(1.0, total[1]))
    mean = total[0] / max(1.0, total[1])
    global_counts = (int(total[3]), int(total[4])) if counts is not None else None
    return scaled, mean, int(total[2]), global_counts, total[5] > 0, total[6] > 0


def _new_window() -> dict:
    """Sums over the steps since the last logged training record."""
    return {"loss": 0.0, "tokens": 0, "batches": 0, "norm": 0.0, "clipped": 0, "correct": 0,
            "counted": 0, "time": time.monotonic()}


def _train_record(task, progress: Progress, window: dict) -> dict:
    elapsed = max(1e-9, time.monotonic() - window["time"])
    loss = window["loss"] / max(1, window["tokens"])
    record = {"split": "train", "step": progress.step, "epoch": progress.epoch + 1,
              "tokens": progress.tokens, "loss": loss, "lr": progress.lr,
              "grad_norm": window["norm"] / max(1, window["batches"]),
              "clip_fraction": window["clipped"] / max(1, window["batches"]),
              "tokens_per_s": window["tokens"] / elapsed}
    if task.metric == "ppl":
        record["ppl"] = math.exp(min(loss, 700.0))
    elif window["counted"]:
        record["accuracy"] = window["correct"] / window["counted"]
    return record


def _epochs_left(t, by_count: int, elapsed_s: float, epochs_done_here: int) -> float:
    """Epochs still to train: those the config asks for, or fewer when the time budget
    (at this process's pace so far, evaluation included) ends the run first."""
    if t.max_minutes <= 0 or epochs_done_here <= 0:
        return float(by_count)
    per_epoch = elapsed_s / epochs_done_here
    return min(float(by_count), max(0.0, t.max_minutes * 60 - elapsed_s) / per_epoch)


def _end_of_epoch(task, model, optimizer, progress: Progress, config: Config, log: MetricLog,
                  run_dir: Path, device, world: distributed.World,
                  epochs_left: float = math.inf, average: WeightAverage | None = None) -> None:
    """Validation, best-checkpoint selection by the task's own metric (task.select_by),
    NT-ASGD's trigger and the learning-rate schedule. Every rank evaluates the same
    weights; rank 0's result decides, so the schedules cannot drift apart."""
    average = average or WeightAverage()
    evaluated_model = average.model(model)
    result = distributed.from_main(world, task.evaluate(evaluated_model, "valid", device))
    logged = {("eval_" + k if k in ("tokens", "examples") else k): v for k, v in result.items()}
    log.write({"split": "valid", "step": progress.step, "epoch": progress.epoch,
               "tokens": progress.tokens, "lr": progress.lr,
               "averaged_steps": average.steps_averaged, **logged})
    value = result[task.select_by]
    o = config.optimizer
    improved, lr = schedule_after_validation(progress, value, task.higher_is_better, o,
                                             epochs_left)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
    if world.is_main:
        print(f"epoch {progress.epoch}: valid {shown}{' (best)' if improved else ''}"
              f"{' (averaged)' if average.started else ''}")
    if improved and world.is_main:
        checkpoint.save_atomic({"model": evaluated_model.state_dict(), "epoch": progress.epoch,
                                "valid": result, "averaged_steps": average.steps_averaged},
                               run_dir / checkpoint.BEST)
    triggered = o.nt_asgd and nonmonotone_trigger(progress.history, value, o.nonmono,
                                                  task.higher_is_better)
    scheduled = o.average_after_epoch and progress.epoch >= o.average_after_epoch
    if not average.started and (triggered or scheduled):
        average.start(model)
        progress.averaging_from = progress.step
        if world.is_main:
            why = (f"validation {task.select_by} {value:.4g} is worse than the best before "
                   f"the last {o.nonmono} epochs" if triggered
                   else f"epoch {progress.epoch} has ended")
            print(f"averaging the weights from step {progress.step}: {why}")
    progress.history.append(value)
    if lr != progress.lr:
        progress.lr = lr
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if world.is_main:
            print(f"learning rate now {lr:.4g}")


def schedule_after_validation(progress: Progress, value: float, higher_is_better: bool,
                              o, epochs_left: float = math.inf) -> tuple[bool, float]:
    """Updates the best value and the plateau counter from this epoch's validation
    `value`; -> (whether it improved on the best, the learning rate for the next epoch).
    The rate is cut by plateau_factor after more than plateau_patience epochs without
    improvement, and decayed on the configured epochs."""
    improved = progress.best is None or (value > progress.best if higher_is_better
                                         else value < progress.best)
    lr = progress.lr
    if improved:
        progress.best, progress.bad_epochs = value, 0
    else:
        progress.bad_epochs += 1
        if progress.bad_epochs > o.plateau_patience and o.plateau_factor < 1.0:
            lr, progress.bad_epochs = lr * o.plateau_factor, 0
    if ((o.decay_after and progress.epoch >= o.decay_after)
            or (o.decay_last and epochs_left <= o.decay_last)):
        lr *= o.decay_factor
    return improved, max(o.min_lr, lr)


def _restore_rng(saved: dict, world: distributed.World, seed: int) -> None:
    """Each rank continues its own random stream; resuming with another number of
    processes cannot, so those ranks reseed (and dropout masks differ from an
    uninterrupted run)."""
    by_rank = saved.get("rng_by_rank") or [saved["rng"]]
    if len(by_rank) == world.size:
        checkpoint.restore_rng(by_rank[world.rank])
        return
    torch.manual_seed(seed + world.rank + len(by_rank))
    if world.is_main:
        print(f"resuming a {len(by_rank)}-process run with {world.size} processes: "
              "random streams restart, so the run is not bit-exact")


def _finish(task, model, run_dir: Path, device, progress: Progress) -> dict:
    best = checkpoint.load(run_dir / checkpoint.BEST, device)
    model.load_state_dict(best["model"])
    summary = {"valid": task.evaluate(model, "valid", device), "best_epoch": best["epoch"],
               "selected_by": task.select_by,
               "averaged_steps": best.get("averaged_steps", 0),
               "steps": progress.step, "tokens": progress.tokens,
               "clip_fraction": progress.clipped_steps / max(1, progress.step),
               "parameters": sum(p.numel() for p in model.parameters())}
    if (run_dir / "transfer.json").exists():
        summary["transferred"] = json.loads((run_dir / "transfer.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    from training.plots import learning_curve

    learning_curve(run_dir / "metrics.jsonl", run_dir / "learning_curve.png", task.metric)
    return summary


def _finish_count_model(task, model: KneserNey, run_dir: Path, device) -> dict:
    summary = {"valid": task.evaluate(model, "valid", device), "steps": 0,
               "tokens": len(task.stream("train"))}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"valid ppl {summary['valid']['ppl']:.2f}")
    return summary
