"""Data: the LLaVA-format loader (the paper's training data, and the synthetic world's: synthetic.py), batching into
right-padded micro-batches, the order of a stage's batches, and the byte-level tokenizer trained on the fly.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from model import EOS_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, encode_conversation
from weights import inside, listing


# ----------------------------------------------------------------------------------------------------------------
# LLaVA-format data
# ----------------------------------------------------------------------------------------------------------------

def conversation_turns(sample):
    """LLaVA's {"from": "human"/"gpt", "value"} list -> [(role, text)]."""
    return [(t["from"], t["value"]) for t in sample["conversations"]]


def sample_problem(sample, image_root):
    """Why a LLaVA-format sample cannot be trained on, or None when it can: a JSON object whose "conversations" is a
    list of turns {"from": "human" / "gpt", "value": text} alternating from "human", with at least one reply that is
    not empty, one "<image>" at most, and, when it has an "image", a file of that name under image_root."""
    if not isinstance(sample, dict):
        return f"a sample must be a JSON object, not {type(sample).__name__}"
    turns = sample.get("conversations")
    if not isinstance(turns, list) or not turns:
        return 'no "conversations" list'
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            keys = ", ".join(map(str, turn)) if isinstance(turn, dict) else type(turn).__name__
            return f'turn {j} is not {{"from", "value"}} (it has: {keys})'
        if not isinstance(turn["value"], str):
            return f'turn {j}: "value" must be text, not {turn["value"]!r}'
        if turn["from"] != ("human" if j % 2 == 0 else "gpt"):
            return f'turn {j} is from {turn["from"]!r}; turns alternate "human" / "gpt", from "human"'
    if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        return "no reply to train on"
    if sum(t["value"].count(IMAGE_TOKEN) for t in turns) > 1:
        return f"more than one {IMAGE_TOKEN} placeholder"
    if "image" in sample:
        image = sample["image"]
        if not isinstance(image, str) or not image:
            return f'"image" must be a file name, not {image!r}'
        if inside(image_root, image) is None:
            return f"image {image!r} is outside the image root {image_root}"
        if not (Path(image_root) / image).is_file():
            return f"image not found: {Path(image_root) / image}"
    return None


