"""Train ML-Mamba: stage 1 "align" (connector only), stage 2 "finetune" (connector + LM); vision always frozen.
Before them, a "pretrain" stage can train the LM alone on text-only data (--pretrain-data): the synthetic world has no
pretrained LM, so its default run first teaches its tiny LM the world's language, with each scene written out in
words where the image will be; align then has a LM worth aligning to, as in the paper.

    python train.py                      # no download: builds the synthetic shapes world and a tiny ML-Mamba, runs
                                         # pretrain, align, finetune; prints held-out accuracy per question family
                                         # (preset "synthetic"; with --data the preset is "paper")
    python train.py --stage finetune --data llava_v1_5_mix665k.json --image-root DIR \\
        --llm mamba2-2.7b --dinov2 dinov2-large --siglip siglip-so400m-patch14-384 --tokenizer gpt-neox-20b
    torchrun --nproc_per_node=8 train.py ...        # one process per GPU, the model sharded over them (FSDP)
    torchrun --nproc_per_node=8 train.py --parallel ddp ...   # or replicated on each (DDP)

Presets (PRESETS below; any option given on the command line overrides its preset's value):
- "paper", the paper's recipe (Table 1, section 4.1): AdamW, cosine decay after a linear warmup over 3% of the
  steps, lr 2e-5 (align 1e-3), weight decay 0.1, 2 epochs, global batch 64 = per-device batch x gradient
  accumulation x devices, bf16 autocast on fp32 master weights, gradient clipping at 1.0.
- "synthetic", the synthetic world's: 40 text epochs, 1 align and 20 finetune epochs, lr 1e-3, the connector at
  1e-4, global batch 32; on a GPU also a 192-wide LM and a describe turn in every training conversation
  (GPU_PRESETS; docs/synthetic-world.md says why).

Checkpoints: runs/NAME/STAGE/checkpoint-STEP/ (model + optimizer + scheduler + RNG + step), then the file
STAGE/latest is switched to it with an atomic rename: a crash mid-write leaves the previous checkpoint in charge.
`--resume` continues from there with the same batches in the same order, so it ends where an uninterrupted run
would. A NaN or infinite loss stops the run naming the step; the last good checkpoint stays. The optimizer state is
stored keyed by parameter name (whole tensors), so a run may resume with another number of processes or DDP <-> FSDP.

Several processes (torchrun): each takes its slice of every global batch. FSDP (the paper's choice, default) splits
every parameter, gradient and optimizer state over the processes, so each holds 1/N of them; a block's whole weights
are gathered just for its forward and its backward. DDP keeps a whole copy on each and averages the gradients.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from data import (LLaVADataset, StageBatches, build_synthetic_dataset, collate, conversation_turns,
                  synthetic_dataset_is_built, train_tokenizer)
from model import IGNORE_INDEX, MLMamba, MLMambaConfig, conversation_segments
from weights import (USER_ERRORS, atomic_write_text, fraction, listing, nonnegative_float, nonnegative_int,
                     positive_float, positive_int, report_user_error)

STAGES = ("pretrain", "align", "finetune")


# ----------------------------------------------------------------------------------------------------------------
# Configuration: a preset, then the options given on the command line; frozen once parsed
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    preset: str = "synthetic"
    stage: str = "all"  # "pretrain", "align", "finetune", "both" (align, finetune) or "all"
    data: str = None  # a LLaVA-format JSON; None: the synthetic world
    image_root: str = None
    pretrain_data: str = None  # text-only LLaVA-format JSON for the pretrain stage (synthetic: the world's text.json)
    synthetic_dir: str = "data/synthetic"
    llm: str = None
    siglip: str = None
    dinov2: str = None
    tokenizer: str = None
    init_from: str = None
    connector: str = None  # None: ConnectorConfig's default, or the --init-from folder's
    scan: str = None
    prompt: str = "in-out"  # a new model's prompt format
    drop_path: float = 0.1
    image_size: int = 384
    out: str = "runs/synthetic"
    pretrain_epochs: float = 40
    align_epochs: float = 1
    epochs: float = 20  # finetune epochs
    lr: float = 1e-3  # finetune and pretrain
    align_lr: float = 1e-4
    connector_lr: float = None  # the connector's lr in finetune (None: lr)
    weight_decay: float = 0.1
    warmup_ratio: float = 0.03
    global_batch: int = 32
    per_device_batch: int = None  # None: the global batch / processes
    max_grad_norm: float = 1.0
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA), "fp32" or "bf16"
    gradient_checkpointing: bool = False
    compile: bool = False  # the LM blocks through torch.compile (Mamba2LMHeadModel.compile_blocks)
    parallel: str = "fsdp"
    workers: int = 0  # DataLoader worker processes
    save_every: int = 200
    log_every: int = 25
    resume: bool = False
    overwrite: bool = False
    max_steps: int = None
    seed: int = 0
    world_seed: int = 0
    extra_spatial: int = 0
    describe: bool = False
    lm_width: int = 96  # the synthetic world's LM: d_model and layers
    lm_layers: int = 3
    device: str = "cpu"
    fast: str = "auto"  # fast_train.py's path: "auto" (synthetic world on one GPU), "on" or "off"
    no_eval: bool = False


PRESETS = {
    # the synthetic world: a tiny LM that first learns the world's language from text, then the image stages
    # in fp32 on every device: at its size bf16 buys a GPU no time, and its rounding costs accuracy (docs/speed.md)
    "synthetic": dict(pretrain_epochs=40, align_epochs=1, epochs=20, lr=1e-3, align_lr=1e-4, connector_lr=1e-4,
                      global_batch=32, workers=0, precision="fp32"),
    # the paper's recipe (Table 1, section 4.1); pretrain runs only when given --pretrain-data
    "paper": dict(pretrain_epochs=1, align_epochs=1, epochs=2, lr=2e-5, align_lr=1e-3, connector_lr=None,
                  global_batch=64, workers=4),
    # the authors' release: one "no-align" stage (connector and LM from the start), its connector and prompt
    "release": dict(stage="finetune", connector="msc-release", prompt="zephyr", pretrain_epochs=1, align_epochs=1,
                    epochs=2, lr=2e-5, align_lr=1e-3, connector_lr=None, global_batch=128, workers=4,
                    gradient_checkpointing=True),
}
# On a GPU the synthetic preset also takes these: a 192-wide LM and a last turn that asks for the scene in words make
# every question family learnable with seeds 0-2, for seconds of GPU time; on a CPU the wider LM costs many minutes
# (docs/synthetic-world.md). --lm-width 96 --no-describe gives a GPU the CPU's recipe.
GPU_PRESETS = {"synthetic": dict(lm_width=192, describe=True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)  # an option not given keeps its preset's value
    p.add_argument("--preset", choices=list(PRESETS),
                   help="default: synthetic, or paper with --data; release: the authors' one-stage recipe")
    p.add_argument("--stage", choices=["pretrain", "align", "finetune", "both", "all"],
                   help="all (default): pretrain (when there is text data), align, finetune; both: align, finetune")
    p.add_argument("--data", help="LLaVA-format JSON; default: the synthetic world (built if missing)")
    p.add_argument("--image-root", help="folder the samples' image paths are relative to (default: the JSON's)")
    p.add_argument("--pretrain-data", help="text-only LLaVA-format JSON for the pretrain stage (LM alone); "
                                           "synthetic: the world's text.json")
    p.add_argument("--llm", help="Mamba-2 checkpoint folder or repo id (real runs)")
    p.add_argument("--siglip", help="SigLIP checkpoint folder or repo id")
    p.add_argument("--dinov2", help="DINOv2 checkpoint folder or repo id")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (real runs: GPT-NeoX-20B's)")
    p.add_argument("--init-from", help="an ML-Mamba folder to start from (e.g. the align stage's output); with a "
                                       "--connector or --scan other than its own, a new connector on its LM")
    p.add_argument("--connector", choices=["mlp", "msc-basic", "msc-advanced", "msc-release"],
                   help="default msc-advanced (with --init-from: the folder's)")
    p.add_argument("--scan", choices=["bsm", "csm"], help="default bsm (with --init-from: the folder's)")
    p.add_argument("--prompt", choices=["in-out", "zephyr"],
                   help="a new model's prompt format (default in-out; zephyr: the authors' release's)")
    p.add_argument("--drop-path", type=fraction, help="the MSC blocks' stochastic depth (default 0.1)")
    p.add_argument("--image-size", type=positive_int, help="encoder input size (real runs; default 384)")
    p.add_argument("--out", help="the run folder (default runs/synthetic)")
    p.add_argument("--pretrain-epochs", type=nonnegative_float, help="text-only pretrain epochs")
    p.add_argument("--align-epochs", type=nonnegative_float, help="align epochs")
    p.add_argument("--epochs", type=nonnegative_float, help="finetune epochs")
    p.add_argument("--lr", type=positive_float, help="finetune and pretrain lr")
    p.add_argument("--align-lr", type=positive_float, help="align lr")
    p.add_argument("--connector-lr", type=positive_float,
                   help="the connector's lr in the finetune stage (see make_optimizer)")
    p.add_argument("--weight-decay", type=nonnegative_float)
    p.add_argument("--warmup-ratio", type=fraction)
    p.add_argument("--global-batch", type=positive_int)
    p.add_argument("--per-device-batch", type=positive_int, help="default: the global batch / processes")
    p.add_argument("--max-grad-norm", type=positive_float)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="auto (the paper's default): bf16 autocast on CUDA; the synthetic preset: fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="the LM blocks through torch.compile: their elementwise work fused (real runs on a GPU; the "
                        "first steps compile)")
    p.add_argument("--parallel", choices=["fsdp", "ddp"],
                   help="under torchrun: shard the model over the processes (FSDP, default) or replicate it (DDP)")
    p.add_argument("--workers", type=nonnegative_int, help="data-loading worker processes")
    p.add_argument("--save-every", type=positive_int, help="steps between checkpoints (default 200)")
    p.add_argument("--log-every", type=positive_int, help="steps between progress lines (default 25)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoints")
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
    p.add_argument("--max-steps", type=positive_int, help="stop each stage after this many steps")
    p.add_argument("--seed", type=nonnegative_int, help="initialization, batch order, stochastic depth (default 0)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--fast", choices=["auto", "on", "off"],
                   help="the stage loop of fast_train.py (data and encoder features held on the device, each step "
                        "a CUDA graph); auto (default): on for the synthetic world on one GPU")
    p.add_argument("--no-eval", action="store_true")
    add_synthetic_arguments(p.add_argument_group("the synthetic world (when no --data is given)"))
    given = vars(p.parse_args(argv))
    if given.get("resume") and given.get("overwrite"):
        p.error("--resume continues the run in --out and --overwrite deletes it: give one")
    preset = given.get("preset") or ("paper" if given.get("data") else "synthetic")
    device = given.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return TrainConfig(**{**preset_values(preset, device), **given, "device": device, "preset": preset})


def add_synthetic_arguments(g):
    g.add_argument("--synthetic-dir", help="where the world is built (default data/synthetic)")
    g.add_argument("--world-seed", type=nonnegative_int,
                   help="the world's seed (apart from --seed: runs that differ in --seed share one world)")
    g.add_argument("--extra-spatial", type=nonnegative_int,
                   help="spatial questions added to each training conversation that can pose one")
    g.add_argument("--describe", action=argparse.BooleanOptionalAction,
                   help="each training conversation ends by asking for the scene in words (default: on a GPU)")
    g.add_argument("--lm-width", type=positive_int, help="the LM's d_model (default 96; 192 on a GPU)")
    g.add_argument("--lm-layers", type=positive_int, help="the LM's layers (default 3)")


def preset_values(preset, device):
    """The preset's settings on this device (GPU_PRESETS added on CUDA)."""
    return {**PRESETS[preset], **(GPU_PRESETS.get(preset, {}) if device.startswith("cuda") else {})}


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Process:
    """Where this process runs: its rank among world_size processes (torchrun), and its device."""
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"


