"""Reading and writing checkpoints: the plumbing shared by every loader (mamba2.py, vision.py, model.py).

- `resolve_folder`: a local folder, or a Hugging Face repo id downloaded with huggingface_hub when it is installed.
- `read_tensors`: every tensor of a checkpoint folder: model.safetensors, sharded safetensors (an index json), or
  pytorch_model.bin read with `torch.load(weights_only=True)` (no pickled code runs).
- `match_tensors`: apply a loader's explicit name map (our name -> checkpoint name) and check it both ways: missing
  tensors, unexpected tensors and shape conflicts are all reported together, and nothing is loaded half-way.
- `load_on_meta`: every loader's sequence (built on the meta device, matched, put in place, moved).
- `load_tokenizer`: a tokenizer.json.
- `atomic_write` (and `save_safetensors`, `write_json`): a temp file + rename, so a crash never leaves a torn file.
- `known_fields`, `check_fields`: a config's fields checked before any work starts.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


def resolve_folder(path_or_repo_id, allow_patterns=None):
    """Return a local folder for `path_or_repo_id`: the folder itself, or a download of the hub repo with that id."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; give the folder that holds config.json and the weights")
    looks_like_repo_id = str(path_or_repo_id).count("/") == 1 and not str(path_or_repo_id).startswith((".", "/", "~"))
    if not looks_like_repo_id:
        raise CheckpointError(f"checkpoint folder not found: {path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{path_or_repo_id!r} is not a local folder. To download the repo with that id: pip install "
            f"huggingface_hub, or fetch it elsewhere with `hf download {path_or_repo_id} --local-dir DIR` "
            f"and pass DIR") from None
    try:
        return Path(snapshot_download(str(path_or_repo_id), allow_patterns=allow_patterns))
    except Exception as e:
        raise CheckpointError(f"could not download {path_or_repo_id!r} from the hub ({type(e).__name__}: {e}); "
                              "download it where the network is reachable and pass the local folder") from None


def read_config(folder, name="config.json"):
    """The JSON object in folder / name (a checkpoint's config.json, or a shard index)."""
    file = Path(folder) / name
    if not file.is_file():
        raise CheckpointError(f"no {name} in {folder}")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file} must hold a JSON object, not a {type(cfg).__name__}")
    return cfg


def inside(root, name):
    """root / name when it stays inside root (no "..", no absolute path, no link out), else None: a file named by a
    data or index file is read from its own folder only."""
    path = Path(root) / name
    return path if path.resolve().is_relative_to(Path(root).resolve()) else None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64,
                      "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


READ_CHUNK = 32 << 20  # bytes a read in read_bytes; each thread keeps two such buffers
READ_THREADS = 4


def read_bytes(file, offset, size, device):
    """The file's bytes [offset, offset + size) as one uint8 tensor on `device`. READ_THREADS threads read chunks of
    READ_CHUNK bytes into host buffers (pinned for CUDA; `os.preadv` lets the other threads run while the kernel
    copies from the page cache) and copy each to the device on their own stream while reading the next."""
    out = torch.empty(size, dtype=torch.uint8, device=device)
    if out.is_meta or size == 0:
        return out
    on_cuda = out.is_cuda
    starts = range(0, size, READ_CHUNK)
    threads = min(READ_THREADS, len(starts))  # a small file: fewer threads

    def read_every(k):  # thread k: chunks k, k + threads, ..., alternating between its two buffers
        stream = torch.cuda.Stream(out.device) if on_cuda else None
        buffers = [torch.empty(min(READ_CHUNK, size), dtype=torch.uint8, pin_memory=on_cuda) for _ in range(2)]
        copied = [None, None]  # the CUDA event after each buffer's last copy
        for j, start in enumerate(starts[k::threads]):
            buf = buffers[j % 2][:min(READ_CHUNK, size - start)]
            if copied[j % 2] is not None:
                copied[j % 2].synchronize()
            _pread_into(fd, buf, offset + start)
            with torch.cuda.stream(stream) if on_cuda else nullcontext():
                out[start:start + len(buf)].copy_(buf, non_blocking=on_cuda)
                copied[j % 2] = stream.record_event() if on_cuda else None
        if on_cuda:
            stream.synchronize()

    fd = os.open(file, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read_every, range(threads)))  # a thread's error is raised here
    finally:
        os.close(fd)
    return out


def _pread_into(fd, buf, offset):
    """buf (a uint8 CPU tensor) filled with the file's bytes from offset on."""
    view = memoryview(buf.numpy())
    while len(view):
        n = os.preadv(fd, [view], offset) if hasattr(os, "preadv") else _pread_copy(fd, view, offset)
        if n == 0:
            raise ValueError(f"the file ends {len(view)} bytes early")
        view, offset = view[n:], offset + n


