"""Train ML-Mamba: stage 1 "align" (connector only), stage 2 "finetune" (connector + LM); vision always frozen.
Before them, a "pretrain" stage can train the LM alone on text-only data (--pretrain-data): the synthetic world has no
pretrained LM, so its default run first teaches its tiny LM the world's language, each scene written out in words.

    python train.py                      # no download: the synthetic world and a tiny ML-Mamba, pretrain, align,
                                         # finetune, then held-out accuracy per question family
    python train.py --stage finetune --data llava_v1_5_mix665k.json --image-root DIR \\
        --llm mamba2-2.7b --dinov2 dinov2-large --siglip siglip-so400m-patch14-384 --tokenizer gpt-neox-20b
    torchrun --nproc_per_node=8 train.py ...        # one process per GPU, the model sharded (FSDP; or --parallel ddp)

Presets, one file each in config/: "synthetic" (the default), "paper" (the default with --data; Table 1) and
"release" (the authors' one-stage recipe). An option given on the command line overrides its preset's value.
The run folder (run_folder.py) holds the log and checkpoints; `--resume` continues with the same batches in the same
order, so it ends where an uninterrupted run would. A NaN or infinite loss stops the run, naming the step.
"""

import argparse
import importlib.util
import math
import runpy
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from cli import (USER_ERRORS, fraction, nonnegative_float, nonnegative_int, option, parser_for, positive_float,
                 positive_int, report_user_error)
from data import DataFiles, LLaVADataset, StageBatches, collate
from distributed import Process, setup_distributed, shard
from model import IGNORE_INDEX, MLMamba, from_components
from run_folder import (FULL_STATE, STAGES, RunLog, check_run_folder, flops_per_token, full_state, latest_checkpoint,
                        peak_flops, resume_stage, save_checkpoint, speed, taken)
from synthetic import prepare_world, world_files, world_model, world_tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Configuration: a preset, then the options given on the command line; frozen once parsed
# ----------------------------------------------------------------------------------------------------------------

SYNTHETIC = "the synthetic world (when no --data is given)"


