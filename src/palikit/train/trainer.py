"""The fine-tuning loop: `train(config) -> final checkpoint folder`.

- Before a step: the examples (`train_data` files, or a `train_source` hook `fn(config)` -> examples),
  a validation split (`val_data`, or `val_fraction` held out: `prepare.py`), rows longer than `max_len`
  refused (`prepare.py`), and the pre-flight table (`preflight.py`).
- Optimizer and schedule: `optim.py`. Steps: `batch_size` examples per optimizer step, split over ranks
  and `grad_accum` micro-batches; the loss numerator / denominator split (see `collate.py`) makes the
  step's gradient equal to the full-batch gradient whatever the split. Gradient-norm clipping, bf16
  autocast on CUDA. A step with a NaN / inf loss or gradient is skipped; `max_nonfinite_steps` in a
  row stop the run (`guard.py`). Order and batches: `batches.py` (resuming needs only the step;
  `data_workers` > 0: made in worker processes; strict_data=false skips an unreadable example).
- Distributed: under `torchrun` (`WORLD_SIZE > 1`) the process group is initialised (nccl on GPU,
  gloo on CPU), each rank takes every `world`-th example of the step's batch, and the loss forward
  runs in `DistributedDataParallel` (gradients averaged over the ranks in the last micro-batch's
  backward, `no_sync()` for the others) or, with `fsdp=true`, on the FSDP2-sharded model
  (`fsdp.py`); only rank 0 writes files.
- Eval every `eval_every` steps and at the end: val loss (same loss as training), the task metric
  on a validation sample with its warnings (`monitor.py`) and an optional metric hook; the best
  checkpoint (by `best_metric`) is kept and recorded in `best.json`; `early_stopping_patience`
  ends the run when it stops improving. The run ends with a one-line `summary:`.
- Checkpoints every `save_every` steps, at the end, before dying on an error, and on SIGINT / SIGTERM
  at the next step boundary (`interrupt.py`: then `TrainingInterrupted` with the resume command);
  atomic and verified (`checkpoint.py`); `resume=true` continues from the newest intact one of the
  same recipe (`resume.py`). The model is exported in the Hub layout (`export.py`): `final/` (the
  best checkpoint) and `last/`, LoRA merged, the adapter saved to `output_dir/adapter` in PEFT format.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from ..assets import default_model
from ..fileio import atomic_write_json
from . import checkpoint as ck
from .batches import StepPlan, step_batches
from .collate import Collator, default_image_processor, loss_denominator, loss_terms, to_device, token_nll
from .config import TrainConfig
from .data import Dataset, Example, load_examples, select_tasks
from .guard import NonFiniteGuard, TrainingDiverged
from .interrupt import StopSignals, resume_command, time_budget_message
from .loading import TRAIN_HINT, import_hook, load_model, load_tokenizer, text_limit
from .modes import apply_mode, count_trainable
from .monitor import LearningMonitor
from .optim import build_optimizer, seed_everything
from .parallel import LossForward, _Dist, data_parallel
from .prepare import check_lengths, split_validation
from .stopping import Stopping


# ------------------------------------------------------------------------------------ trainer
class Trainer(Stopping):
    def __init__(
        self,
        config: TrainConfig,
        *,
        model=None,
        tokenizer=None,
        image_processor=None,
        train_set: Dataset | list[Example] | None = None,
        val_set: Dataset | list[Example] | None = None,
        metric_fn: Callable | None = None,
        log: Callable[[str], None] | None = None,
        command: list[str] | None = None,
    ):
        self.cfg = config
        self.command = command  # the launching command line (for the resume hint after an interrupt)
        self._log = log or print
        self.out = Path(config.output_dir)
        self._init_device()
        self._init_model(model)
        self._init_data(train_set, val_set, tokenizer, image_processor)
        self._init_eval(metric_fn)
        self._init_steps()
        self._init_optimizer()
        self.step = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.warnings: list[str] = []  # the last evaluation's "not learning" warnings
        self._saved_step: int | None = None

    # -------------------------------------------------------------------------------- setup
    def _init_device(self) -> None:
        """Pick the device (cuda:LOCAL_RANK when `device=auto` and CUDA is present) and join the
        process group under torchrun."""
        self.dist = _Dist()
        if self.cfg.device == "auto":
            dev = f"cuda:{self.dist.local_rank}" if torch.cuda.is_available() else "cpu"
        else:
            dev = self.cfg.device
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dist.init(self.device)
        self.is_main = self.dist.rank == 0

    def _init_model(self, model) -> None:
        """Load the model, make the mode's parameters trainable, then shard it (fsdp) or wrap its
        loss forward in DistributedDataParallel (world > 1)."""
        cfg = self.cfg
        self.model_given = model is not None  # the best checkpoint is then exported from a copy (export.py)
        if model is None:
            cfg.model = default_model(cfg.model, self.log, hint=TRAIN_HINT)
        seed_everything(cfg.seed)
        self.model = model if model is not None else load_model(cfg.model, final_logit_softcap=cfg.final_logit_softcap)
        self.model.to(self.device)
        self.model.train()
        self.trainable = apply_mode(
            self.model, cfg.mode, freeze_vision=cfg.freeze_vision, freeze_decoder=cfg.freeze_decoder,
            lora_targets=cfg.lora_targets, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        )
        self.model.to(self.device)  # LoRA layers are created on the base layer's device; be sure
        self.fsdp = bool(cfg.fsdp) and self.dist.world > 1
        if self.fsdp:
            from .fsdp import shard_model

            shard_model(self.model, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.forward_loss = LossForward(self.model, cfg.label_smoothing)
        self.ddp = data_parallel(self.forward_loss, self.device) if self.dist.world > 1 and not self.fsdp else None
        if self.ddp is not None:
            self.forward_loss = self.ddp
        if cfg.mode in ("lora", "qlora") and cfg.lora_targets == "all-linear":
            n = sum(1 for name, _ in self.model.named_parameters() if ".lora_A." in name)
            self.log(f"lora_targets=all-linear: adapters on {n} Linear layers of the decoder (attention q/k/v/o and "
                     "MLP gate/up/down of every layer); the vision tower and projector are not included")

    def _init_data(self, train_set, val_set, tokenizer, image_processor) -> None:
        """The training / validation examples (objects given, or loaded from the config's paths, kept
        to `tasks`) and the collator."""
        cfg = self.cfg

        def as_list(ds):
            return list(ds.examples) if isinstance(ds, Dataset) else list(ds)

        data_kw = dict(data_format=cfg.data_format, strict=cfg.strict_data, coco_task=cfg.coco_task,
                       coco_images=cfg.coco_images, include_absent=cfg.coco_include_absent, mask_codec=cfg.mask_codec)
        from_hook = train_set is None and bool(cfg.train_source)  # the hook applies `tasks` itself
        if train_set is not None:
            self.train_set = as_list(train_set)
        elif from_hook:  # kept as the hook's own sequence (it may make examples on demand)
            self.train_set = import_hook(cfg.train_source, "train_source")(cfg)
        else:
            self.train_set = as_list(load_examples(cfg.train_data, **data_kw))
        if val_set is not None:
            self.val_set = as_list(val_set)
        else:
            self.val_set = as_list(load_examples(cfg.val_data, **data_kw)) if cfg.val_data else []
        if cfg.tasks:
            if not from_hook:
                self.train_set = select_tasks(self.train_set, cfg.tasks, cfg.train_data or "training data")
            if self.val_set:
                self.val_set = select_tasks(self.val_set, cfg.tasks, cfg.val_data or "validation data")
        if not from_hook:
            self.train_set, self.val_set = split_validation(cfg, self.train_set, self.val_set, self.log)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
        n_image = self.model.config.vision.num_image_tokens
        self.max_len, self.max_len_source = (cfg.max_len, "max_len") if cfg.max_len else text_limit(cfg.model, n_image)
        self.lengths: list[int] = []  # text tokens of each file example (the pre-flight's figures)
        if not from_hook:
            self.train_set, self.lengths = check_lengths(cfg, tokenizer, self.train_set, self.max_len,
                                                         cfg.train_data or "training data", self.log)
        if self.val_set:
            self.val_set = check_lengths(cfg, tokenizer, self.val_set, self.max_len,
                                         cfg.val_data or "validation data", self.log)[0]
        self.collator = Collator(
            tokenizer,
            image_processor if image_processor is not None else default_image_processor(
                self.model.config, cfg.model if cfg.model and Path(cfg.model).is_dir() else None),
            self.model.config, self.max_len, cfg.pad_to_max_len, cfg.cache_images,
            refuse_longer=cfg.long_rows == "refuse",
        )
        self.skipped: list[str] = []  # examples skipped at run time (strict_data=false)

    def _init_eval(self, metric_fn) -> None:
        """The metric hook and the learning monitor (task metric on a val sample; not with fsdp)."""
        cfg = self.cfg
        self.metric_fn = metric_fn or (import_hook(cfg.metric, "metric") if cfg.metric else None)
        self.monitor = LearningMonitor(self.val_set if cfg.task_metric and not self.fsdp else [],
                                       cfg.task_metric_samples, cfg.collapse_warn, cfg.plateau_patience, config=cfg)
        self.guard = NonFiniteGuard(cfg.max_nonfinite_steps)
        if self.fsdp and self.metric_fn is not None:
            raise ValueError("metric hooks run on rank 0 alone, which a sharded (fsdp) model cannot do; "
                             "use val_loss as best_metric with fsdp=true, or evaluate the exported checkpoint.")

    def _init_steps(self) -> None:
        """Step arithmetic: micro-batch size per rank, steps per epoch, total and warmup steps."""
        cfg = self.cfg
        per_micro = cfg.batch_size / (self.dist.world * cfg.grad_accum)
        if per_micro != int(per_micro):
            raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of world_size x grad_accum "
                             f"= {self.dist.world} x {cfg.grad_accum}")
        self.micro_batch = int(per_micro)
        n = len(self.train_set)
        if n < cfg.batch_size:
            raise ValueError(f"{n} training examples are fewer than batch_size={cfg.batch_size}")
        self.steps_per_epoch = n // cfg.batch_size
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        warmup = cfg.warmup if cfg.warmup >= 1 else cfg.warmup * self.total_steps
        self.warmup_steps = int(round(warmup))
        self.plan = StepPlan(self.train_set, cfg.batch_size, self.micro_batch, cfg.seed, self.dist.rank, self.dist.world)

    def _init_optimizer(self) -> None:
        """AdamW or SGD over the trainable parameters, and the warmup + cosine schedule (`optim.py`)."""
        self.optimizer, self.scheduler = build_optimizer(self.cfg, self.model, self.params, self.total_steps,
                                                         self.warmup_steps)

    # -------------------------------------------------------------------------------- utils
    def log(self, msg: str) -> None:
        if self.is_main:
            self._log(msg)

    def autocast(self):
        p = self.cfg.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -------------------------------------------------------------------------------- steps
    def train_step(self, step: int, batches: list[dict] | None = None) -> dict:
        """One optimizer step on step `step`'s micro-batches (made here unless `batches` are given)."""
        cfg = self.cfg
        if batches is None:
            batches = [self.collator(exs) for exs in self.plan.examples(step)]
        batches = [to_device(b, self.device) for b in batches]
        denom = self.dist.all_sum(torch.tensor(sum(loss_denominator(b, cfg.loss) for b in batches), dtype=torch.float64))
        denom = max(float(denom), 1.0)
        total = torch.zeros((), dtype=torch.float64)
        for i, b in enumerate(batches):
            # DDP all-reduces (averages) the gradients in the last micro-batch's backward only;
            # FSDP reduce-scatters them itself
            with self.ddp.no_sync() if self.ddp is not None and i < len(batches) - 1 else nullcontext():
                with self.autocast():
                    nll, w = self.forward_loss(b)
                num = loss_terms(nll.float(), w, cfg.loss)
                (num * (self.dist.world / denom)).backward()
            total += num.detach().double().cpu()
        if self.fsdp:
            from .fsdp import total_grad_norm

            gnorm = total_grad_norm(self.params, cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else math.inf)
        elif cfg.grad_clip and cfg.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        else:
            gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        lr = self.optimizer.param_groups[0]["lr"]
        loss = float(self.dist.all_sum(total) / denom)  # every rank sees the same loss and norm: they agree
        rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": gnorm}
        if NonFiniteGuard.finite(rec):
            self.optimizer.step()
        self.scheduler.step()  # a skipped update still moves the schedule (as a loss scaler's skip does)
        self.optimizer.zero_grad(set_to_none=True)
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Val loss over the whole val set (sharded over ranks) and the metric hook's values."""
        if not self.val_set:
            return {}
        self.model.eval()
        mine = self.val_set[self.dist.rank::self.dist.world]
        num = torch.zeros((), dtype=torch.float64)
        den = torch.zeros((), dtype=torch.float64)
        starts = list(range(0, len(mine), self.micro_batch))
        if self.fsdp:  # every rank must run the same number of (collective) forwards
            most = math.ceil(math.ceil(len(self.val_set) / self.dist.world) / self.micro_batch)
            starts += [None] * (most - len(starts))
        for j in starts:
            chunk = self.val_set[:1] if j is None else mine[j:j + self.micro_batch]
            b = to_device(self.collator(chunk), self.device)
            with self.autocast():
                nll, w = token_nll(self.model, b)
            if j is None:
                continue
            num += loss_terms(nll.float(), w, self.cfg.loss).double().cpu()
            den += loss_denominator(b, self.cfg.loss)
        out = {"val_loss": float(self.dist.all_sum(num) / self.dist.all_sum(den).clamp(min=1))}
        if self.is_main:
            task, warnings = self.monitor.task_metrics(self.model, self.collator, self.device)
            out.update(task)
            if (w := self.monitor.plateau_warning(self.step, out["val_loss"])) is not None:
                warnings.append(w)
            since = max((h["step"] for h in self.history if "val_loss" in h), default=0)
            recent = [h["loss"] for h in self.history if "loss" in h and h["step"] > since and math.isfinite(h["loss"])]
            if (w := self.monitor.overfit_warning(self.step, out["val_loss"], recent)) is not None:
                warnings.append(w)
            self.warnings = warnings
        if self.metric_fn is not None and self.is_main:
            res = self.metric_fn(self.model, self.val_set, self)
            out.update(res if isinstance(res, dict) else {"metric": float(res)})
        self.model.train()
        return out

    # -------------------------------------------------------------------------------- state
    def _info(self) -> dict:
        return {"total_steps": self.total_steps, "epoch": self.step / self.steps_per_epoch,
                "best": self.best, "history": self.history, "mode": self.cfg.mode}

    def save(self) -> Path | None:
        path = None
        full = {}
        if self.fsdp:  # gather on every rank (collective), write on rank 0
            from .fsdp import full_optimizer_state, full_trainable_state

            full = {"params": full_trainable_state(self.model), "optimizer_state": full_optimizer_state(self.model, self.optimizer)}
        if self.is_main:
            path = ck.save_checkpoint(self.out, self.step, self.model, self.optimizer, self.scheduler, self._info(),
                                      config=self.cfg.to_dict(), **full)
            self._saved_step = self.step
            keep = {f"{ck.PREFIX}{self.best['step']:08d}"} if self.best else set()
            ck.prune_checkpoints(self.out, self.cfg.keep_last, keep)
        self.dist.barrier()
        return path

    def resume(self) -> bool:
        """Continue from the newest intact checkpoint of this recipe (`resume.py`: broken ones skipped with
        their reason, another recipe refused unless resume=force)."""
        from .resume import resume_from

        def load(path):
            if self.fsdp:
                from .fsdp import load_sharded_checkpoint

                return load_sharded_checkpoint(path, self.model, self.optimizer, self.scheduler)
            return ck.load_checkpoint(path, self.model, self.optimizer, self.scheduler)

        found = resume_from(self.out, self.cfg.to_dict(), self.cfg.resume, load, self.log)
        if found is None:
            return False
        path, state = found
        self.step = state["step"]
        self.history = state.get("history", [])
        self.best = state.get("best")
        self.monitor.restore(self.history)
        self.log(f"resumed from {path} (step {self.step}/{self.total_steps})")
        return True

    def _update_best(self, metrics: dict) -> bool:
        key = self.cfg.best_metric
        if key not in metrics:
            return False
        v = metrics[key]
        better = self.best is None or (v < self.best["value"] if self.cfg.best_mode == "min" else v > self.best["value"])
        if better:
            self.best = {"step": self.step, "metric": key, "value": v}
        return better

    # -------------------------------------------------------------------------------- loop
    def fit(self) -> Path:
        cfg = self.cfg
        self.preflight()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ck.clean_partial(self.out)
        self.dist.barrier()
        if cfg.resume:
            self.resume()  # before train_config.json is rewritten: an older checkpoint's recipe may be read from it
        if self.is_main:
            atomic_write_json(self.out / ck.CONFIG, cfg.to_dict())
        self.log(f"training {count_trainable(self.model):,} parameters ({cfg.mode}"
                 f"{', vision frozen' if cfg.freeze_vision else ''}{', decoder frozen' if cfg.freeze_decoder else ''}), "
                 f"{len(self.train_set)} examples, {self.total_steps} steps of {cfg.batch_size}, "
                 f"world {self.dist.world}")
        self.log(cfg.optimizer_reason)
        stop = StopSignals()
        progress = self._progress()
        hard = False
        try:
            with stop:
                try:
                    self._loop(progress, stop)
                except KeyboardInterrupt:  # a second Ctrl-C while stopping: no checkpoint
                    stop.signum, hard = signal.SIGINT, True
                except TrainingDiverged:
                    raise
                except Exception:
                    self._save_before_dying()
                    raise
        finally:
            if progress:
                progress[0].stop()
        if stop.signum is not None:
            if self.step < self.total_steps or hard:
                self._interrupted(stop.signum, hard)
            self.log(f"{signal.Signals(stop.signum).name} after the last step: finishing the export")
        final = self.export()
        self.plot()
        losses = [h["loss"] for h in self.history if "loss" in h]
        if self.skipped:
            self.log(f"{len(self.skipped)} example(s) were skipped at run time (strict_data=false), e.g. {self.skipped[0]}")
        self.log(self.monitor.summary(self.step, losses[-1] if losses else None))
        self.dist.barrier()
        return final

    def _loop(self, progress, stop: StopSignals) -> None:
        t0 = time.time()
        steps = step_batches(self.plan, self.collator, self.step, self.total_steps, self.cfg.data_workers,
                             skip_bad=not self.cfg.strict_data)
        try:
            while self.step < self.total_steps and not self._should_stop(stop):
                batches, skipped = next(steps)
                for msg in skipped:  # strict_data=false: an unreadable example left out of its batch
                    self.log(f"step {self.step + 1}: skipped {msg}")
                self.skipped += skipped
                rec = self.train_step(self.step, batches)
                self.step += 1
                self.history.append(rec)
                if (warning := self.guard.note(rec)) is not None:
                    self.log(f"warning: {warning}")
                    if self.guard.tripped or self.step == self.total_steps:  # never export a streak's weights
                        self._diverged()
                if progress:
                    progress[0].update(progress[1], completed=self.step, description=f"loss {rec['loss']:.4f}")
                out_of_time = self.step < self.total_steps and self._out_of_time(t0)
                self._after_step(rec, t0, last=out_of_time or self.step == self.total_steps)
                if out_of_time:
                    self.log(time_budget_message(self.cfg.max_minutes, time.time() - t0, self.step, self.total_steps,
                                                 bool(self.val_set), resume_command(self.command, self.cfg.resume)))
                    break
                if self.step < self.total_steps and self._early_stop():
                    break
        finally:
            steps.close()  # stops the data workers

    def _after_step(self, rec: dict, t0: float, last: bool) -> None:
        """The loss line, evaluation and checkpoint due after step `self.step` (`last`: the run ends here)."""
        cfg = self.cfg
        if self.step % max(cfg.log_every, 1) == 0 or last:
            self.log(f"step {self.step}/{self.total_steps} loss {rec['loss']:.5f} lr {rec['lr']:.3g} "
                     f"grad_norm {rec['grad_norm']:.3g} ({time.time() - t0:.1f}s)")
        evaluated = False
        if self.val_set and ((cfg.eval_every and self.step % cfg.eval_every == 0) or last):
            metrics = self.evaluate()
            self.history.append({"step": self.step, **metrics})
            evaluated = self._update_best(metrics)
            self.log(f"eval step {self.step}: " + ", ".join(f"{k} {v:.5f}" for k, v in metrics.items()))
            for w in self.warnings:
                self.log(f"warning: {w}")
        if ((cfg.save_every and self.step % cfg.save_every == 0) or last or evaluated) and not self.guard.run:
            path = self.save()  # not inside a non-finite streak: those weights gave a NaN / inf loss
            if path is not None:
                self.log(f"saved {path}")
            if evaluated and self.is_main:
                atomic_write_json(self.out / "best.json", {**self.best, "checkpoint": f"{ck.CKPT_DIR}/{ck.PREFIX}{self.step:08d}"})

    def _progress(self):
        if not (self.cfg.progress and self.is_main):
            return None
        from .plot import progress_bar

        return progress_bar(self.total_steps, self.step)

    def export(self) -> Path:
        """Hub-layout export: final/ (the best checkpoint with keep_best) and last/ (`export.export_run`)."""
        from .export import export_run

        return export_run(self)

    def preflight(self):
        """The pre-flight table (`preflight.py`) before anything is trained; `preflight=strict` stops on a warning."""
        if self.cfg.preflight == "off" or not self.is_main:
            return None
        from .preflight import check_run

        report = check_run(self)
        self.monitor.preflight = report
        for line in report.text_lines():
            self.log(line)
        report.raise_if_failed(strict=self.cfg.preflight == "strict", how="preflight=warn")
        return report

    def plot(self) -> Path | None:
        if not (self.cfg.plot and self.is_main):
            return None
        from .plot import loss_curve_png

        train = [(h["step"], h["loss"]) for h in self.history if "loss" in h]
        val = [(h["step"], h["val_loss"]) for h in self.history if "val_loss" in h]
        return loss_curve_png(train, val, self.out / "loss_curve.png", title=self.cfg.mode)

    def close(self) -> None:
        self.dist.close()


def train(config: TrainConfig | str | Path, overrides: list[str] | tuple[str, ...] = (), **kwargs) -> Path:
    """Run a fine-tuning job; return the final Hub-layout checkpoint folder (`output_dir/final`).

    `config` is a TrainConfig or a YAML path (+ `key=value` overrides). Keyword arguments go to
    `Trainer` (model / tokenizer / image_processor / train_set / val_set / metric_fn objects
    instead of the paths in the config). Works under `torchrun --nproc_per_node N`."""
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_yaml(config, overrides)
    elif overrides:
        config = TrainConfig.from_dict(config.to_dict(), overrides)
    trainer = Trainer(config, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()