def _pread_copy(fd, view, offset):
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


def load_safetensors_to(file, device):
    """A .safetensors file's tensors as {name: tensor} on `device`, its data section read straight into one buffer
    there (`read_bytes`): the file is 8 bytes of header length (little-endian), a JSON header {name: {dtype, shape,
    data_offsets: [begin, end]}}, then the tensors' bytes back to back. Each tensor is a view of the one buffer, or a
    copy where its offset is not 16-byte aligned (a view needs its dtype's alignment, and kernels read aligned rows
    fastest)."""
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if size < 8 + n:
            raise ValueError(f"the header says {n} bytes, and the file holds {size - 8} after the length")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"the tensors end at byte {8 + n + end}, and the file has {size}")
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} is stored as {info['dtype']}, which this loader does not "
                                  "read; load the model with device='cpu' (safetensors' own reader), then move it")
    data = read_bytes(file, 8 + n, end, device)
    tensors = {}
    for name, info in header.items():
        begin, stop = info["data_offsets"]
        raw = data[begin:stop] if begin % 16 == 0 else data[begin:stop].clone()
        tensors[name] = raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def _read_one(file, device="cpu"):
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file)) if str(device) == "cpu" else load_safetensors_to(file, device)
        return torch.load(str(file), map_location=device, weights_only=True)
    except CheckpointError:
        raise
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"could not read {file}: {type(e).__name__}: {e}. The file is truncated or corrupt: "
                              "download it again") from None


def read_tensors(folder, device="cpu"):
    """All tensors of a checkpoint folder as {name: tensor} on `device`, whichever of the public file layouts it
    uses. On a GPU each safetensors file is read straight into one buffer there (`load_safetensors_to`)."""
    folder = Path(folder)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return _read_one(folder / single, device)
        if (folder / index).is_file():  # sharded: the index maps each tensor to its shard file
            weight_map = read_config(folder, index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{folder / index} has no weight_map {{tensor name: shard file}}")
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                path = inside(folder, shard)
                if path is None:
                    raise CheckpointError(f"{folder / index} names the shard {shard!r}, outside {folder}")
                tensors.update(_read_one(path, device))
            return tensors
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors (or shards with "
                          "model.safetensors.index.json) or pytorch_model.bin")


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a folder holding one.

    The public Mamba-2 checkpoints use GPT-NeoX-20B's tokenizer, which their repos do not ship: take tokenizer.json
    from EleutherAI/gpt-neox-20b.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}; Mamba-2 uses GPT-NeoX-20B's tokenizer: put "
                                "EleutherAI/gpt-neox-20b's tokenizer.json there")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises its own exception type
        raise CheckpointError(f"{file} is not a valid tokenizer.json ({e}); take it again from its source") from None


def listing(items, limit=12, sep=", "):
    """The first `limit` items joined by sep, then how many there are in all: what an error shows of a long list."""
    items = list(items)
    return sep.join(items[:limit]) + (f"{sep}... ({len(items)} in all)" if len(items) > limit else "")


@contextmanager
def config_errors(source):
    """Inside: a config field that is missing, or of the wrong type or value, becomes a CheckpointError naming
    `source` and the field (the config classes check their fields in __post_init__)."""
    try:
        yield
    except KeyError as e:
        raise CheckpointError(f"{source} has no {e.args[0]!r} field") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def match_tensors(expected_shapes, tensors, key_map, ignore=(), source="checkpoint"):
    """Build a state dict {our name: tensor} from checkpoint `tensors` through `key_map` {our name: checkpoint name}.

    expected_shapes: {our name: shape} (from the model's state_dict). Every one of our names must be in key_map,
    every mapped checkpoint tensor must exist with the right shape, and every checkpoint tensor must be used
    (except the names in `ignore`, e.g. a text tower we do not build). Any failure lists all problems at once.
    """
    unmapped = set(expected_shapes) - set(key_map)
    if unmapped:  # a bug in a loader's map, not in the checkpoint
        raise CheckpointError(f"the name map misses model tensors: {listing(sorted(unmapped))}")
    missing = [f"{ck} (for {ours})" for ours, ck in key_map.items() if ck not in tensors]
    used = set(key_map.values())
    unexpected = [k for k in tensors if k not in used and k not in ignore]
    conflicts = [f"{ck}: expected {tuple(expected_shapes[ours])}, found {tuple(tensors[ck].shape)}"
                 for ours, ck in key_map.items() if ck in tensors and tensors[ck].shape != expected_shapes[ours]]
    if missing or unexpected or conflicts:
        lines = [f"{source} does not match the model:"]
        if missing:
            lines.append(f"  missing tensors: {listing(sorted(missing))}")
        if unexpected:
            lines.append(f"  unexpected tensors: {listing(sorted(unexpected))}")
        if conflicts:
            lines.append(f"  shape conflicts: {listing(sorted(conflicts))}")
        lines.append("  Nothing was loaded. Check that config.json belongs to these weights.")
        raise CheckpointError("\n".join(lines))
    return {ours: tensors[ck] for ours, ck in key_map.items()}