def setup_distributed(cfg):
    """Under torchrun: one process per device; NCCL for CUDA tensors, gloo for CPU tensors."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process(device=cfg.device)
    device = cfg.device
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
    return Process(int(os.environ["RANK"]), world_size, device)


def shard(model, device):
    """FSDP2 (torch.distributed.fsdp.fully_shard): every LM block, the connector, then the rest (embeddings, head,
    vision encoders) each become one unit whose parameters are split over the processes (DTensors). Before a unit's
    forward and backward its whole weights are all-gathered; after the backward its gradients are reduce-scattered
    (averaged), so each process updates only its own shard. The tied embedding and head stay in one unit.
    The device mesh is made for `device` explicitly: left to itself, FSDP puts it on CUDA whenever CUDA exists."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    # FSDP warns when a unit returns a view; the connector's output is the (b, N, D) view nn.Linear gives for 3-D
    # inputs, and nothing writes into it in place (MLMamba.embed copies it into the embeddings)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPConnector\) returned a view tensor")
    for block in model.lm.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model.connector, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class RunLog:
    """Prints a line on rank 0 and appends it to OUT/train.log, so a run's progress stays readable (and plottable:
    `python docs/figures.py`) after the terminal is gone. A resumed run appends to the same file."""

    def __init__(self, rank, file):
        self.rank, self.file = rank, Path(file)

    def __call__(self, msg):
        if self.rank != 0:
            return
        print(msg, flush=True)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a") as f:
            f.write(msg + "\n")