def train_tokenizer(texts, vocab_size=512):
    """A byte-level BPE tokenizer trained on `texts`, with the stop token and the image placeholder as special
    tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, IMAGE_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


@dataclass(frozen=True)
class DataFiles:
    """The files a training run reads: training conversations, their images' folder, text-only conversations for
    the pretrain stage, and (the synthetic world) the test questions scored at the end."""
    train_json: Path
    image_root: Path = None
    pretrain_json: Path = None
    test_json: Path = None


class LLaVADataset(torch.utils.data.Dataset):
    """A LLaVA-format JSON list. Samples with an "image" get pixels (from image_root); others are text-only.

    tokenizer, image_token_id, num_image_tokens, prompt: as `encode_conversation` takes them. preprocess: image path
    -> {encoder name: (3, S, S)} (`DualEncoder.preprocess`). Malformed samples are set aside when the file is loaded,
    with their reason in `problems` {index: reason}; an image that fails to decode in training becomes a
    `{"skip": reason}` item that `collate` drops, so one bad sample never stops a run. cache_images: keep each image's
    pixels in memory after its first read (the synthetic world's 3000 images of 48 px take ~170 MB)."""

    def __init__(self, json_path, image_root, tokenizer, image_token_id, num_image_tokens, preprocess,
                 cache_images=False, prompt="in-out"):
        self.json_path = Path(json_path)
        if not self.json_path.is_file():
            raise FileNotFoundError(f"data file not found: {self.json_path}")
        try:
            samples = json.loads(self.json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.json_path} is not valid JSON: {e}") from None
        if not isinstance(samples, list):
            raise ValueError(f"{self.json_path} must hold a JSON list of samples, not a {type(samples).__name__}")
        self.image_root = Path(image_root) if image_root else self.json_path.parent
        reasons = [sample_problem(x, self.image_root) for x in samples]
        self.problems = {i: r for i, r in enumerate(reasons) if r is not None}
        self.file_index = [i for i, r in enumerate(reasons) if r is None]  # kept sample -> its index in the file
        self.samples = [samples[i] for i in self.file_index]
        self.tokenizer, self.image_token_id, self.num_image_tokens = tokenizer, image_token_id, num_image_tokens
        self.prompt = prompt
        self.preprocess = preprocess
        self.pixel_cache = {} if cache_images else None

    def __len__(self):
        return len(self.samples)

    def set_aside_line(self, shown=5):
        """One line: how many samples of the file were set aside as malformed, and why (the first few)."""
        problems = [f"sample {i}: {reason}" for i, reason in self.problems.items()]
        return (f"{self.json_path}: {len(problems)} of {len(problems) + len(self)} samples set aside: "
                + listing(problems, shown, sep="; "))

    def _skip(self, i, reason):
        return {"skip": f"sample {self.file_index[i]} ({self.samples[i].get('id', '?')}): {reason}"}

    def _pixels(self, image):
        if self.pixel_cache is not None and image in self.pixel_cache:
            return self.pixel_cache[image]
        pixels = self.preprocess(self.image_root / image)
        if self.pixel_cache is not None:
            self.pixel_cache[image] = pixels
        return pixels

    def __getitem__(self, i):
        sample = self.samples[i]
        turns = conversation_turns(sample)
        has_image = "image" in sample
        try:
            ids, labels = encode_conversation(self.tokenizer, turns, self.image_token_id if has_image else None,
                                              self.num_image_tokens, self.prompt)
            pixels = self._pixels(sample["image"]) if has_image else None
        except ValueError as e:  # ImageError is a ValueError
            return self._skip(i, str(e))
        if not has_image:  # text-only: no placeholder may stay in the text
            keep = [k for k, t in enumerate(ids) if t != self.image_token_id]
            ids, labels = [ids[k] for k in keep], [labels[k] for k in keep]
        return {"input_ids": ids, "labels": labels, "pixels": pixels}


def collate(items):
    """Right-pad a list of dataset items into a batch: {"input_ids", "labels" (b, L), "pixel_values" {name: (b, 3,
    S, S)} or None, "tokens" (the real ones, padding excluded), "skipped" [reasons]}; input_ids is None when every
    item was skipped. Text-only rows get zero pixels (never read: they hold no image slot)."""
    skipped = [x["skip"] for x in items if "skip" in x]
    items = [x for x in items if "skip" not in x]
    if not items:
        return {"input_ids": None, "labels": None, "pixel_values": None, "tokens": 0, "skipped": skipped}
    L = max(len(x["input_ids"]) for x in items)
    ids = torch.tensor([x["input_ids"] + [0] * (L - len(x["input_ids"])) for x in items])
    labels = torch.tensor([x["labels"] + [IGNORE_INDEX] * (L - len(x["labels"])) for x in items])
    pixels = None
    with_image = [x["pixels"] for x in items if x["pixels"] is not None]
    if with_image:
        pixels = {name: torch.stack([x["pixels"][name] if x["pixels"] is not None else torch.zeros_like(px)
                                     for x in items]) for name, px in with_image[0].items()}
    tokens = sum(len(x["input_ids"]) for x in items)
    return {"pixel_values": pixels, "input_ids": ids, "labels": labels, "tokens": tokens, "skipped": skipped}


@dataclass
class StageBatches(torch.utils.data.Sampler):
    """The micro-batches of one training stage, steps `start` to `total`, in a fixed order (a DataLoader's
    batch_sampler). Epoch e shuffles with seed + e, so a resumed run sees exactly the batches an uninterrupted one
    would. Of each global batch, process `rank` of `world_size` takes every world_size-th sample, and yields its
    share in micro-batches of `micro` samples."""
    n: int
    global_batch: int
    micro: int
    seed: int
    start: int
    total: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        local = self.global_batch // self.world_size
        if self.global_batch % self.world_size or local % self.micro:
            raise ValueError(f"global batch {self.global_batch} must split into {self.world_size} devices x whole "
                             f"micro-batches of {self.micro}")

    def steps_per_epoch(self):
        return self.n // self.global_batch

    def indices(self, step):
        """This process's sample indices of global step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch())
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return order[k * self.global_batch:(k + 1) * self.global_batch][self.rank::self.world_size].tolist()

    def micro_per_step(self):
        return -(-self.global_batch // self.world_size // self.micro)

    def __iter__(self):
        for step in range(self.start, self.total):
            share = self.indices(step)
            for m in range(0, len(share), self.micro):
                yield share[m:m + self.micro]

    def __len__(self):
        return (self.total - self.start) * self.micro_per_step()
