"""Train ML-Mamba: stage 1 "align" (connector only), stage 2 "finetune" (connector + LM); vision always frozen.
Before them, a "pretrain" stage can train the LM alone on text-only data (--pretrain-data): the synthetic world has no
pretrained LM, so its default run first teaches its tiny LM the world's language, with each scene written out in
words where the image will be; align then has a LM worth aligning to, as in the paper.

    python train.py                      # no download: builds the synthetic shapes world and a tiny ML-Mamba, runs
                                         # pretrain, align, finetune; prints held-out accuracy per question family
    python train.py --stage finetune --data llava_v1_5_mix665k.json --image-root DIR \\
        --llm mamba2-2.7b --dinov2 dinov2-large --siglip siglip-so400m-patch14-384 --tokenizer gpt-neox-20b
    torchrun --nproc_per_node=8 train.py ...        # one process per GPU, the model sharded over them (FSDP)
    torchrun --nproc_per_node=8 train.py --parallel ddp ...   # or replicated on each (DDP)

The paper's recipe (Table 1): AdamW, cosine decay after a linear warmup over 3% of the steps, lr 2e-5, weight decay
0.1, 2 epochs, global batch = per-device batch x gradient accumulation x devices, bf16 autocast on fp32 master
weights, gradient clipping at 1.0.

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
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from data import (Batches, LLaVADataset, build_synthetic_dataset, collate, conversation_turns,
                  synthetic_dataset_is_built, train_tokenizer)
from model import IGNORE_INDEX, MLMamba, MLMambaConfig, conversation_segments
from weights import CheckpointError

STAGES = ("pretrain", "align", "finetune")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="all", choices=["pretrain", "align", "finetune", "both", "all"],
                   help="all: pretrain (when there is --pretrain-data), align, finetune; both: align, finetune")
    p.add_argument("--data", help="LLaVA-format JSON; default: the synthetic world (built if missing)")
    p.add_argument("--image-root", help="folder the samples' image paths are relative to (default: the JSON's)")
    p.add_argument("--pretrain-data", help="text-only LLaVA-format JSON for the pretrain stage (LM alone); "
                                           "default: none, synthetic: the world's text.json")
    p.add_argument("--synthetic-dir", default="data/synthetic")
    p.add_argument("--llm", help="Mamba-2 checkpoint folder or repo id (real runs)")
    p.add_argument("--siglip", help="SigLIP checkpoint folder or repo id")
    p.add_argument("--dinov2", help="DINOv2 checkpoint folder or repo id")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder (real runs: GPT-NeoX-20B's)")
    p.add_argument("--init-from", help="an ML-Mamba folder to start from (e.g. the align stage's output); with a "
                                       "--connector or --scan other than its own, a new connector on its LM")
    p.add_argument("--connector", choices=["mlp", "msc-basic", "msc-advanced"],
                   help="default msc-advanced (with --init-from: the folder's)")
    p.add_argument("--scan", choices=["bsm", "csm"], help="default bsm (with --init-from: the folder's)")
    p.add_argument("--drop-path", type=float, default=0.1, help="the MSC blocks' stochastic depth")
    p.add_argument("--image-size", type=int, default=384, help="encoder input size (real runs)")
    p.add_argument("--out", default="runs/synthetic")
    p.add_argument("--epochs", type=float, default=None, help="finetune epochs (default 2; synthetic 20)")
    p.add_argument("--align-epochs", type=float, default=None, help="align epochs (default 1)")
    p.add_argument("--pretrain-epochs", type=float, default=40,
                   help="text-only pretrain epochs (the synthetic text.json or --pretrain-data)")
    p.add_argument("--lr", type=float, default=None, help="finetune and pretrain lr (default 2e-5; synthetic 1e-3)")
    p.add_argument("--align-lr", type=float, default=None, help="align lr (default 1e-3; synthetic 1e-4)")
    p.add_argument("--connector-lr", type=float, default=None,
                   help="the connector's lr in the finetune stage (default: --lr; synthetic 1e-4, see make_optimizer)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--global-batch", type=int, default=None, help="default 64 (synthetic 32)")
    p.add_argument("--per-device-batch", type=int, default=None, help="default: the global batch / devices")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--parallel", default="fsdp", choices=["fsdp", "ddp"],
                   help="under torchrun: shard the model over the processes (FSDP) or replicate it (DDP)")
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-steps", type=int, default=None, help="stop each stage after this many steps (tests)")
    p.add_argument("--seed", type=int, default=0, help="initialization, batch order, stochastic depth")
    p.add_argument("--world-seed", type=int, default=0,
                   help="the synthetic world's seed (apart from --seed: runs that differ in --seed share one world)")
    p.add_argument("--extra-spatial", type=int, default=0,
                   help="the synthetic world: spatial questions added to each training conversation that can pose one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: a crash after N steps
    args = p.parse_args(argv)
    synthetic = args.data is None
    args.epochs = args.epochs if args.epochs is not None else (20 if synthetic else 2)
    args.align_epochs = args.align_epochs if args.align_epochs is not None else 1
    args.lr = args.lr if args.lr is not None else (1e-3 if synthetic else 2e-5)
    args.align_lr = args.align_lr if args.align_lr is not None else (1e-4 if synthetic else 1e-3)
    args.connector_lr = args.connector_lr if args.connector_lr is not None else (1e-4 if synthetic else args.lr)
    args.global_batch = args.global_batch or (32 if synthetic else 64)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------------------

def setup_distributed(args):
    """(rank, world). Under torchrun: one process per device; NCCL for CUDA tensors, gloo for CPU tensors (the token
    and loss counts are summed on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    rank = int(os.environ["RANK"])
    if args.device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        args.device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group("cpu:gloo,cuda:nccl" if args.device.startswith("cuda") else "gloo")
    return rank, world


def shard(model, device):
    """FSDP2 (torch.distributed.fsdp.fully_shard): every LM block, the connector, then the rest (embeddings, head,
    vision encoders) each become one unit whose parameters are split over the processes (DTensors). Before a unit's
    forward and backward its whole weights are all-gathered; after the backward its gradients are reduce-scattered
    (averaged), so each process updates only its own shard. The tied embedding and head stay in one unit.
    The device mesh is made for `device` explicitly: left to itself, FSDP puts it on CUDA whenever CUDA exists, so
    `--device cpu` on a one-GPU machine would send the second process to a "cuda:1" that is not there."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.split(":")[0], (dist.get_world_size(),))
    # FSDP warns when a unit returns a view; the connector's output is the (b, N, D) view nn.Linear gives for 3-D
    # inputs, and nothing writes into it in place (splice copies it into a new tensor)
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


def synthetic_model(tokenizer, args):
    """The tiny default: two small from-scratch encoders (frozen), the MSC connector, a small Mamba-2 LM.
    Images are 48 px with 16 px patches: a 3 x 3 grid of tokens, one per cell of the synthetic scenes."""
    from connector import ConnectorConfig
    from mamba2 import Mamba2Config
    from vision import ViTConfig
    # chunk 16: the conversations are ~60-100 tokens, and the intra-chunk (Q, Q) products grow with Q
    lm = Mamba2Config(d_model=96, n_layer=3, vocab_size=tokenizer.get_vocab_size(), d_state=16, headdim=16,
                      chunk_size=16, pad_vocab_size_multiple=16)
    vit = dict(image_size=48, patch_size=16, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               input_size=48)
    vision = {"dinov2": ViTConfig("dinov2", **vit), "siglip": ViTConfig("siglip", **vit)}
    cc = ConnectorConfig.for_lm(lm, vision_dim=128, grid=(3, 3), drop_path=args.drop_path, **connector_choice(args))
    return MLMamba(MLMambaConfig(lm=lm, vision=vision, connector=cc, max_length=512), tokenizer)


def synthetic_tokenizer(json_paths):
    """A byte-level BPE tokenizer trained on the prompts and replies, as the model reads them, of LLaVA-format files."""
    samples = [x for f in json_paths if f for x in json.loads(Path(f).read_text())]
    return train_tokenizer([s for x in samples for s, _ in conversation_segments(conversation_turns(x))])


def connector_choice(args):
    """The connector fields given on the command line (ConnectorConfig's defaults for the others)."""
    return {k: v for k, v in (("kind", args.connector), ("scan", args.scan)) if v is not None}


def build_model(args, log=print):
    if args.init_from:
        model = MLMamba.from_pretrained(args.init_from)
        saved, asked = model.config.connector, connector_choice(args)
        if any(getattr(saved, k) != v for k, v in asked.items()):
            # the paper's ablations (Tables 6-7): one pretrained LM, a new connector of each kind; the folder's
            # LM, encoders and tokenizer are kept, its connector is dropped
            torch.manual_seed(args.seed)
            model.new_connector(replace(saved, drop_path=args.drop_path, **asked))
            cc = model.config.connector
            log(f"a new {cc.kind}/{cc.scan} connector on {args.init_from}'s LM (its connector, "
                      f"{saved.kind}/{saved.scan}, is not used)")
        return model
    if args.data is None:  # synthetic: a tokenizer trained on the training conversations, saved with the model
        tokenizer = synthetic_tokenizer([args.train_json, args.pretrain_data])
        torch.manual_seed(args.seed)
        return synthetic_model(tokenizer, args)
    missing = [n for n in ("llm", "siglip", "dinov2", "tokenizer") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"training on --data needs --{', --'.join(missing)} (or --init-from an ML-Mamba folder)")
    torch.manual_seed(args.seed)
    return MLMamba.from_components(args.llm, {"dinov2": args.dinov2, "siglip": args.siglip}, args.tokenizer,
                                   connector={"drop_path": args.drop_path, **connector_choice(args)},
                                   input_size=args.image_size)


def lr_factor(step, total, warmup):
    """Linear warmup to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, lr, weight_decay, connector_lr=None):
    """AdamW; no weight decay on biases, norms and the SSM's A_log, D, dt_bias (1-D tensors).

    connector_lr: the connector's own lr (default: lr). The image tokens feed the LM's pre-norm blocks, which
    divide out their scale, so nothing holds the connector's output norm in place: at too high an lr it grows by
    orders of magnitude and learning stalls (docs/synthetic-world.md). LLaVA's trainer has the same option
    (mm_projector_lr)."""
    connector = {id(p) for p in model.connector.parameters()}
    groups = []
    for is_connector in (False, True):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in connector) == is_connector]
        group_lr = connector_lr if is_connector and connector_lr is not None else lr
        groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr": group_lr},
                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": group_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))


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
    """stage_dir/checkpoint-STEP/, then stage_dir/latest -> it, switched atomically. state, optimizer_state: from
    full_state."""
    ckpt = stage_dir / f"checkpoint-{step}"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp = stage_dir / f".tmp-checkpoint-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state)
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "total_steps": total, "done": done}))
    os.replace(tmp, ckpt)
    pointer = stage_dir / "latest.tmp"
    pointer.write_text(ckpt.name)
    os.replace(pointer, stage_dir / "latest")  # the switch: before it the old checkpoint rules, after it the new
    for old in sorted(stage_dir.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt


def latest_checkpoint(stage_dir):
    pointer = stage_dir / "latest"
    if not pointer.is_file():
        return None
    ckpt = stage_dir / pointer.read_text().strip()
    return ckpt if (ckpt / "state.json").is_file() else None


# ----------------------------------------------------------------------------------------------------------------
# One stage
# ----------------------------------------------------------------------------------------------------------------

def run_stage(stage, model, dataset, args, rank, world, log=print):
    """Train one stage; returns the model (unwrapped)."""
    device = args.device
    parts = sorted({n.split(".")[0] for n in model.set_stage(stage)})
    log(f"[{stage}] trainable: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M "
              f"parameters in {len(parts)} parts ({', '.join(parts)}); vision frozen")
    epochs = {"pretrain": args.pretrain_epochs, "align": args.align_epochs, "finetune": args.epochs}[stage]
    lr = args.align_lr if stage == "align" else args.lr
    batches = Batches(len(dataset), args.global_batch, seed=args.seed + 1000 * (STAGES.index(stage) - 1),
                      rank=rank, world=world)  # pretrain: seed - 1000, align: seed, finetune: seed + 1000
    per_epoch = batches.steps_per_epoch()
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples are fewer than one global batch of {args.global_batch}")
    total = max(1, int(epochs * per_epoch))
    if args.max_steps:
        total = min(total, args.max_steps)
    local_batch = args.global_batch // world
    micro = args.per_device_batch or local_batch
    if args.global_batch % world or local_batch % micro:
        raise ValueError(f"global batch {args.global_batch} must split into {world} devices x whole micro-batches "
                         f"of {micro}")
    optimizer = make_optimizer(model, lr, args.weight_decay,  # after shard(): FSDP's parameters are the shards
                               connector_lr=args.connector_lr if stage == "finetune" else None)
    warmup = max(1, int(args.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))

    stage_dir = Path(args.out) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    ckpt = latest_checkpoint(stage_dir) if args.resume else None
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        trainer = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        load_full_state(model, optimizer, model.checkpoint_state(ckpt), trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["rng"])
        start = state["step"]
        log(f"[{stage}] resumed from {ckpt} at step {start}/{total}")
        if state["done"]:
            return model

    wrapped = model  # what the forward goes through: FSDP's model is sharded in place (train()), DDP wraps it
    if world > 1 and args.parallel == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if device == "cpu" else [device])
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.startswith("cuda"))
    encoder_inputs = {n: (3, e.config.input_size, e.config.input_size) for n, e in model.vision.encoders.items()}
    model.lm.gradient_checkpointing = args.gradient_checkpointing
    model.train()
    t0, seen = time.time(), 0
    last_good = latest_checkpoint(stage_dir)
    for step in range(start, total):
        epoch, k = divmod(step, per_epoch)
        items = [dataset[i] for i in batches.indices(epoch, k)]
        # the loss is the mean over every target token of the global batch: sum here, divide by the global count
        n_tokens = torch.tensor(float(sum(sum(l != IGNORE_INDEX for l in x["labels"]) for x in items if x)))
        if world > 1:
            dist.all_reduce(n_tokens)
        step_loss = torch.zeros(())
        for m in range(0, len(items), micro):
            batch = collate(items[m:m + micro], encoder_inputs)
            if batch is None:
                continue
            px = {n: v.to(device) for n, v in batch["pixel_values"].items()} if batch["pixel_values"] else None
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
                _, loss_sum = wrapped(px, batch["input_ids"].to(device), batch["labels"].to(device),
                                      loss_reduction="sum", return_logits=False)
            if loss_sum is None:  # no target token in this micro-batch
                continue
            (loss_sum / n_tokens.clamp(min=1) * world).backward()  # DDP and FSDP average over ranks: times world
            step_loss += loss_sum.detach().cpu()
        if world > 1:
            dist.all_reduce(step_loss)
        loss = (step_loss / n_tokens.clamp(min=1)).item()
        if not math.isfinite(loss):
            log(f"[{stage}] loss is {loss} at step {step + 1}: stopping. The last good checkpoint is "
                      f"{last_good or 'none (no checkpoint was written yet)'}")
            sys.exit(1)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   args.max_grad_norm)  # the norm of the whole gradient, also under FSDP
        if isinstance(grad_norm, torch.distributed.tensor.DTensor):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seen += args.global_batch
        done = step + 1 == total
        if rank == 0 and ((step + 1) % args.log_every == 0 or done or step == start):
            rate = seen / max(1e-9, time.time() - t0)
            eta = (total - step - 1) * args.global_batch / max(rate, 1e-9)
            log(f"[{stage}] step {step + 1}/{total} epoch {epoch + 1} loss {loss:.4f} "
                f"grad-norm {float(grad_norm):.3g} lr {scheduler.get_last_lr()[0]:.2e} "
                f"{rate:.1f} samples/s ETA {eta // 60:.0f}m{eta % 60:02.0f}s")
        if (step + 1) % args.save_every == 0 or done:
            model_state, optimizer_state = full_state(model, optimizer)  # every process: gathers FSDP's shards
            if rank == 0:
                last_good = save_checkpoint(stage_dir, model, model_state, optimizer_state, scheduler, step + 1,
                                            total, done=done)
        if world > 1:
            dist.barrier()
        if args.stop_after is not None and step + 1 == args.stop_after:
            raise KeyboardInterrupt(f"stopped after step {step + 1} (--stop-after)")
    return model


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (FileNotFoundError, ValueError, CheckpointError) as e:  # bad data, checkpoint or image: one line
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


def train(args):
    """Both stages as asked; returns the trained model (rank 0 also saves it and, on synthetic data, scores it)."""
    rank, world = setup_distributed(args)
    log = RunLog(rank, Path(args.out) / "train.log")
    torch.manual_seed(args.seed)
    if args.data is None:
        root = Path(args.synthetic_dir)
        world_settings = dict(seed=args.world_seed, extra_spatial=args.extra_spatial)
        if rank == 0 and not synthetic_dataset_is_built(root, **world_settings):  # missing, other settings/version
            log(f"building the synthetic visual-question world in {root} ...")
            build_synthetic_dataset(root, **world_settings)
        if world > 1:
            dist.barrier()
        args.train_json, args.test_json = root / "train.json", root / "test.json"
        args.pretrain_data = args.pretrain_data or root / "text.json"
        image_root = root
    else:
        args.train_json, image_root = Path(args.data), args.image_root
    model = build_model(args, log).to(args.device)
    if world > 1 and args.parallel == "fsdp":
        shard(model, args.device)
    dataset = LLaVADataset(args.train_json, image_root, model, cache_images=args.data is None)
    stages = {"all": STAGES, "both": STAGES[1:]}.get(args.stage, (args.stage,))
    if args.stage == "all" and (not args.pretrain_data or args.pretrain_epochs <= 0):
        stages = STAGES[1:]  # real data: the LM comes pretrained
    if "pretrain" in stages and not args.pretrain_data:
        raise ValueError("--stage pretrain needs --pretrain-data (a text-only LLaVA-format JSON)")
    text = LLaVADataset(args.pretrain_data, None, model) if "pretrain" in stages else None
    cc = model.config.connector
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"(connector {cc.kind}/{cc.scan}); {len(dataset)} training samples"
              + (f", {len(text)} text-only for pretrain" if text else "") + f"; {world} process(es)")
    t0 = time.time()
    for stage in stages:
        model = run_stage(stage, model, text if stage == "pretrain" else dataset, args, rank, world, log)
    skipped = len(dataset.skipped) + (len(text.skipped) if text else 0)
    if skipped:
        log(f"skipped {skipped} sample(s) with a missing or unusable image or text")
    model_state = get_model_state_dict(model, options=FULL_STATE)  # every process: gathers FSDP's shards
    if rank == 0:
        final = Path(args.out) / "final"
        model.save_pretrained(final, model_state)
        log(f"training took {time.time() - t0:.0f} s; model saved to {final}")
        if args.data is None and not args.no_eval:
            from evaluate import evaluate
            result = evaluate(MLMamba.from_pretrained(final), args.test_json)  # the saved model, on the CPU
            log("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in result.items()))
            (Path(args.out) / "eval.json").write_text(json.dumps(result, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    sys.exit(main())
