"""Several processes (torchrun), for train.py: each takes its slice of every global batch.

FSDP (the paper's choice, the default) splits every parameter, gradient and optimizer state over the processes, so
each holds 1/N of them; a block's whole weights are gathered just for its forward and its backward. DDP keeps a whole
copy on each and averages the gradients.
"""

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
