"""The training loop, shared by both back ends.

Per optimizer step: `grad_accum` micro-batches of forward + backward, one all-reduce of a small
vector of step statistics and one host sync, then either the update or, for a non-finite loss /
gradient norm, a skipped step.

The loss of a step is the LM loss as the mean over every supervised token of the step (all
micro-batches and ranks: summed token losses over the step's token count, which one all-reduce
before the forwards gives), plus the MoE aux losses as per-forward means averaged over the
micro-batches. So micro-batch size, accumulation and the number of processes do not change what
a step computes; tasks whose loss is not per token (CLIP) average over micro-batches instead.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader

from llava_smoe.config import ConfigError
from llava_smoe.data import ModalityLengthGroupedSampler
from llava_smoe.moe import (
    aux_loss_names,
    configure_moe_schedule,
    moe_layers,
    moe_optimizer_step,
    routing_stats,
)
from llava_smoe.training import distributed
from llava_smoe.training.backends import Backend, TorchBackend, to_device
from llava_smoe.training.checkpoint import (
    TrainerState,
    checkpoint_root,
    load_checkpoint,
    load_rng,
    read_state,
    resolve_resume,
    save_checkpoint,
)
from llava_smoe.training.config import RunConfig
from llava_smoe.training.data import (
    EmptyBatch,
    ResumableSampler,
    ShardedEvalSampler,
    SkipAwareCollate,
    modality_lengths,
)
from llava_smoe.training.distributed import DistInfo
from llava_smoe.training.metrics import (
    METRICS_FILE,
    MetricsLogger,
    flatten_routing,
    truncate_metrics,
)
from llava_smoe.training.optim import (
    WarmupCosineSchedule,
    build_optimizer,
    build_param_groups,
)
from llava_smoe.training.tasks import TaskParts, get_task

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    status: Literal["completed", "nonfinite", "interrupted"]
    step: int
    message: str
    checkpoint: Path | None = None
    export_dir: Path | None = None


class PhaseTimes:
    """Seconds spent in each phase of the training steps (`llava-smoe bench step` turns it on).
    On the CPU every phase ends when its work does; on a GPU, kernels still running are counted
    in whichever later phase waits for them."""

    def __init__(self, skip_steps: int = 0) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.skip_steps = skip_steps  # untimed warm-up steps
        self.steps = 0  # timed steps
        self._done = 0
        self._last_end: float | None = None

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._done >= self.skip_steps:
                self.seconds[name] += time.perf_counter() - t0

    def end_step(self) -> None:
        now = time.perf_counter()
        if self._done >= self.skip_steps and self._last_end is not None:
            self.seconds["step"] += now - self._last_end
            self.steps += 1
        self._done += 1
        self._last_end = now


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(run: RunConfig) -> TrainResult:
    """Set up the process group, build the task, train, tear down."""
    dist_info = distributed.setup(run.train.backend)
    try:
        seed_everything(run.train.seed)  # same on every rank: replicas start identical
        parts = get_task(run.task).build(run)
        return Trainer(run, parts, dist_info).fit()
    finally:
        distributed.teardown()


def micro_batch_multiple_check(model: torch.nn.Module, micro_batch_size: int) -> bool:
    """Validate routers that mix sequences (Mixture of Tokens); True if any needs a multiple."""
    needs_multiple = False
    for name, layer in moe_layers(model):
        check = getattr(getattr(layer.router, "opts", None), "check_batch_size", None)
        if check is None:
            continue
        needs_multiple = True
        try:
            check(micro_batch_size)
        except ValueError as exc:
            raise ConfigError(
                f"train.micro_batch_size={micro_batch_size} does not suit MoE layer {name}: {exc}"
            ) from None
    return needs_multiple


class Trainer:
    def __init__(self, run: RunConfig, parts: TaskParts, dist_info: DistInfo):
        self.run, self.cfg, self.parts, self.dist = run, run.train, parts, dist_info
        cfg = self.cfg
        self.output_dir = Path(cfg.output_dir)
        model = parts.model
        needs_multiple = micro_batch_multiple_check(model, cfg.micro_batch_size)
        if cfg.gradient_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ConfigError(
                    f"train.gradient_checkpointing=true, but {type(model).__name__} has no "
                    "gradient_checkpointing_enable(); set it to false or add the method to the model"
                )
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(dist_info.device)
        self.expert_parallel = None
        if cfg.expert_parallel > 1:  # before the optimizer: each rank keeps state for its experts only
            from llava_smoe.training.expert_parallel import ExpertParallel

            self.expert_parallel = ExpertParallel.setup(model, cfg.expert_parallel, dist_info)

        groups, summary, frozen = build_param_groups(model, run.optim)
        if dist_info.is_main:
            for g in summary:
                log.info("param group %-12s lr %.3g: %d tensors, %s parameters",
                         g.name, g.lr, g.tensors, f"{g.parameters:,}")
            log.info("frozen (by the model, no group, or lr 0): %s parameters", f"{frozen:,}")
        optimizer = build_optimizer(groups, run.optim)

        self.sampler = self._build_sampler(parts.train_dataset)
        micro_per_epoch = len(self.sampler) // cfg.micro_batch_size
        if micro_per_epoch == 0:
            raise ConfigError(f"the training set gives each of {dist_info.world_size} processes {len(self.sampler)} "
                              f"samples, fewer than train.micro_batch_size={cfg.micro_batch_size}")
        if cfg.max_steps is not None:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = math.floor(cfg.epochs * micro_per_epoch / cfg.grad_accum)
            if self.total_steps < 1:
                raise ConfigError(f"train.epochs={cfg.epochs} gives no optimizer step "
                                  f"({micro_per_epoch} micro-batches per epoch, grad_accum {cfg.grad_accum})")
        self.loader = DataLoader(
            parts.train_dataset, batch_size=cfg.micro_batch_size, sampler=self.sampler, drop_last=True,
            collate_fn=SkipAwareCollate(parts.collate_fn), num_workers=cfg.num_workers,
            # Its own generator: creating an iterator must not draw from the global RNG, or a
            # resumed run's dropout masks would differ from the uninterrupted run's.
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        self.eval_loader = None
        if parts.eval_dataset is not None:
            self.eval_loader = DataLoader(
                parts.eval_dataset, batch_size=cfg.micro_batch_size,
                sampler=ShardedEvalSampler(len(parts.eval_dataset), dist_info.rank, dist_info.world_size),
                collate_fn=SkipAwareCollate(parts.collate_fn), num_workers=cfg.num_workers, drop_last=needs_multiple,
            )

        # Before any checkpoint is loaded: restored buffers must win over the schedule's set-up.
        configure_moe_schedule(model, self.total_steps)
        self._moe_layers = [layer for _, layer in moe_layers(model)]  # found once, not per forward
        self.backend: Backend = self._build_backend(model, optimizer)
        self.module = self.backend.module
        self.schedule = WarmupCosineSchedule(self.total_steps, run.optim.warmup_ratio, run.optim.schedule,
                                             run.optim.min_lr_ratio)
        self.state = TrainerState(world_size=dist_info.world_size, micro_batch_size=cfg.micro_batch_size,
                                  grad_accum=cfg.grad_accum, schedule=self.schedule.state_dict(),
                                  run_config=run.to_dict())
        self.resumed_from = resolve_resume(cfg.resume, self.output_dir)
        if self.resumed_from is not None:
            self._load(self.resumed_from)
        self._stop_requested = False
        # Fixed for the run so every step (and rank) reduces the same vector; a step may
        # produce fewer (CompeteSMoE's competition losses exist only on competition steps).
        self._aux_names = aux_loss_names(self.module)
        self.phases: PhaseTimes | None = None
        self.skipped_samples: Counter[str] = Counter()  # by reason, this process, since start
        self.empty_steps = 0  # steps whose every micro-batch was skipped whole: no update (since start)

    def _phase(self, name: str):
        return self.phases(name) if self.phases is not None else nullcontext()

    def _build_sampler(self, dataset) -> ResumableSampler | ModalityLengthGroupedSampler:
        cfg, d = self.cfg, self.dist
        if not cfg.group_by_modality_length:
            return ResumableSampler(len(dataset), seed=cfg.seed, rank=d.rank, world_size=d.world_size)
        found = modality_lengths(dataset)
        if found is None:
            raise ConfigError(f"train.group_by_modality_length=true needs a dataset that records each sample's length "
                              f"and modality (as the vlm task's does); task {self.run.task!r} gives a "
                              f"{type(dataset).__name__}, which does not")
        lengths, has_image = found
        return ModalityLengthGroupedSampler(lengths, has_image, cfg.micro_batch_size, seed=cfg.seed,
                                            num_replicas=d.world_size, rank=d.rank)

    def _build_backend(self, model, optimizer) -> Backend:
        if self.cfg.backend == "deepspeed":
            from llava_smoe.training.deepspeed_backend import DeepSpeedBackend

            return DeepSpeedBackend(model, optimizer, self.cfg, self.dist, self._moe_layers)
        return TorchBackend(model, optimizer, self.cfg, self.dist, self._moe_layers,
                            expert_parallel=self.expert_parallel)

    def _load(self, ckpt: Path) -> None:
        state = load_checkpoint(ckpt, self.backend)
        for key in ("world_size", "micro_batch_size", "grad_accum"):
            if getattr(state, key) != getattr(self.state, key):
                raise ConfigError(
                    f"checkpoint {ckpt} was written with {key}={getattr(state, key)}, this run has "
                    f"{getattr(self.state, key)}: the data position would not line up; use the same value"
                )
        self.schedule.check_matches(state.schedule)
        state.run_config = self.state.run_config
        self.state = state
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d, sample %d)", ckpt, state.step, state.epoch, state.index)

    # -- data -----------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[Any]:
        """Endless micro-batches from the saved position; the position moves as they are taken."""
        mbs = self.cfg.micro_batch_size
        while True:
            self.sampler.set_position(self.state.epoch, self.state.index)
            kept, dropped = False, Counter()
            for batch in self.loader:
                self.state.index += mbs
                if isinstance(batch, EmptyBatch):
                    dropped.update(batch.skipped)
                else:
                    kept = True
                yield batch
            if not kept:  # else the run would step through max_steps on nothing
                raise ConfigError(f"every sample of epoch {self.state.epoch} was skipped "
                                  f"({_reasons(dropped)}): nothing to train on; check the data, or raise "
                                  "the limit that drops them (max_length for too_long)")
            self.state.epoch += 1
            self.state.index = 0

    def _drop_empty(self, batch: EmptyBatch, where: str) -> None:
        """An EmptyBatch is left out where one process trains with the torch back end; elsewhere
        every rank (and DeepSpeed's micro-step count) needs each micro-batch, so it stops the run."""
        if self.dist.world_size > 1 or self.cfg.backend == "deepspeed":
            rank = f" on rank {self.dist.rank}" if self.dist.world_size > 1 else ""
            raise ConfigError(
                f"{where}: a micro-batch of {self.cfg.micro_batch_size} had every sample skipped{rank} "
                f"({_reasons(batch.skipped)}); with several processes or DeepSpeed each micro-batch must keep a "
                "sample: raise train.micro_batch_size or the limit that drops them (max_length for too_long)")
        self.skipped_samples.update(batch.skipped)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        main = self.dist.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "run_config.yaml").write_text(yaml.safe_dump(self.run.to_dict(), sort_keys=False))
            if self.resumed_from is not None:
                truncate_metrics(self.output_dir / METRICS_FILE, state.step)
        logger = MetricsLogger(self.output_dir, enabled=main, total_steps=self.total_steps, initial_step=state.step,
                               tensorboard=cfg.tensorboard, progress_bar=cfg.progress_bar)
        previous_handler = self._install_sigterm()
        try:
            return self._loop(logger)
        finally:
            logger.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)

    def _loop(self, logger: MetricsLogger) -> TrainResult:
        cfg, state = self.cfg, self.state
        if self.resumed_from is not None:
            load_rng(self.resumed_from, self.dist)  # last, so nothing between here and step 1 draws
        self.module.train()
        batches = self._micro_batches()
        interval = _Interval()
        last_saved: Path | None = self.resumed_from
        status, message = "completed", f"trained {self.total_steps} steps"
        first_step = state.step
        while state.step < self.total_steps:
            lrs = self.schedule.apply(self.backend.param_groups, state.step)
            stats = self._accumulate(batches)
            if stats is None:  # every micro-batch of the step was skipped whole (one process only)
                self.backend.skip_step()
                self.empty_steps += 1
                logger.write(f"step {state.step + 1}: every sample of its micro-batches was skipped; no update "
                             f"({self.empty_steps} such steps)")
                lm_loss, aux, tokens, stop_votes, grad_norm = 0.0, {}, 0, int(self._stop_requested), None
                finite = None
            else:
                lm_loss, aux, tokens, stop_votes, grad_norm = stats
                loss = lm_loss + sum(aux.values())
                finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
            if finite:
                with self._phase("optimizer"):
                    norm_after = self.backend.step()
                grad_norm = norm_after if norm_after is not None else grad_norm
                with self._phase("moe_step"):
                    moe_optimizer_step(self.module, state.step + 1)
                interval.add(loss, lm_loss, aux, grad_norm)
            elif finite is not None:
                self.backend.skip_step()
                state.nonfinite += 1
                bad = f"loss={loss}" + ("" if grad_norm is None else f", grad_norm={grad_norm}")
                logger.write(f"step {state.step + 1}: non-finite {bad}; step skipped, no update "
                             f"({state.nonfinite}/{cfg.max_nonfinite} allowed)")
            interval.tokens += tokens
            state.step += 1
            logger.advance()
            step = state.step
            if self.phases is not None:
                self.phases.end_step()

            if state.nonfinite >= cfg.max_nonfinite:
                status = "nonfinite"
                message = (f"stopped at step {step}: {state.nonfinite} non-finite steps reached "
                           f"train.max_nonfinite={cfg.max_nonfinite}; last checkpoint: {last_saved or 'none'}. "
                           "Lower the learning rate or check the data, then resume from that checkpoint.")
            if step % cfg.log_every == 0 or step == self.total_steps or status != "completed":
                with self._phase("log"):
                    record = interval.record(step, state.epoch, lrs, state.nonfinite, self.module)
                    record.update({f"data/skipped/{k}": v for k, v in self.skipped_samples.items()})
                    if self.empty_steps:
                        record["data/empty_steps"] = self.empty_steps
                    logger.log(record)
                interval = _Interval()
            if status != "completed":
                break
            if self.eval_loader is not None and cfg.eval_every and step % cfg.eval_every == 0:
                logger.log({"step": step, **self.evaluate()})
                interval.restart_clock()
            if cfg.save_every and step % cfg.save_every == 0:
                last_saved = self._save()
                interval.restart_clock()
            if stop_votes:
                if not _is_checkpoint_of(last_saved, step):
                    last_saved = self._save()
                status, message = "interrupted", f"stopped on SIGTERM at step {step}; checkpoint {last_saved}"
                break

        if self.empty_steps and self.empty_steps == state.step - first_step:  # a run shorter than an epoch
            raise ConfigError(f"every sample of all {self.empty_steps} steps was skipped "
                              f"({_reasons(self.skipped_samples)}): nothing was trained; check the data, or raise "
                              "the limit that drops them (max_length for too_long)")
        result = TrainResult(status, state.step, message, checkpoint=last_saved)
        if status == "completed":
            if not _is_checkpoint_of(last_saved, state.step):
                result.checkpoint = self._save()
            if self.eval_loader is not None and (not cfg.eval_every or state.step % cfg.eval_every):
                logger.log({"step": state.step, **self.evaluate()})
            if self.parts.export_fn is not None:
                result.export_dir = self.output_dir / "final"
                self.backend.export(self.parts.export_fn, result.export_dir)
                distributed.barrier()
        logger.write(message)
        return result

    def _loss_items(self, micro: list[Any]) -> float | None:
        """The step's supervised tokens over every micro-batch and rank (None: the task's loss is
        not per token). Counted on the host before the batches move; one scalar all-reduce."""
        count = self.parts.count_loss_items
        if count is None:
            return None
        total = torch.tensor(float(sum(count(b) for b in micro)), device=self.dist.device)
        if self.dist.enabled and self.dist.world_size > 1:
            dist.all_reduce(total)
        return max(total.item(), 1.0)  # a step without supervised tokens has an LM loss of 0

    def _accumulate(self, batches: Iterator[Any]) -> tuple[float, dict[str, float], int, int, float | None] | None:
        """Forward/backward over grad_accum micro-batches; one all-reduce and one host sync. None:
        every micro-batch was skipped whole, nothing ran."""
        world = self.dist.world_size
        with self._phase("data"):
            micro = [next(batches) for _ in range(self.cfg.grad_accum)]
        for batch in micro:
            if isinstance(batch, EmptyBatch):
                self._drop_empty(batch, f"step {self.state.step + 1}")
            elif isinstance(batch, dict) and "skipped" in batch:  # samples a data policy dropped
                self.skipped_samples.update(batch.pop("skipped"))
        micro = [b for b in micro if not isinstance(b, EmptyBatch)]
        if not micro:
            return None
        ga = len(micro)  # the mean over the micro-batches that ran
        tokens = sum(self.parts.count_tokens(b) for b in micro)
        items = self._loss_items(micro)
        sums: torch.Tensor | None = None
        for i, batch in enumerate(micro):
            with self._phase("data"):
                batch = to_device(batch, self.dist.device)
            if items is not None:
                # The loss comes back as summed token losses / (step tokens / world): data-parallel
                # gradient averaging then makes it the mean over the step's tokens.
                batch["num_items_in_batch"] = items / world
            boundary = i == ga - 1
            with self.backend.accumulation(boundary):
                with self._phase("forward"):
                    out, aux = self.backend.forward(batch)
                with self._phase("aux"):
                    undeclared = set(aux) - set(self._aux_names)
                    if undeclared:
                        raise RuntimeError(f"MoE layers returned undeclared aux losses {sorted(undeclared)}; "
                                           f"declared: {self._aux_names} (see Router.aux_loss_names)")
                    lm_loss = out.loss if items is not None else out.loss / ga
                    total = lm_loss + sum(aux.values()) / ga if aux else lm_loss
                with self._phase("backward"):
                    self.backend.backward(total, boundary)
            zero = out.loss.detach().float().new_zeros(())
            parts = torch.stack([lm_loss.detach().float(), *(aux[k].detach().float() / ga if k in aux else zero
                                                             for k in self._aux_names)])
            sums = parts if sums is None else sums + parts
        with self._phase("sync"):
            vec = torch.cat([sums, torch.tensor([float(tokens), float(self._stop_requested)], device=sums.device)])
            if self.dist.enabled and self.dist.world_size > 1:
                dist.all_reduce(vec)
                vec[:-2] /= self.dist.world_size
            grad_norm = self.backend.grad_norm_before_step()
            if grad_norm is not None:
                vec = torch.cat([vec, grad_norm.detach().float().reshape(1).to(vec.device)])
            host = vec.tolist()  # the step's single device -> host sync
        n = 1 + len(self._aux_names)
        aux_vals = dict(zip(self._aux_names, host[1:n], strict=True))
        return host[0], aux_vals, int(host[n]), int(host[n + 1]), (host[n + 2] if grad_norm is not None else None)

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")  # train.compile: no graphs for no-grad passes
    def evaluate(self) -> dict[str, float]:
        """The eval record: mean LM loss over the eval set (all ranks), `eval/loss`, and the samples
        a data policy dropped, by reason (this process), `eval/skipped/<reason>`; eval routing is
        kept out of training stats."""
        self.module.eval()
        totals = torch.zeros(2, device=self.dist.device)
        skipped: Counter[str] = Counter()
        for batch in self.eval_loader:
            if isinstance(batch, EmptyBatch):
                self._drop_empty(batch, "evaluation")
                skipped.update(batch.skipped)
                continue
            if isinstance(batch, dict) and "skipped" in batch:
                skipped.update(batch.pop("skipped"))
            out, _ = self.backend.forward(to_device(batch, self.dist.device))
            totals += torch.stack([out.loss.detach().float(), torch.ones((), device=totals.device)])
        if self.dist.enabled and self.dist.world_size > 1:
            dist.all_reduce(totals)
        if not totals[1].item():
            raise ConfigError(f"every evaluation sample was skipped ({_reasons(skipped)}): no eval/loss; check the "
                              "eval data, or raise the limit that drops them (max_length for too_long)")
        extra = self.parts.evaluate_fn(self.module) if self.parts.evaluate_fn is not None else {}
        routing_stats(self.module, reset=True)
        self.module.train()
        return {"eval/loss": (totals[0] / totals[1].clamp(min=1)).item(), **extra,
                **{f"eval/skipped/{k}": v for k, v in skipped.items()}}

    def _save(self) -> Path:
        return save_checkpoint(checkpoint_root(self.output_dir), self.state, self.backend, self.dist,
                               self.cfg.keep_last)

    def _install_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum, frame):
            self._stop_requested = True

        return signal.signal(signal.SIGTERM, request_stop)


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