@dataclass(frozen=True)
class TrainConfig:
    """Every training option, declared once (the command line is built from these fields); a preset (config/)
    replaces some defaults and the options given replace those."""
    preset: str = option("synthetic", "config/PRESET.py; default: synthetic, or paper with --data",
                         choices=["synthetic", "paper", "release"])
    stage: str = option("all", "all: pretrain (when there is text data), align, finetune; both: align, finetune",
                        choices=["pretrain", "align", "finetune", "both", "all"])
    data: str = option(None, "LLaVA-format JSON; default: the synthetic world (built if missing)")
    image_root: str = option(None, "folder the samples' image paths are relative to (default: the JSON's)")
    pretrain_data: str = option(None, "text-only LLaVA-format JSON for the pretrain stage (synthetic: text.json)")
    llm: str = option(None, "Mamba-2 checkpoint folder or repo id (real runs)")
    siglip: str = option(None, "SigLIP checkpoint folder or repo id")
    dinov2: str = option(None, "DINOv2 checkpoint folder or repo id")
    tokenizer: str = option(None, "tokenizer.json or its folder (real runs: GPT-NeoX-20B's)")
    init_from: str = option(None, "an ML-Mamba folder to start from (another --connector or --scan: a new one)")
    connector: str = option(None, "default msc-advanced (with --init-from: the folder's)",
                            choices=["mlp", "msc-basic", "msc-advanced", "msc-release"])
    scan: str = option(None, "default bsm (with --init-from: the folder's)", choices=["bsm", "csm"])
    prompt: str = option("in-out", "a new model's prompt format (zephyr: the authors' release's)",
                         choices=["in-out", "zephyr"])
    drop_path: float = option(0.1, "the MSC blocks' stochastic depth", type=fraction)
    image_size: int = option(384, "encoder input size (real runs)", type=positive_int)
    out: str = option("runs/synthetic", "the run folder")
    pretrain_epochs: float = option(40, "text-only pretrain epochs", type=nonnegative_float)
    align_epochs: float = option(1, "align epochs", type=nonnegative_float)
    epochs: float = option(20, "finetune epochs", type=nonnegative_float)
    lr: float = option(1e-3, "finetune and pretrain lr", type=positive_float)
    align_lr: float = option(1e-4, "align lr", type=positive_float)
    connector_lr: float = option(None, "the connector's finetune lr (default: --lr)", type=positive_float)
    weight_decay: float = option(0.1, type=nonnegative_float)
    warmup_ratio: float = option(0.03, type=fraction)
    global_batch: int = option(32, type=positive_int)
    per_device_batch: int = option(None, "default: the global batch / processes", type=positive_int)
    max_grad_norm: float = option(1.0, type=positive_float)
    precision: str = option("auto", "auto (the paper's default): bf16 autocast on CUDA; the synthetic preset: fp32",
                            choices=["auto", "fp32", "bf16"])
    gradient_checkpointing: bool = option(False, "recompute each LM block's activations in the backward (with "
                                          "--compile: all but in_proj's product)", action="store_true")
    compile: bool = option(False, "the connector, the LM blocks and the frozen encoders through torch.compile, their "
                           "fused kernels' settings timed at the first step (the paper preset's default on CUDA)",
                           action=argparse.BooleanOptionalAction)
    parallel: str = option("fsdp", "under torchrun: shard the model over the processes (FSDP) or replicate it (DDP)",
                           choices=["fsdp", "ddp"])
    workers: int = option(0, "data-loading worker processes", type=nonnegative_int)
    save_every: int = option(200, "steps between checkpoints", type=positive_int)
    log_every: int = option(25, "steps between progress lines", type=positive_int)
    resume: bool = option(False, "continue the run in --out from its latest checkpoints", action="store_true")
    overwrite: bool = option(False, "delete the run in --out and start over", action="store_true")
    max_steps: int = option(None, "stop each stage after this many steps", type=positive_int)
    seed: int = option(0, "initialization, batch order, stochastic depth", type=nonnegative_int)
    device: str = option("cpu", "default: cuda when available, else cpu")
    fast: str = option("auto", "fast_train.DeviceSteps (auto: the synthetic world on one GPU)",
                       choices=["auto", "on", "off"])
    no_eval: bool = option(False, action="store_true")
    synthetic_dir: str = option("data/synthetic", "where the world is built", group=SYNTHETIC)
    world_seed: int = option(0, "the world's seed (runs that differ in --seed share one world)", group=SYNTHETIC,
                             type=nonnegative_int)
    extra_spatial: int = option(0, "spatial questions added to each training conversation that can pose one",
                                group=SYNTHETIC, type=nonnegative_int)
    describe: bool = option(False, "each training conversation ends by asking for the scene in words (a GPU's preset)",
                            group=SYNTHETIC, action=argparse.BooleanOptionalAction)
    lm_width: int = option(96, "the LM's d_model (a GPU's preset: 192)", group=SYNTHETIC, type=positive_int)
    lm_layers: int = option(3, "the LM's layers", group=SYNTHETIC, type=positive_int)
    patch: int = option(16, "the encoders' patch in px: 16, a token per cell; 8 (a CPU's preset), 2 x 2 tokens a cell",
                        group=SYNTHETIC, type=int, choices=[16, 8])

    def uses_bf16(self, device):
        """bf16 autocast on fp32 weights: --precision bf16, or auto on CUDA."""
        return self.precision == "bf16" or (self.precision == "auto" and device.startswith("cuda"))


PRESET_DIR = Path(__file__).resolve().parent / "config"  # one file a preset, as nanoGPT's config/*.py


def parse_args(argv=None):
    preset_names = {name for f in PRESET_DIR.glob("*.py") for name in preset_values(f.stem, "cuda")}
    p = parser_for(TrainConfig, preset_names, description=__doc__)
    given = vars(p.parse_args(argv))  # only the options given: the others keep their preset's value
    if given.get("resume") and given.get("overwrite"):
        p.error("--resume continues the run in --out and --overwrite deletes it: give one")
    preset = given.get("preset") or ("paper" if given.get("data") else "synthetic")
    device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return TrainConfig(**{**preset_values(preset, device), **given, "device": device, "preset": preset})


def preset_values(preset, device):
    """config/PRESET.py's settings, plain assignments (its on_cuda ones added on CUDA)."""
    values = {k: v for k, v in runpy.run_path(str(PRESET_DIR / f"{preset}.py")).items() if not k.startswith("__")}
    on_cuda = values.pop("on_cuda", {})
    return {**values, **on_cuda} if device.startswith("cuda") else values


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------