@dataclass(frozen=True)
class DataFiles:
    """The files a run reads: training conversations, their images' folder, text-only conversations for pretrain,
    and (synthetic) the test questions scored at the end."""
    train_json: Path
    image_root: Path = None
    pretrain_json: Path = None
    test_json: Path = None


def synthetic_files(root):
    root = Path(root)
    return DataFiles(root / "train.json", root, root / "text.json", root / "test.json")


def prepare_data(cfg, proc, log):
    """The run's DataFiles; on the synthetic world, built first if missing or built with other settings."""
    if cfg.data is not None:
        return DataFiles(Path(cfg.data), cfg.image_root, cfg.pretrain_data)
    root = Path(cfg.synthetic_dir)
    settings = dict(seed=cfg.world_seed, extra_spatial=cfg.extra_spatial, describe=cfg.describe)
    if proc.rank == 0 and not synthetic_dataset_is_built(root, **settings):  # missing, other settings or version
        log(f"building the synthetic visual-question world in {root} ...")
        build_synthetic_dataset(root, **settings)
    if proc.world_size > 1:
        dist.barrier()
    return replace(synthetic_files(root), pretrain_json=cfg.pretrain_data or root / "text.json")


def synthetic_model(tokenizer, cfg):
    """The tiny default: two small from-scratch encoders (frozen), the MSC connector, a small Mamba-2 LM.
    Images are 48 px with 16 px patches: a 3 x 3 grid of tokens, one per cell of the synthetic scenes."""
    from connector import ConnectorConfig
    from mamba2 import Mamba2Config
    from vision import ViTConfig
    # chunk 16: the conversations are ~60-100 tokens, and the intra-chunk (Q, Q) products grow with Q
    lm = Mamba2Config(d_model=cfg.lm_width, n_layer=cfg.lm_layers, vocab_size=tokenizer.get_vocab_size(), d_state=16,
                      headdim=16, chunk_size=16, pad_vocab_size_multiple=16)
    vit = dict(image_size=48, patch_size=16, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               input_size=48)
    vision = {"dinov2": ViTConfig("dinov2", **vit), "siglip": ViTConfig("siglip", **vit)}
    cc = ConnectorConfig.for_lm(lm, vision_dim=128, grid=(3, 3), drop_path=cfg.drop_path, **connector_choice(cfg))
    return MLMamba(MLMambaConfig(lm=lm, vision=vision, connector=cc, max_length=512, prompt=cfg.prompt), tokenizer)


