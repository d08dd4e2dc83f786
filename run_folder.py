"""A training run's folder: its log and progress lines, its checkpoints and resuming from them (train.py).

    OUT/train.log                         every progress line, appended (a resumed run goes on in the same file)
    OUT/STAGE/checkpoint-STEP/            model + optimizer + scheduler + RNG + step
    OUT/STAGE/latest                      the name of the newest complete checkpoint, switched by an atomic rename
    OUT/final/, OUT/eval.json             the trained model and its scores

A crash mid-write leaves the previous checkpoint in charge. The optimizer state is stored keyed by parameter name
(whole tensors), so a run may resume with another number of processes or DDP <-> FSDP.
"""

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from weights import atomic_write_text, matched_state, read_tensors

STAGES = ("pretrain", "align", "finetune")


class RunLog:
    """Prints a line on rank 0 and appends it to OUT/train.log, so a run's progress stays readable (and plottable:
    `python docs/figures.py`) after the terminal is gone. A resumed run appends to the same file. Until `start()`
    (the run's inputs checked, its folder taken) the lines are only held, so a run that stops on a bad input leaves
    nothing in --out."""

    def __init__(self, rank, file):
        self.rank, self.file, self.held = rank, Path(file), []

    def __call__(self, msg):
        if self.rank != 0:
            return
        print(msg, flush=True)
        if self.held is not None:
            self.held.append(msg)
            return
        with open(self.file, "a") as f:
            f.write(msg + "\n")

    def start(self):
        if self.rank == 0:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.file, "a") as f:
                f.writelines(m + "\n" for m in self.held)
        self.held = None


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the CPU, on rank 0


def minutes(seconds):
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s"


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks, by GPU name


def peak_flops(device):
    """The device's dense bf16 peak in FLOP/s; None on a CPU or a GPU not in PEAK_BF16_TFLOPS."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def flops_per_token(model):
    """Training FLOPs per token, estimated: 6 per trainable parameter (forward and backward) and 2 per frozen one
    (forward). At the paper's configuration this is within 2% of what torch.utils.flop_counter counts
    (benchmark.py train)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return 6 * trainable + 2 * frozen


def speed(samples, tokens, seconds, samples_left, later_samples=0, mfu_basis=None):
    """The progress line's rates: samples/s, tokens/s (every token of every sequence, image slots included, over all
    processes), the time left in this stage at that rate, and the time left in the run with the later stages'
    samples counted at the same rate (an estimate: a stage with images reads its samples slower than the text stage).
    mfu_basis: (FLOPs per token, the peak FLOP/s of all processes together) adds the model FLOPs utilization (MFU)."""
    rate = max(samples / max(seconds, 1e-9), 1e-9)
    token_rate = tokens / max(seconds, 1e-9)
    return (f"{rate:.1f} samples/s {token_rate:.0f} tokens/s"
            + (f" MFU {token_rate * mfu_basis[0] / mfu_basis[1]:.1%}" if mfu_basis else "")
            + f" ETA {minutes(samples_left / rate)}"
            + (f" (run ~{minutes((samples_left + later_samples) / rate)})" if later_samples else ""))


def full_state(model, optimizer):
    """(model state, optimizer state) as whole tensors on the CPU, the optimizer's keyed by parameter name. Under FSDP
    each process holds a shard and this gathers them (a collective: every process must call it; rank 0 gets them)."""
    return (get_model_state_dict(model, options=FULL_STATE),
            get_optimizer_state_dict(model, optimizer, options=FULL_STATE))


def load_full_state(model, optimizer, model_state, optimizer_state):
    """The inverse of full_state, on every process (each keeps its own shard under FSDP)."""
    options = StateDictOptions(full_state_dict=True, strict=not model.config.lm.tie_embeddings)
    set_model_state_dict(model, model_state, options=options)  # a tied lm_head is not stored
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def save_checkpoint(stage_dir, model, state, optimizer_state, scheduler, step, total, done=False, keep=2):
    """stage_dir/checkpoint-STEP/, then stage_dir/latest -> it, switched atomically; then all but the `keep` newest
    checkpoints are deleted, never the one `latest` names. state, optimizer_state: from full_state."""
    ckpt = stage_dir / f"checkpoint-{step}"
    tmp = stage_dir / f".tmp-checkpoint-{step}"
    for folder in (ckpt, tmp):
        shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(tmp, state)
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "total_steps": total, "done": done}))
    os.replace(tmp, ckpt)
    atomic_write_text(stage_dir / "latest", ckpt.name)  # the switch: before it the old checkpoint rules, then the new
    others = sorted((d for d in stage_dir.glob("checkpoint-*") if d != ckpt), key=lambda d: int(d.name.split("-")[1]))
    for old in others[:len(others) - (keep - 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def latest_checkpoint(stage_dir):
    pointer = stage_dir / "latest"
    if not pointer.is_file():
        return None
    ckpt = stage_dir / pointer.read_text().strip()
    return ckpt if (ckpt / "state.json").is_file() else None


RUN_OUTPUTS = ("final", "train.log", "eval.json")  # beside the stage folders


def check_run_folder(cfg):
    """A run folder is never silently mixed or rewound: --resume needs a checkpoint to continue from; a folder that
    holds a run needs --resume or --overwrite (then `taken` deletes that run). Returns what it holds."""
    out = Path(cfg.out)
    if cfg.resume:
        for stage in STAGES:
            pointer = out / stage / "latest"
            if pointer.is_file() and latest_checkpoint(out / stage) is None:
                raise ValueError(f"--resume: {pointer} names {pointer.read_text().strip()!r}, which is not a complete "
                                 f"checkpoint in {out / stage}; point it at one that is, or start over with "
                                 "--overwrite")
        if not any(latest_checkpoint(out / stage) for stage in STAGES):
            raise ValueError(f"--resume: {out} holds no checkpoint to continue from; start without --resume")
        return []
    held = [out / s for s in STAGES if (out / s).is_dir()] + [out / n for n in RUN_OUTPUTS if (out / n).exists()]
    if held and not cfg.overwrite:
        raise ValueError(f"{out} already holds a run ({', '.join(p.name for p in held)}): continue it with --resume, "
                         "or delete it and start over with --overwrite")
    return held


@contextlib.contextmanager
def taken(out, held, proc):
    """Inside: OUT locked for this run (OUT/.lock: a second run into it gets one line naming this one's process),
    what `check_run_folder` found there deleted (--overwrite). Gives the paths deleted."""
    fd = None
    if proc.rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(out) / ".lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ValueError(f"{out} is in use by another run (process {owner}): wait for it, or choose another "
                             "--out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        for path in held:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if proc.world_size > 1:
        dist.barrier()
    try:
        yield held
    finally:
        if fd is not None:
            os.close(fd)  # the lock goes with it


def resume_stage(stage_dir, model, optimizer, scheduler, log):
    """Load the stage's latest checkpoint into model, optimizer, scheduler and the RNG; returns (step, done), or
    (0, False) when there is none."""
    ckpt = latest_checkpoint(stage_dir)
    if ckpt is None:
        return 0, False
    state = json.loads((ckpt / "state.json").read_text())
    trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    model_state = matched_state(model, read_tensors(ckpt), source=f"ML-Mamba checkpoint {ckpt}")
    load_full_state(model, optimizer, model_state, trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    log(f"[{stage_dir.name}] resumed from {ckpt} at step {state['step']}/{state['total_steps']}")
    return state["step"], state["done"]