def prepare_data(cfg, proc, log):
    """The run's DataFiles; the synthetic world is built first if missing or built with other settings."""
    if cfg.data is not None:
        for flag, path in (("--data", cfg.data), ("--pretrain-data", cfg.pretrain_data)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{flag} file not found: {path}")
        return DataFiles(Path(cfg.data), cfg.image_root, cfg.pretrain_data)
    if proc.rank == 0:
        prepare_world(cfg.synthetic_dir, log, seed=cfg.world_seed, extra_spatial=cfg.extra_spatial,
                      describe=cfg.describe)
    if proc.world_size > 1:
        dist.barrier()
    files = world_files(cfg.synthetic_dir)
    return replace(files, pretrain_json=cfg.pretrain_data or files.pretrain_json)


def connector_choice(cfg):
    """The connector fields given on the command line (ConnectorConfig's defaults for the others)."""
    return {k: v for k, v in (("kind", cfg.connector), ("scan", cfg.scan)) if v is not None}


def build_model(cfg, files, log=print):
    """The model a run starts from: --init-from's folder (with a new connector if another kind is asked), the
    synthetic default, or a new ML-Mamba assembled from public checkpoints."""
    if cfg.init_from:
        model = MLMamba.from_pretrained(cfg.init_from)
        if cfg.prompt != model.config.prompt and cfg.prompt != TrainConfig.prompt:
            raise ValueError(f"{cfg.init_from} is a model with the {model.config.prompt!r} prompt; a model's prompt "
                             "format is chosen when it is built (drop --prompt)")
        saved, asked = model.config.connector, connector_choice(cfg)
        if any(getattr(saved, k) != v for k, v in asked.items()):
            # the paper's ablations (Tables 6-7): one pretrained LM, a new connector of each kind; the folder's
            # LM, encoders and tokenizer are kept, its connector is dropped
            torch.manual_seed(cfg.seed)
            model.new_connector(replace(saved, drop_path=cfg.drop_path, **asked))
            cc = model.config.connector
            log(f"a new {cc.kind}/{cc.scan} connector on {cfg.init_from}'s LM (its connector, "
                f"{saved.kind}/{saved.scan}, is not used)")
        return model
    if cfg.data is None:  # synthetic: a tokenizer trained on the training conversations, saved with the model
        tokenizer = world_tokenizer([files.train_json, files.pretrain_json], cfg.prompt)
        torch.manual_seed(cfg.seed)
        return world_model(tokenizer, cfg.lm_width, cfg.lm_layers, cfg.prompt, cfg.patch, drop_path=cfg.drop_path,
                           **connector_choice(cfg))
    missing = [n for n in ("llm", "tokenizer") if getattr(cfg, n) is None]
    missing += ["siglip and / or --dinov2"] if cfg.siglip is None and cfg.dinov2 is None else []
    if missing:
        raise ValueError(f"training on --data needs --{', --'.join(missing)} (or --init-from an ML-Mamba folder)")
    torch.manual_seed(cfg.seed)
    encoders = {name: path for name, path in (("dinov2", cfg.dinov2), ("siglip", cfg.siglip)) if path is not None}
    return from_components(cfg.llm, encoders, cfg.tokenizer, prompt=cfg.prompt, input_size=cfg.image_size,
                                   connector={"drop_path": cfg.drop_path, **connector_choice(cfg)})


def dataset_for(model, json_path, image_root=None, cache_images=False):
    return LLaVADataset(json_path, image_root, model.tokenizer, model.image_token_id, model.num_image_tokens,
                        model.vision.preprocess, cache_images=cache_images, prompt=model.config.prompt)


def lr_factor(step, total, warmup):
    """Linear warmup to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, lr, weight_decay, connector_lr=None, fused=False):
    """AdamW; no weight decay on biases, norms and the SSM's A_log, D, dt_bias (1-D tensors). connector_lr: the
    connector's own lr (default: lr; LLaVA's mm_projector_lr): the LM's pre-norm blocks divide out the image tokens'
    scale, so at too high an lr their norm grows by orders of magnitude and learning stalls (docs/synthetic-world.md).
    fused: one kernel for the whole update (CUDA)."""
    connector = {id(p) for p in model.connector.parameters()}
    groups = []
    for is_connector in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in connector) == is_connector]
        group_lr = connector_lr if is_connector and connector_lr is not None else lr
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": group_lr},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": group_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), fused=fused or None)


# ----------------------------------------------------------------------------------------------------------------
# One stage
# ----------------------------------------------------------------------------------------------------------------

class TrainingError(RuntimeError):
    """Training cannot go on (a NaN or infinite loss); the message names the step and the last good checkpoint."""


def stage_batches(stage, dataset, cfg, proc):
    """The stage's StageBatches from step 0: its epochs, seed, global batch and micro-batches, checked."""
    epochs = {"pretrain": cfg.pretrain_epochs, "align": cfg.align_epochs, "finetune": cfg.epochs}[stage]
    n = len(dataset)
    per_epoch = n // cfg.global_batch
    if per_epoch == 0:
        raise ValueError(f"{dataset.json_path}: {n} usable samples ({len(dataset.problems)} set aside as malformed) "
                         f"are fewer than one global batch of {cfg.global_batch}")
    total = min(max(1, int(epochs * per_epoch)), cfg.max_steps or math.inf)
    micro = cfg.per_device_batch or cfg.global_batch // proc.world_size
    return StageBatches(n, cfg.global_batch, micro, seed=cfg.seed + 1000 * (STAGES.index(stage) - 1), start=0,
                        total=total, rank=proc.rank, world_size=proc.world_size)