def synthetic_tokenizer(json_paths, prompt="in-out"):
    """A byte-level BPE tokenizer trained on the prompts and replies, as the model reads them, of LLaVA-format files."""
    samples = [x for f in json_paths if f for x in json.loads(Path(f).read_text())]
    return train_tokenizer([s for x in samples for s, _ in conversation_segments(conversation_turns(x), prompt)])


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
        tokenizer = synthetic_tokenizer([files.train_json, files.pretrain_json], cfg.prompt)
        torch.manual_seed(cfg.seed)
        return synthetic_model(tokenizer, cfg)
    missing = [n for n in ("llm", "tokenizer") if getattr(cfg, n) is None]
    missing += ["siglip and / or --dinov2"] if cfg.siglip is None and cfg.dinov2 is None else []
    if missing:
        raise ValueError(f"training on --data needs --{', --'.join(missing)} (or --init-from an ML-Mamba folder)")
    torch.manual_seed(cfg.seed)
    encoders = {name: path for name, path in (("dinov2", cfg.dinov2), ("siglip", cfg.siglip)) if path is not None}
    return MLMamba.from_components(cfg.llm, encoders, cfg.tokenizer, prompt=cfg.prompt, input_size=cfg.image_size,
                                   connector={"drop_path": cfg.drop_path, **connector_choice(cfg)})