def stored_shapes(model):
    """{name: shape} of the tensors a checkpoint of `model` stores: its state_dict, a tied weight once (under its
    first name: the embedding, not a tied LM head)."""
    tied = {k for k, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
    return {k: v.shape for k, v in model.state_dict().items() if k not in tied}


def matched_state(model, tensors, key_map=None, ignore=(), source="checkpoint"):
    """A checkpoint's `tensors` under `model`'s names, checked against the names and shapes it stores
    (`stored_shapes`, `match_tensors`); key_map: {our name: checkpoint name}, default the same names."""
    expected = stored_shapes(model)
    return match_tensors(expected, tensors, key_map or {k: k for k in expected}, ignore=ignore, source=source)


class NoRandomFills(TorchFunctionMode):
    """Inside it, a normal fill of a meta tensor (Tensor.normal_, nn.init.normal_, xavier_normal_, ...) returns the
    tensor as it is. A model built on the meta device has no values to draw, and torch runs normal_ on meta through a
    Python kernel whose first call imports its symbolic-shape machinery (sympy, the compiler's modules): seconds of
    start-up for a loader that needs none of it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", "").endswith("normal_") and getattr(tensor, "is_meta", False):
            return tensor
        return func(*args, **kwargs)


def load_on_meta(build, tensors, key_map=None, ignore=(), source="checkpoint", dtype=torch.float32, device="cpu"):
    """Every loader's sequence: the model built by build() on the meta device (no memory, no random init), the
    checkpoint's `tensors` matched to its names and shapes (`matched_state`) and put in place, tied weights tied
    again, then the model moved to dtype and device."""
    with NoRandomFills(), torch.device("meta"):
        model = build()
    state = matched_state(model, tensors, key_map, ignore, source)
    model.load_state_dict(state, strict=False, assign=True)  # match_tensors checked that every tensor is there
    for module in model.modules():
        if hasattr(module, "tie_weights"):
            module.tie_weights()
    return model.to(device=device, dtype=dtype)


def atomic_write(file, write):
    """write(tmp) writes the content to a temp file beside `file`, which is then renamed to `file`: a reader sees
    the old file or the new one, never a torn one."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")
    write(tmp)
    os.replace(tmp, file)


def save_safetensors(tensors, file, metadata=None):
    """Write {name: tensor} to `file` atomically."""
    atomic_write(file, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                             str(tmp), metadata=metadata))


def atomic_write_text(file, text):
    atomic_write(file, lambda tmp: tmp.write_text(text))


def write_json(obj, file):
    atomic_write_text(file, json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Checking configs
# ----------------------------------------------------------------------------------------------------------------

def known_fields(cls, d):
    """d (a config's JSON object), or a ValueError naming the keys that are not fields of the dataclass cls."""
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return d


def check_fields(config, source, positive=(), nonnegative=(), choices=None):
    """Every field of a config dataclass has its declared type (int, float, bool, str or tuple; an int is a float
    too), the named ones are > 0 or >= 0, and those in choices {name: allowed values} one of theirs; otherwise a
    ValueError naming `source` and the field."""
    for f in fields(config):
        value, kind = getattr(config, f.name), f.type if isinstance(f.type, type) else None
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {int: isinstance(value, int) and not isinstance(value, bool), float: is_number,
              bool: isinstance(value, bool), str: isinstance(value, str), tuple: isinstance(value, (tuple, list))}
        if kind in ok and not ok[kind]:
            raise ValueError(f"{source}: {f.name} must be {'an' if kind is int else 'a'} {kind.__name__}, "
                             f"not {value!r}")
        if (f.name in positive and not value > 0) or (f.name in nonnegative and not value >= 0):
            raise ValueError(f"{source}: {f.name} must be {'> 0' if f.name in positive else '>= 0'}, not {value!r}")
        if f.name in (choices or {}) and value not in choices[f.name]:
            raise ValueError(f"{source}: unknown {f.name} {value!r}: use {' or '.join(map(repr, choices[f.name]))}")