def _is_checkpoint_of(path: Path | None, step: int) -> bool:
    return path is not None and read_state(path).step == step


class _Interval:
    """Host-side sums between two log steps."""

    def __init__(self) -> None:
        self.steps = 0
        self.loss = 0.0
        self.lm_loss = 0.0
        self.aux: dict[str, float] = {}
        self.grad_norm: torch.Tensor | float = 0.0
        self.tokens = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, loss: float, lm_loss: float, aux: dict[str, float], grad_norm) -> None:
        self.steps += 1
        self.loss += loss
        self.lm_loss += lm_loss
        for k, v in aux.items():
            self.aux[k] = self.aux.get(k, 0.0) + v
        if grad_norm is not None:  # a device tensor under DeepSpeed: no sync until the log step
            self.grad_norm = self.grad_norm + grad_norm

    def record(self, step: int, epoch: int, lrs: dict[str, float], nonfinite: int, module) -> dict[str, Any]:
        n = max(1, self.steps)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rec: dict[str, Any] = {"step": step, "epoch": epoch}
        if self.steps:
            rec.update(loss=self.loss / n, lm_loss=self.lm_loss / n)
            rec.update({f"aux/{k}": v / n for k, v in self.aux.items()})
            rec["grad_norm"] = float(self.grad_norm) / n
        rec["lr"] = next(iter(lrs.values()))
        rec.update({f"lr/{k}": v for k, v in lrs.items()})
        rec["tokens_per_s"] = self.tokens / elapsed
        rec["interval_s"] = elapsed  # training time since the last record (evaluation and saving excluded)
        rec["nonfinite"] = nonfinite
        rec.update(flatten_routing(routing_stats(module, reset=True)))
        return rec