def dataset_for(model, json_path, image_root=None, cache_images=False):
    return LLaVADataset(json_path, image_root, model.tokenizer, model.image_token_id, model.num_image_tokens,
                        model.vision.preprocess, cache_images=cache_images, prompt=model.config.prompt)


def report_problems(dataset, log, shown=5):
    """One line: how many samples of the file were set aside as malformed, and why (the first few)."""
    if dataset is None or not dataset.problems:
        return
    problems = [f"sample {i}: {reason}" for i, reason in dataset.problems.items()]
    log(f"{dataset.json_path}: {len(problems)} of {len(problems) + len(dataset)} samples set aside: "
        + listing(problems, shown, sep="; "))


def lr_factor(step, total, warmup):
    """Linear warmup to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, lr, weight_decay, connector_lr=None, fused=False):
    """AdamW; no weight decay on biases, norms and the SSM's A_log, D, dt_bias (1-D tensors).

    connector_lr: the connector's own lr (default: lr). The image tokens feed the LM's pre-norm blocks, which
    divide out their scale, so nothing holds the connector's output norm in place: at too high an lr it grows by
    orders of magnitude and learning stalls (docs/synthetic-world.md). LLaVA's trainer has the same option
    (mm_projector_lr). fused: one kernel for the whole update (CUDA; the fast path uses it)."""
    connector = {id(p) for p in model.connector.parameters()}
    groups = []
    for is_connector in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in connector) == is_connector]
        group_lr = connector_lr if is_connector and connector_lr is not None else lr
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": group_lr},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": group_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), fused=fused or None)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on the CPU, on rank 0


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


def prepare_run_folder(cfg, proc):
    """A run folder is never silently mixed or rewound: --resume needs a checkpoint to continue from; a folder that
    holds a run needs --resume or --overwrite, which deletes that run first. Returns what was deleted."""
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
    if proc.rank == 0:
        for path in held:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if proc.world_size > 1:
        dist.barrier()
    return held


def resume_stage(stage_dir, model, optimizer, scheduler, log):
    """Load the stage's latest checkpoint into model, optimizer, scheduler and the RNG; returns (step, done), or
    (0, False) when there is none."""
    ckpt = latest_checkpoint(stage_dir)
    if ckpt is None:
        return 0, False
    state = json.loads((ckpt / "state.json").read_text())
    trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    load_full_state(model, optimizer, model.checkpoint_state(ckpt), trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    torch.set_rng_state(trainer["rng"])
    log(f"[{stage_dir.name}] resumed from {ckpt} at step {state['step']}/{state['total_steps']}")
    return state["step"], state["done"]


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
    total = max(1, int(epochs * per_epoch))
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    local_batch = cfg.global_batch // proc.world_size
    micro = cfg.per_device_batch or local_batch
    if cfg.global_batch % proc.world_size or local_batch % micro:
        raise ValueError(f"global batch {cfg.global_batch} must split into {proc.world_size} devices x whole "
                         f"micro-batches of {micro}")
    return StageBatches(n, cfg.global_batch, micro, seed=cfg.seed + 1000 * (STAGES.index(stage) - 1), start=0,
                        total=total, rank=proc.rank, world_size=proc.world_size)


def to_device(batch, device):
    px = batch["pixel_values"]
    return ({n: v.to(device, non_blocking=True) for n, v in px.items()} if px else None,
            batch["input_ids"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True))


def uses_bf16(cfg, proc):
    """bf16 autocast on fp32 weights: --precision bf16, or auto on CUDA."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and proc.device.startswith("cuda"))