@dataclass
class Stage:
    """One stage's loop state; start: its first step (after --resume); later_samples: the next stages' (the ETA)."""
    name: str
    batches: StageBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dir: Path
    start: int
    done: bool
    last_good: Path = None
    later_samples: int = 0


def clip_and_update(optimizer, params, max_norm):
    """The gradients clipped to a global norm of max_norm, then the optimizer's step; returns the norm before
    clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    return grad_norm


class PlainSteps:
    """The paper's recipe: micro-batches from a DataLoader, each forward and backward under bf16 autocast, gradients
    summed over micro-batches and processes, then clipping and the optimizer. steps(step) runs step `step` (0-based):
    (loss, grad-norm, tokens), the loss a CPU tensor, or None when every sample of the batch was skipped.
    update(optimizer, params, max_norm): `clip_and_update` or fast_train.clip_in_update."""

    def __init__(self, model, dataset, st, cfg, proc, log, update=clip_and_update):
        self.model, self.st, self.cfg, self.proc, self.log = model, st, cfg, proc, log
        self.update = update
        self.wrapped = model  # what the forward goes through: FSDP's model is sharded in place (train()), DDP wraps it
        if proc.world_size > 1 and cfg.parallel == "ddp":
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=None if proc.device == "cpu" else [proc.device])
        # the loader draws its seeds from a generator of its own: the global RNG draws the stochastic depth
        self.loader = iter(torch.utils.data.DataLoader(
            dataset, batch_sampler=replace(st.batches, start=st.start), collate_fn=collate, num_workers=cfg.workers,
            pin_memory=proc.device.startswith("cuda"), generator=torch.Generator()))
        self.skipped = set()

    def __call__(self, step):
        micro_batches = [next(self.loader) for _ in range(self.st.batches.micro_per_step())]
        for reason in (r for b in micro_batches for r in b["skipped"] if r not in self.skipped):
            self.skipped.add(reason)
            self.log(f"[{self.st.name}] skipping {reason}")
        loss, grad_norm = self.train_step(micro_batches)
        if loss is None:
            self.log(f"[{self.st.name}] step {step + 1}: every sample of the batch was skipped; no update")
        return loss, grad_norm, sum(b["tokens"] for b in micro_batches) * self.proc.world_size

    def train_step(self, micro_batches):
        """One optimizer step over this process's micro-batches of a global batch; (loss, grad-norm) as tensors.

        The loss is the mean over every target token of the global batch: each micro-batch's summed loss is divided
        by the global count, so one process and N processes, one micro-batch or many, compute the same step."""
        st, cfg, proc = self.st, self.cfg, self.proc
        n_tokens = torch.tensor(float(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro_batches
                                          if b["labels"] is not None)))
        if proc.world_size > 1:
            dist.all_reduce(n_tokens)
        step_loss = torch.zeros((), device=proc.device)
        for batch in micro_batches:
            if batch["input_ids"] is None:  # every sample of this micro-batch was skipped
                continue
            px = batch["pixel_values"]
            pixels = {n: v.to(proc.device, non_blocking=True) for n, v in px.items()} if px else None
            ids, labels = (batch[k].to(proc.device, non_blocking=True) for k in ("input_ids", "labels"))
            with torch.autocast(proc.device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.uses_bf16(proc.device)):
                _, loss_sum = self.wrapped(pixels, ids, labels, loss_reduction="sum", return_logits=False)
            if loss_sum is None:  # no target token in this micro-batch
                continue
            (loss_sum / n_tokens.clamp(min=1) * proc.world_size).backward()  # DDP and FSDP average over ranks
            step_loss += loss_sum.detach()
        if n_tokens == 0:  # every sample of the global batch was skipped: no update, the schedule goes on
            st.optimizer.zero_grad(set_to_none=True)
            st.scheduler.step()
            return None, None
        if proc.world_size > 1:
            dist.all_reduce(step_loss)
        grad_norm = self.update(st.optimizer, [p for p in self.model.parameters() if p.requires_grad],
                                cfg.max_grad_norm)  # the whole gradient's norm, also under FSDP
        if isinstance(grad_norm, torch.distributed.tensor.DTensor):
            grad_norm = grad_norm.full_tensor()
        st.scheduler.step()
        st.optimizer.zero_grad(set_to_none=True)
        return step_loss.cpu() / n_tokens.clamp(min=1), grad_norm

    def finish(self):
        if self.skipped:
            self.log(f"[{self.st.name}] skipped {len(self.skipped)} sample(s) with a missing or unusable image or text")


def begin_stage(stage, model, dataset, cfg, proc, log, later_samples=0):
    """A Stage: the trainable parts logged, the batches, the optimizer (fused AdamW on CUDA) and lr schedule, with
    --resume the stage's latest checkpoint loaded, and the model in training mode."""
    parts = sorted({n.split(".")[0] for n in model.set_stage(stage)})
    log(f"[{stage}] trainable: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M "
        f"parameters in {len(parts)} parts ({', '.join(parts)}); vision frozen")
    batches = stage_batches(stage, dataset, cfg, proc)
    optimizer = make_optimizer(model, cfg.align_lr if stage == "align" else cfg.lr, cfg.weight_decay,
                               connector_lr=cfg.connector_lr if stage == "finetune" else None,
                               fused=proc.device.startswith("cuda"))  # after shard()
    total, warmup = batches.total, max(1, int(cfg.warmup_ratio * batches.total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    stage_dir = Path(cfg.out) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    start, done = resume_stage(stage_dir, model, optimizer, scheduler, log) if cfg.resume else (0, False)
    model.lm.gradient_checkpointing = cfg.gradient_checkpointing and not cfg.compile  # compiled blocks do their own
    model.train()
    return Stage(stage, batches, optimizer, scheduler, stage_dir, start, done, latest_checkpoint(stage_dir),
                 later_samples)


def check_finite(unchecked, st):
    """unchecked: [(step, loss)] not yet checked, losses as tensors (on the device: one host sync for all); raises a
    TrainingError at the first NaN / inf one, naming the step and the last good checkpoint."""
    losses = torch.stack([loss for _, loss in unchecked])
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step, last = unchecked[int(bad[0, 0])][0], unchecked[-1][0]
        checked = f" (checked after step {last + 1})" if losses.device.type != "cpu" else ""  # not checked at each step
        raise TrainingError(f"[{st.name}] loss is {float(losses[int(bad[0, 0])])} at step {step + 1}{checked}: "
                            f"stopping. The last good checkpoint is {st.last_good or 'none (none written yet)'}")


def run_stage(stage, model, dataset, cfg, proc=None, log=print, on_step=None, later_samples=0, steps_for=PlainSteps):
    """Train one stage, resuming from its latest checkpoint with --resume; returns the model (unwrapped).
    steps_for(model, dataset, st, cfg, proc, log): `PlainSteps` (`stage_steps` may give it its update) or
    fast_train.DeviceSteps. The loss is checked at every progress line and checkpoint (and every step on the CPU,
    with no host sync to save). on_step(step): called after every optimizer step. later_samples: the samples of the
    stages after this one (the run's ETA)."""
    proc = proc or Process(device=cfg.device)
    st = begin_stage(stage, model, dataset, cfg, proc, log, later_samples=later_samples)
    if st.done:
        return model
    steps = steps_for(model, dataset, st, cfg, proc, log)
    peak = peak_flops(proc.device) if cfg.uses_bf16(proc.device) else None  # MFU: bf16 runs on a known GPU
    mfu_basis = (flops_per_token(model), peak * proc.world_size) if peak else None
    t0, seen, tokens, unchecked = time.time(), 0, 0, []
    for step in range(st.start, st.batches.total):
        loss, grad_norm, n_tokens = steps(step)
        seen, tokens = seen + cfg.global_batch, tokens + n_tokens
        log_due = (step + 1) % cfg.log_every == 0 or step + 1 == st.batches.total or step == st.start
        save_due = (step + 1) % cfg.save_every == 0 or step + 1 == st.batches.total
        if loss is not None:
            unchecked.append((step, loss))
        if unchecked and (log_due or save_due or unchecked[-1][1].device.type == "cpu"):  # check, then checkpoint
            check_finite(unchecked, st)
            unchecked = []
        if loss is not None and log_due:
            log(f"[{st.name}] step {step + 1}/{st.batches.total} epoch {step // st.batches.steps_per_epoch() + 1} "
                f"loss {float(loss):.4f} grad-norm {float(grad_norm):.3g} lr {st.scheduler.get_last_lr()[0]:.2e} "
                + speed(seen, tokens, time.time() - t0, (st.batches.total - step - 1) * cfg.global_batch,
                        st.later_samples, mfu_basis))
        if save_due:  # every process gathers FSDP's shards, rank 0 writes
            model_state, optimizer_state = full_state(model, st.optimizer)
            if proc.rank == 0:
                st.last_good = save_checkpoint(st.dir, model, model_state, optimizer_state, st.scheduler, step + 1,
                                               st.batches.total, done=step + 1 == st.batches.total)
        if proc.world_size > 1:
            dist.barrier()
        if on_step is not None:
            on_step(step + 1)
    steps.finish()
    return model


def on_device_steps(cfg, proc):
    """Whether the stages run fast_train.DeviceSteps (data on the device, each step a CUDA graph): with --fast on, or
    auto for the synthetic world on one CUDA device."""
    one_micro_batch = cfg.per_device_batch in (None, cfg.global_batch)
    if cfg.fast == "on" and (proc.world_size > 1 or not one_micro_batch):
        raise ValueError("--fast on runs one process with one micro-batch per step; drop --per-device-batch and "
                         "torchrun, or use --fast off")
    auto = cfg.data is None and proc.device.startswith("cuda") and proc.world_size == 1 and one_micro_batch
    return cfg.fast == "on" or (cfg.fast == "auto" and auto)


def stage_steps(cfg, proc):
    """fast_train.DeviceSteps where `on_device_steps`; else PlainSteps, on CUDA outside FSDP with the clipping inside
    fused AdamW's pass (fast_train.clip_in_update)."""
    if on_device_steps(cfg, proc):
        from fast_train import DeviceSteps
        return DeviceSteps
    if proc.device.startswith("cuda") and not (proc.world_size > 1 and cfg.parallel == "fsdp"):
        from fast_train import clip_in_update
        return partial(PlainSteps, update=clip_in_update)
    return PlainSteps


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_args(argv)
    try:
        train(cfg)
    except USER_ERRORS as e:  # bad data, checkpoint, image or setting: one line
        return report_user_error(e)
    except TrainingError as e:
        print("error: " + str(e), file=sys.stderr)
        return 1
    return 0


def train(cfg, on_step=None):
    """Every stage asked for; returns the trained model (rank 0 also saves it and, on synthetic data, scores it).
    on_step(step): called after each optimizer step of each stage. Nothing is written into --out before the data
    and the model are read and checked."""
    proc = setup_distributed(cfg)
    held = check_run_folder(cfg)
    log = RunLog(proc.rank, Path(cfg.out) / "train.log")  # holds its lines until the run folder is taken, below
    log(f"preset {cfg.preset}: " + ", ".join(f"{k} {getattr(cfg, k)}" for k in preset_values(cfg.preset, cfg.device)))
    torch.manual_seed(cfg.seed)
    files = prepare_data(cfg, proc, log)
    model = build_model(cfg, files, log).to(proc.device)
    if proc.device.startswith("cuda"):  # the fastest SSD for a GPU (fast_ssd.py, docs/speed.md)
        from fast_ssd import use_ssd
        if cfg.compile:  # in compiled blocks: our Triton diagonal blocks, or ssd_chunked_fast without Triton
            use_ssd(model, "triton" if importlib.util.find_spec("triton") else "torch-fast")
        else:  # eager: mamba-ssm's kernel where installed, else ssd_chunked_fast
            use_ssd(model, "auto")
    if cfg.compile:
        from fast_decode import compile_blocks, compile_connector, compile_encoders
        compile_connector(model.connector)
        kept = cfg.gradient_checkpointing  # each block keeps in_proj's product and runs its SSD's forward once
        compile_blocks(model.lm, in_proj_kept=kept, tune_kernels=True, ssd_kept=kept)
        encoders = not on_device_steps(cfg, proc)  # DeviceSteps runs the frozen encoders once, before the first step
        if encoders:
            compile_encoders(model.vision)
        log("--compile: the first step compiles the connector, the LM blocks" + (" and the frozen encoders" if encoders
            else "") + " (on a GPU, minutes: it times their fused kernels)")
    if proc.world_size > 1 and cfg.parallel == "fsdp":
        shard(model, proc.device)
    data, samples = stage_data(cfg, files, model, log, proc)
    with taken(cfg.out, held, proc) as deleted:
        log.start()
        if deleted:
            log(f"--overwrite: deleted {', '.join(str(p) for p in deleted)}")
        model = run_stages(cfg, model, data, samples, proc, log, on_step)
        if proc.rank == 0 and files.test_json and not cfg.no_eval:
            from evaluate import score_run
            score_run(cfg.out, files.test_json, log)
    if proc.world_size > 1:
        dist.destroy_process_group()
    return model


def stage_data(cfg, files, model, log, proc):
    """({stage: its dataset}, [each stage's samples]), checked before the run folder is taken (a dataset smaller than
    one global batch stops the run here)."""
    stages = {"all": STAGES, "both": STAGES[1:]}.get(cfg.stage, (cfg.stage,))
    if cfg.stage == "all" and (not files.pretrain_json or cfg.pretrain_epochs <= 0):
        stages = STAGES[1:]  # real data: the LM comes pretrained
    if "pretrain" in stages and not files.pretrain_json:
        raise ValueError("--stage pretrain needs --pretrain-data (a text-only LLaVA-format JSON)")
    dataset = dataset_for(model, files.train_json, files.image_root, cache_images=cfg.data is None)
    text = dataset_for(model, files.pretrain_json) if "pretrain" in stages else None
    for ds in (dataset, text):
        if ds is not None and ds.problems:
            log(ds.set_aside_line())
    cc = model.config.connector
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"(connector {cc.kind}/{cc.scan}); {len(dataset)} training samples"
        + (f", {len(text)} text-only for pretrain" if text else "") + f"; {proc.world_size} process(es)")
    data = {stage: text if stage == "pretrain" else dataset for stage in stages}
    return data, [stage_batches(stage, ds, cfg, proc).total * cfg.global_batch for stage, ds in data.items()]


def run_stages(cfg, model, data, samples, proc, log, on_step):
    """Each stage in turn, then the model saved to OUT/final (rank 0); samples: each stage's (the run's ETA)."""
    t0 = time.time()
    steps_for = stage_steps(cfg, proc)
    for k, (stage, ds) in enumerate(data.items()):
        model = run_stage(stage, model, ds, cfg, proc, log, on_step, sum(samples[k + 1:]), steps_for)
    model_state = get_model_state_dict(model, options=FULL_STATE)  # every process: gathers FSDP's shards
    if proc.rank == 0:
        final = Path(cfg.out) / "final"
        model.save_pretrained(final, model_state)
        log(f"training took {time.time() - t0:.0f} s; model saved to {final}")
    return model


if __name__ == "__main__":
    sys.exit(main())