def train_step(wrapped, model, micro_batches, optimizer, scheduler, cfg, proc):
    """One optimizer step over this process's micro-batches of a global batch; returns (loss, grad-norm) as tensors.

    The loss is the mean over every target token of the global batch: each micro-batch's summed loss is divided by
    the global count, so one process and N processes, one micro-batch or many, compute the same step."""
    n_tokens = torch.tensor(float(sum((b["labels"] != IGNORE_INDEX).sum() for b in micro_batches if b["labels"]
                                      is not None)))
    if proc.world_size > 1:
        dist.all_reduce(n_tokens)
    use_bf16 = uses_bf16(cfg, proc)
    step_loss = torch.zeros((), device=proc.device)
    for batch in micro_batches:
        if batch["input_ids"] is None:  # every sample of this micro-batch was skipped
            continue
        pixels, ids, labels = to_device(batch, proc.device)
        with torch.autocast(device_type=proc.device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
            _, loss_sum = wrapped(pixels, ids, labels, loss_reduction="sum", return_logits=False)
        if loss_sum is None:  # no target token in this micro-batch
            continue
        (loss_sum / n_tokens.clamp(min=1) * proc.world_size).backward()  # DDP and FSDP average over ranks
        step_loss += loss_sum.detach()
    if n_tokens == 0:  # every sample of the global batch was skipped: no update, the schedule goes on
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return None, None
    if proc.world_size > 1:
        dist.all_reduce(step_loss)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               cfg.max_grad_norm)  # the norm of the whole gradient, also under FSDP
    if isinstance(grad_norm, torch.distributed.tensor.DTensor):
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss.cpu() / n_tokens.clamp(min=1), grad_norm


def speed(samples, tokens, seconds, samples_left):
    """The progress line's rates: samples/s, tokens/s (every token of every sequence, image slots included, over all
    processes) and the time left at that rate."""
    rate = samples / max(seconds, 1e-9)
    eta = round(samples_left / max(rate, 1e-9))
    return f"{rate:.1f} samples/s {tokens / max(seconds, 1e-9):.0f} tokens/s ETA {eta // 60}m{eta % 60:02d}s"


@dataclass
class Stage:
    """One stage's loop state: its name, batches, optimizer and lr schedule, folder, first step (after --resume),
    whether it was already done, and its last good checkpoint."""
    name: str
    batches: StageBatches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dir: Path
    start: int
    done: bool
    last_good: Path = None


def nan_stop(st, loss, step, checked_after=None):
    """The TrainingError for a non-finite loss at step `step` (0-based), naming the last good checkpoint;
    checked_after: the step at which a loop that checks every few steps found it."""
    checked = f" (checked after step {checked_after})" if checked_after is not None else ""
    return TrainingError(f"[{st.name}] loss is {float(loss)} at step {step + 1}{checked}: stopping. The last good "
                         f"checkpoint is {st.last_good or 'none (no checkpoint was written yet)'}")


def begin_stage(stage, model, dataset, cfg, proc, log, fused=False):
    """What a stage's loop starts from: the trainable parts logged, the batches, the optimizer (see make_optimizer)
    and the lr schedule, with --resume the stage's latest checkpoint loaded, and the model in training mode.
    Returns a Stage."""
    parts = sorted({n.split(".")[0] for n in model.set_stage(stage)})
    log(f"[{stage}] trainable: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M "
        f"parameters in {len(parts)} parts ({', '.join(parts)}); vision frozen")
    batches = stage_batches(stage, dataset, cfg, proc)
    optimizer = make_optimizer(model, cfg.align_lr if stage == "align" else cfg.lr, cfg.weight_decay,
                               connector_lr=cfg.connector_lr if stage == "finetune" else None,
                               fused=fused)  # after shard()
    total, warmup = batches.total, max(1, int(cfg.warmup_ratio * batches.total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    stage_dir = Path(cfg.out) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    start, done = resume_stage(stage_dir, model, optimizer, scheduler, log) if cfg.resume else (0, False)
    model.lm.gradient_checkpointing = cfg.gradient_checkpointing
    model.train()
    return Stage(stage, batches, optimizer, scheduler, stage_dir, start, done, latest_checkpoint(stage_dir))


def log_due(step, st, cfg):
    return (step + 1) % cfg.log_every == 0 or step + 1 == st.batches.total or step == st.start


def log_progress(log, st, step, loss, grad_norm, seen, tokens, seconds, cfg):
    """The progress line of step `step` (0-based): loss, gradient norm, lr, then speed()."""
    log(f"[{st.name}] step {step + 1}/{st.batches.total} epoch {step // st.batches.steps_per_epoch() + 1} "
        f"loss {loss:.4f} grad-norm {float(grad_norm):.3g} lr {st.scheduler.get_last_lr()[0]:.2e} "
        + speed(seen, tokens, seconds, (st.batches.total - step - 1) * cfg.global_batch))


def save_due(step, st, cfg):
    return (step + 1) % cfg.save_every == 0 or step + 1 == st.batches.total


def save_stage_checkpoint(st, model, step, proc):
    """Checkpoint after step `step` (0-based); every process calls it (gathering FSDP's shards), rank 0 writes."""
    model_state, optimizer_state = full_state(model, st.optimizer)
    if proc.rank == 0:
        st.last_good = save_checkpoint(st.dir, model, model_state, optimizer_state, st.scheduler, step + 1,
                                       st.batches.total, done=step + 1 == st.batches.total)


def use_fast_path(cfg, proc):
    """--fast auto: the fast path (fast_train.py) for the synthetic world on one CUDA device; on: for any data on one
    process (the CPU too, without the CUDA graph); off: never."""
    one_micro_batch = cfg.per_device_batch in (None, cfg.global_batch)
    if cfg.fast == "on" and (proc.world_size > 1 or not one_micro_batch):
        raise ValueError("--fast on runs one process with one micro-batch per step; drop --per-device-batch and "
                         "torchrun, or use --fast off")
    if cfg.fast == "auto":
        return cfg.data is None and proc.device.startswith("cuda") and proc.world_size == 1 and one_micro_batch
    return cfg.fast == "on"


def run_stage(stage, model, dataset, cfg, proc=None, log=print, on_step=None):
    """Train one stage, resuming from its latest checkpoint with --resume; returns the model (unwrapped).
    on_step(step) is called after every optimizer step (and its checkpoint, if one is due)."""
    proc = proc or Process(device=cfg.device)
    if use_fast_path(cfg, proc):
        from fast_train import run_stage_fast
        return run_stage_fast(stage, model, dataset, cfg, proc, log, on_step)
    st = begin_stage(stage, model, dataset, cfg, proc, log)
    if st.done:
        return model
    wrapped = model  # what the forward goes through: FSDP's model is sharded in place (train()), DDP wraps it
    if proc.world_size > 1 and cfg.parallel == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=None if proc.device == "cpu" else [proc.device])
    # the loader draws its seeds from a generator of its own: the global RNG draws the stochastic depth
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=replace(st.batches, start=st.start), collate_fn=collate, num_workers=cfg.workers,
        pin_memory=proc.device.startswith("cuda"), generator=torch.Generator()))
    t0, seen, tokens, skipped = time.time(), 0, 0, set()
    for step in range(st.start, st.batches.total):
        micro_batches = [next(loader) for _ in range(st.batches.micro_per_step())]
        for reason in (r for b in micro_batches for r in b["skipped"] if r not in skipped):
            skipped.add(reason)
            log(f"[{stage}] skipping {reason}")
        loss, grad_norm = train_step(wrapped, model, micro_batches, st.optimizer, st.scheduler, cfg, proc)
        if loss is None:
            log(f"[{stage}] step {step + 1}: every sample of the batch was skipped; no update")
        elif not math.isfinite(loss):
            raise nan_stop(st, loss, step)
        seen, tokens = seen + cfg.global_batch, tokens + sum(b["tokens"] for b in micro_batches) * proc.world_size
        if loss is not None and log_due(step, st, cfg):
            log_progress(log, st, step, loss, grad_norm, seen, tokens, time.time() - t0, cfg)
        if save_due(step, st, cfg):
            save_stage_checkpoint(st, model, step, proc)
        if proc.world_size > 1:
            dist.barrier()
        if on_step is not None:
            on_step(step + 1)
    if skipped:
        log(f"[{stage}] skipped {len(skipped)} sample(s) with a missing or unusable image or text")
    return model


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
    on_step(step): called after each optimizer step of each stage."""
    proc = setup_distributed(cfg)
    deleted = prepare_run_folder(cfg, proc)
    log = RunLog(proc.rank, Path(cfg.out) / "train.log")
    if deleted:
        log(f"--overwrite: deleted {', '.join(str(p) for p in deleted)}")
    log(f"preset {cfg.preset}: " + ", ".join(f"{k} {getattr(cfg, k)}" for k in preset_values(cfg.preset, cfg.device)))
    torch.manual_seed(cfg.seed)
    files = prepare_data(cfg, proc, log)
    model = build_model(cfg, files, log).to(proc.device)
    if cfg.compile:
        model.lm.compile_blocks()
    if proc.world_size > 1 and cfg.parallel == "fsdp":
        shard(model, proc.device)
    stages = {"all": STAGES, "both": STAGES[1:]}.get(cfg.stage, (cfg.stage,))
    if cfg.stage == "all" and (not files.pretrain_json or cfg.pretrain_epochs <= 0):
        stages = STAGES[1:]  # real data: the LM comes pretrained
    if "pretrain" in stages and not files.pretrain_json:
        raise ValueError("--stage pretrain needs --pretrain-data (a text-only LLaVA-format JSON)")
    dataset = dataset_for(model, files.train_json, files.image_root, cache_images=cfg.data is None)
    text = dataset_for(model, files.pretrain_json) if "pretrain" in stages else None
    for ds in (dataset, text):
        report_problems(ds, log)
    cc = model.config.connector
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
        f"(connector {cc.kind}/{cc.scan}); {len(dataset)} training samples"
        + (f", {len(text)} text-only for pretrain" if text else "") + f"; {proc.world_size} process(es)")
    t0 = time.time()
    for stage in stages:
        model = run_stage(stage, model, text if stage == "pretrain" else dataset, cfg, proc, log, on_step)
    model_state = get_model_state_dict(model, options=FULL_STATE)  # every process: gathers FSDP's shards
    if proc.rank == 0:
        final = Path(cfg.out) / "final"
        model.save_pretrained(final, model_state)
        log(f"training took {time.time() - t0:.0f} s; model saved to {final}")
        if files.test_json and not cfg.no_eval:
            from evaluate import evaluate
            result = evaluate(MLMamba.from_pretrained(final), files.test_json)  # the saved model, on the CPU
            log("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in result.items()))
            (Path(cfg.out) / "eval.json").write_text(json.dumps(result, indent=2))
    if proc.world_size > 1:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    sys.exit(main())
