"""ML-Mamba: vision encoders -> connector -> image tokens spliced into the text -> the Mamba-2 LM (paper eq. 9).

    V = [DINOv2(X); SigLIP(X)]        (b, N, d_v)      vision.py, eq. 5 (frozen)
    F = Connector(V)                   (b, N, D)        connector.py, eqs. 6-8
    E = text embeddings with F put into the N "<image>" slots          MLMamba.embed, one masked assignment
    p(answer | X, prompt) = Mamba2LM(E)                 mamba2.py, eq. 9

The prompt format (config.prompt "in-out": the plain-LM prompt of Cobra and Prismatic's Mamba prompt builder; "zephyr"
is the authors' release's chat format, see conversation_segments), one image, any number of turns:
    "In: <image>\\nWhat is in the picture?\\nOut: A cat.<|endoftext|>\\nIn: What color?\\nOut: Grey.<|endoftext|>"
Each segment is tokenized on its own (so training and inference cut the text the same way), and the "<image>"
placeholder becomes N copies of its token id, one slot per image token: the ids have the length of the sequence the
LM reads. Training labels cover only the replies and their stop token "<|endoftext|>", never the image, the prompts
or the padding.
Batches are padded on the right: the LM is causal, so padding after the real tokens cannot change them.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from connector import Connector, ConnectorConfig
from mamba2 import Mamba2Config, Mamba2LMHeadModel, mamba2_preset
from release import ReleaseConnector
from vision import DINOV2_LARGE, SIGLIP_SO400M_384, DualEncoder, ViT, ViTConfig
from weights import (check_fields, config_errors, known_fields, load_on_meta, load_tokenizer, read_config,
                     read_tensors, save_safetensors, write_json)

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"  # GPT-NeoX-20B's end of text, the stop token
IGNORE_INDEX = -100


@dataclass
class MLMambaConfig:
    lm: Mamba2Config = field(default_factory=Mamba2Config)
    vision: dict = field(default_factory=dict)  # {name: ViTConfig}, in concatenation order
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    vision_layer: int = -2  # the ViT block whose patch tokens are used
    max_length: int = 2048  # the longest prompt accepted, image tokens included
    prompt: str = "in-out"  # the prompt format: "in-out" (this project's) or "zephyr" (the authors' release)

    def to_dict(self):
        return {**asdict(self), "lm": self.lm.to_dict(), "connector": self.connector.to_dict()}

    @classmethod
    def from_file(cls, file):
        """The config of an ML-Mamba folder; a malformed file is a CheckpointError naming the file and the field."""
        with config_errors(file):
            return cls.from_dict(read_config(Path(file).parent))

    @classmethod
    def from_dict(cls, d):
        known_fields(cls, d)
        if not isinstance(d["vision"], dict) or not all(isinstance(v, dict) for v in d["vision"].values()):
            raise ValueError("vision must be an object {encoder name: its ViTConfig fields}")
        return cls(lm=Mamba2Config.from_dict(d["lm"]), vision={k: ViTConfig(**v) for k, v in d["vision"].items()},
                   connector=ConnectorConfig.from_dict(d["connector"]), vision_layer=d.get("vision_layer", -2),
                   max_length=d.get("max_length", 2048), prompt=d.get("prompt", "in-out"))

    def __post_init__(self):
        check_fields(self, "MLMambaConfig", positive=("max_length",), choices={"prompt": PROMPTS})
        depth = min((v.num_layers for v in self.vision.values()), default=None)
        if depth is not None and not -depth <= self.vision_layer < depth:
            raise ValueError(f"MLMambaConfig: vision_layer {self.vision_layer} is not a block of encoders {depth} "
                             f"deep (use {-depth} to {depth - 1}; the paper's is -2)")


# ----------------------------------------------------------------------------------------------------------------
# Prompt format and labels
# ----------------------------------------------------------------------------------------------------------------

PROMPTS = ("in-out", "zephyr")


def conversation_segments(turns, prompt="in-out"):
    """turns: [(role, text)] alternating "human" / "gpt" (LLaVA's names), starting with "human".
    Returns [(text, is_reply)]: the strings to tokenize in order, and whether each is trained on; a text of None is
    the stop token <|endoftext|> (the format's: the same characters typed in a turn stay text, `encode_text`).
        "in-out":  In: {question}\nOut: {reply}<|endoftext|>, turns joined by "\n"; "<image>" stays where it is
        "zephyr":  <|user|>\n{question}<|endoftext|>\n<|assistant|>\n{reply}<|endoftext|>, turns joined by "\n";
                   "<image>" is taken out of the text (the release's format: the image goes before all the text)"""
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt format {prompt!r}: use {' or '.join(map(repr, PROMPTS))}")
    segments = []
    for i, (role, text) in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turn {i} is from {role!r}, expected {expected!r} (turns alternate human / gpt)")
        sep = "\n" if i else ""
        if prompt == "zephyr":
            text = text.replace(IMAGE_TOKEN, "").strip()
            human = [(f"{sep}<|user|>\n{text}", False), (None, False), ("\n<|assistant|>\n", False)]
            reply = [(text or " ", True), (None, True)]
        else:
            human, reply = [(f"{sep}In: {text.strip()}\nOut: ", False)], [(text.strip(), True), (None, True)]
        segments += human if role == "human" else reply
    return segments


def encode_text(tokenizer, text):
    """One segment's token ids: None is the stop token; any other text is plain text, a typed "<|endoftext|>" its
    characters, except "<image>": the image placeholder."""
    if text is None:
        return [tokenizer.token_to_id(EOS_TOKEN)]
    tokenizer.encode_special_tokens = True  # special tokens are not looked for in the text
    ids = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        ids += [tokenizer.token_to_id(IMAGE_TOKEN)] if i else []
        ids += tokenizer.encode(piece, add_special_tokens=False).ids
    return ids


def encode_conversation(tokenizer, turns, image_token_id=None, num_image_tokens=1, prompt="in-out"):
    """Token ids and labels of a conversation; labels are IGNORE_INDEX except on replies and their stop token.
    With image_token_id the sample has an image, N = num_image_tokens slots (copies of image_token_id, never targets):
    where the text holds no placeholder, "<image>\n" opens the first human turn, as in LLaVA's data (so `generate`
    puts the image where training did); the "zephyr" prompt puts the slots before all the text."""
    placeholders = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if placeholders > 1:
        raise ValueError(f"the conversation holds {placeholders} {IMAGE_TOKEN} placeholders; one image per sample")
    if image_token_id is not None and prompt == "in-out" and turns and not placeholders:
        turns = [(turns[0][0], f"{IMAGE_TOKEN}\n{turns[0][1]}")] + list(turns[1:])
    ids, labels = [], []
    if image_token_id is not None and prompt == "zephyr":  # the image's slots before all the text
        ids, labels = [image_token_id] * num_image_tokens, [IGNORE_INDEX] * num_image_tokens
    for text, is_reply in conversation_segments(turns, prompt):
        for t in encode_text(tokenizer, text):
            slots = num_image_tokens if t == image_token_id else 1  # the placeholder -> N image slots
            ids += [t] * slots
            labels += [t if is_reply and t != image_token_id else IGNORE_INDEX] * slots
    return ids, labels


def prepare_tokenizer(tokenizer):
    """Make "<image>" and "<|endoftext|>" single special tokens (added if missing); returns their ids."""
    tokenizer.add_special_tokens([IMAGE_TOKEN, EOS_TOKEN])
    return tokenizer.token_to_id(IMAGE_TOKEN), tokenizer.token_to_id(EOS_TOKEN)


@dataclass
class Conversation:
    """A chat the LM has read so far (`MLMamba.generate(conversation=...)`): every token of it and the LM's fixed-size
    cache, which holds all of them but a final stop token (decoding stops there without reading it); a later turn runs
    only its own tokens through the cache."""
    ids: list = field(default_factory=list)
    cache: object = None  # a Mamba2Cache, or None before the first turn

    def next_turn_ids(self, model, prompt):
        """(every token id of the conversation with the new question, the ids the cache has yet to read): the last
        answer's stop token (added where the answer was cut short), then the turn as `encode_conversation` writes it."""
        if IMAGE_TOKEN in prompt:
            raise ValueError(f"a later turn cannot hold {IMAGE_TOKEN}: one image per conversation, in its first turn")
        earlier = [("human", ""), ("gpt", "")]  # the new turn is written as a third turn
        segments = conversation_segments(earlier + [("human", prompt)], model.config.prompt)
        turn = [t for text, _ in segments[len(conversation_segments(earlier, model.config.prompt)):]
                for t in encode_text(model.tokenizer, text)]
        stopped = self.ids[-1] == model.eos_token_id  # a stop token the cache has not read
        turn = ([] if stopped else [model.eos_token_id]) + turn
        ids = check_length(self.ids + turn, model.config.max_length, "the conversation is {} tokens with this turn")
        return ids, ids[len(self.ids) - stopped:]


def check_length(ids, max_length, what):
    """ids, or a ValueError when they pass max_length: `what` (a format with {} for the length) names them."""
    if len(ids) > max_length:
        raise ValueError(f"{what.format(len(ids))}; the limit is {max_length}")
    return ids


def until_stop(ids, stop_id):
    """Generated ids up to the stop token, which is left out."""
    return ids[:ids.index(stop_id)] if stop_id in ids else ids


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------

def make_connector(config: ConnectorConfig):
    """The connector of config.kind: one of the paper's three (connector.py) or the authors' release's (release.py)."""
    return ReleaseConnector(config) if config.kind == "msc-release" else Connector(config)


class MLMamba(nn.Module):
    def __init__(self, config: MLMambaConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.vision = DualEncoder({name: ViT(c) for name, c in config.vision.items()}, layer=config.vision_layer)
        self.vision.freeze()  # frozen in both training stages
        self.connector = make_connector(config.connector)
        self.lm = Mamba2LMHeadModel(config.lm)
        self.set_tokenizer(tokenizer)

    def new_connector(self, config: ConnectorConfig):
        """Replace the connector with a new one (the paper trains it from scratch on a pretrained LM): random, or
        with init="lm" its Mamba-2 mixers copied from this model's LM."""
        self.config.connector = config
        self.connector = make_connector(config)
        if config.init == "lm" and config.kind != "mlp":
            self.connector.msc.init_from_lm(self.lm)

    def set_tokenizer(self, tokenizer):
        self.tokenizer = tokenizer
        self.image_token_id = self.eos_token_id = None
        if tokenizer is not None:
            self.image_token_id, self.eos_token_id = prepare_tokenizer(tokenizer)
            top = max(set(tokenizer.get_vocab().values()) - {self.image_token_id})  # "<image>" is never read or said
            if top + 1 != self.config.lm.vocab_size:
                raise ValueError(f"the tokenizer's text token ids go up to {top}, the LM's vocabulary to "
                                 f"{self.config.lm.vocab_size - 1}: use the LM's own tokenizer")

    def set_stage(self, stage):
        """Which parameters train: "pretrain" the LM alone (text-only data), "align" the connector, "finetune" the
        connector and the LM; the vision encoders stay frozen. Returns the names of the trainable parameters."""
        if stage not in ("pretrain", "align", "finetune"):
            raise ValueError(f"unknown stage {stage!r}: use 'pretrain', 'align' or 'finetune'")
        self.vision.freeze()
        self.connector.requires_grad_(stage != "pretrain")
        self.lm.requires_grad_(stage != "align")
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def preprocess(self, image):
        """A path or PIL image -> {encoder name: (1, 3, S, S)} on the model's device."""
        device = next(self.parameters()).device
        return {k: v[None].to(device) for k, v in self.vision.preprocess(image).items()}

    def image_tokens(self, pixel_values):
        """{name: (b, 3, S, S)} -> image tokens (b, N, D) in the LM's dtype."""
        feats = self.vision(pixel_values)  # eq. 5: V_img = [DINOv2(X); SigLIP(X)], (b, N, d_v)
        return self.connector(feats).to(self.lm.embedding.weight.dtype)  # eqs. 6-8: V_out, (b, N, D)

    @property
    def num_image_tokens(self):
        """N, the image tokens per image: one per patch of the encoders' grid (729 at 384 px, patch 14)."""
        return self.vision.num_patches

    def embed(self, input_ids, image_tokens=None):
        """Text ids (b, L) + image tokens (b, N, D) -> the LM's input embeddings (b, L, D): a sample with an image
        holds N "<image>" slots (encode_conversation), filled by one masked assignment; text-only rows have none."""
        if self.image_token_id is None:
            return self.lm.embedding(input_ids)
        is_image = input_ids == self.image_token_id  # (b, L)
        embeds = self.lm.embedding(input_ids.masked_fill(is_image, 0))  # (b, L, D); the slots are overwritten below
        slots = is_image.sum(dim=1)  # (b,)
        has_image = slots > 0
        if not has_image.any():
            return embeds
        if image_tokens is None:
            raise ValueError(f"the ids hold {IMAGE_TOKEN} slots but no image was given")
        N = image_tokens.shape[1]
        if (slots[has_image] != N).any():
            raise ValueError(f"a sample with an image needs {N} {IMAGE_TOKEN} slots (encode_conversation with "
                             f"num_image_tokens={N}); found {sorted(set(slots[has_image].tolist()))}")
        embeds[is_image] = image_tokens[has_image].flatten(0, 1).to(embeds.dtype)  # (slots, D), in reading order
        return embeds

    def forward(self, pixel_values, input_ids, labels=None, loss_reduction="mean", return_logits=True):
        """pixel_values {name: (b, 3, S, S)} or None (text only); input_ids, labels (b, L), right-padded, with N image
        slots in each sample with an image. Returns (logits (b, L, vocab), loss or None); loss_reduction "sum": the
        summed loss over the targets. return_logits=False (training): the LM head runs only where a target is
        predicted, the logits returned are None, and the (b, L, vocab) logits (3.3 GB at 8 x 2048 x 50K) never exist."""
        image_tokens = self.image_tokens(pixel_values) if pixel_values is not None else None
        embeds = self.embed(input_ids, image_tokens)  # (b, L, D)
        hidden = self.lm.hidden_states(inputs_embeds=embeds)  # eq. 9: R = f_L(V_out, f_T(Q)), (b, L, D)
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        targets = labels[:, 1:]  # next-token prediction: position t predicts token t + 1
        is_target = targets != IGNORE_INDEX  # (b, L - 1)
        if return_logits:
            logits = self.lm.lm_head(hidden).float()  # (b, L, vocab)
            target_logits = logits[:, :-1][is_target]
        else:
            logits = None
            target_logits = self.lm.lm_head(hidden[:, :-1][is_target]).float()  # (targets, vocab)
        loss = None
        if is_target.any():
            loss = F.cross_entropy(target_logits, targets[is_target], reduction=loss_reduction)
        return logits, loss

    @torch.no_grad()
    def generate(self, image, prompt, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0, image_tokens=None,
                 on_token=None, generator=None, conversation=None, decoder=None):
        """Answer `prompt` about `image` (a path, a PIL image, or None for text only); returns the new token ids, the
        stop token left out. image_tokens: reuse `encode_image`'s. on_token(token id) streams. conversation: a
        `Conversation` to continue (multi-turn chat): its first call reads the image and the prompt, each later one
        only the new turn, from the LM's cache. decoder: as in `Mamba2LMHeadModel.generate`."""
        if not isinstance(prompt, str):
            raise ValueError(f"the prompt must be text, not {type(prompt).__name__}")
        device = self.lm.embedding.weight.device
        if conversation is not None and conversation.ids:  # a later turn
            ids, unread = conversation.next_turn_ids(self, prompt)
            embeds = self.embed(torch.tensor([unread], device=device))
        else:
            n = image_tokens.shape[1] if image_tokens is not None else self.num_image_tokens
            ids = self.prompt_ids(prompt, image_tokens is not None or image is not None, n)
            if image_tokens is None and image is not None:
                image_tokens = self.encode_image(image)
            embeds = self.embed(torch.tensor([ids], device=device), image_tokens)  # (1, L, D), eq. 9's input
            if conversation is not None:
                conversation.cache = (decoder or self.lm).allocate_cache(1)
        new = self.lm.generate(inputs_embeds=embeds, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, eos_token_id=self.eos_token_id, generator=generator,
                               on_token=(lambda t: on_token(int(t[0]))) if on_token else None, decoder=decoder,
                               cache=conversation.cache if conversation is not None else None)[0].tolist()
        if conversation is not None:
            conversation.ids = ids + new
        return until_stop(new, self.eos_token_id)

    def prompt_ids(self, prompt, with_image, num_image_tokens):
        """The token ids of a first turn, checked against max_length."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; give one to MLMamba(config, tokenizer)")
        ids, _ = encode_conversation(self.tokenizer, [("human", prompt)], self.image_token_id if with_image else None,
                                     num_image_tokens=num_image_tokens, prompt=self.config.prompt)
        return check_length(ids, self.config.max_length, "the prompt is {} tokens with the image")

    @torch.no_grad()
    def encode_image(self, image):
        """A path or PIL image -> image tokens (1, N, D), ready for `generate(image_tokens=...)`."""
        return self.image_tokens(self.preprocess(image))

    def save_pretrained(self, folder, state=None):
        """config.json + model.safetensors (our parameter names) + tokenizer.json. state: the tensors to write
        (default: this model's state_dict(); train.py passes the whole tensors it gathered from FSDP's shards)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = dict(self.state_dict() if state is None else state)
        if self.config.lm.tie_embeddings:
            state.pop("lm.lm_head.weight", None)  # the same tensor as lm.embedding.weight
        save_safetensors(state, folder / "model.safetensors")
        write_json(self.config.to_dict(), folder / "config.json")
        if self.tokenizer is not None:
            self.tokenizer.save(str(folder / "tokenizer.json"))

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu"):
        folder = Path(folder)
        config = MLMambaConfig.from_file(folder / "config.json")  # a CheckpointError when there is none
        tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
        model = load_on_meta(lambda: cls(config), read_tensors(folder, device),
                             source=f"ML-Mamba checkpoint {folder}", dtype=dtype, device=device)
        model.set_tokenizer(tokenizer)
        return model


def from_components(lm, vision, tokenizer, connector=None, input_size=384, vision_layer=-2, prompt="in-out",
                    dtype=torch.float32, device="cpu"):
    """A new ML-Mamba from public checkpoints: lm a Mamba-2 folder (or repo id), vision {name: SigLIP or DINOv2
    folder} in concatenation order (the paper: {"dinov2": ..., "siglip": ...}; one encoder alone is the paper's
    encoder ablation, Table 5), tokenizer a tokenizer.json or its folder. connector: ConnectorConfig fields (kind,
    scan, init, ...); the connector is new, as in the paper. prompt: "in-out" or "zephyr"."""
    if not vision:
        raise ValueError("ML-Mamba needs at least one vision encoder (SigLIP and / or DINOv2)")
    lm_model = Mamba2LMHeadModel.from_pretrained(lm)
    encoders = {name: ViT.from_pretrained(path, input_size=input_size) for name, path in vision.items()}
    first = next(iter(encoders.values())).config
    cc = ConnectorConfig.for_lm(lm_model.config, vision_dim=sum(e.config.hidden_size for e in encoders.values()),
                                grid=(first.grid, first.grid), **(connector or {}))
    config = MLMambaConfig(lm=lm_model.config, vision={n: e.config for n, e in encoders.items()}, connector=cc,
                           vision_layer=vision_layer, prompt=prompt)
    with torch.device("meta"):
        model = MLMamba(config)
    model.lm = lm_model
    model.vision = DualEncoder(encoders, layer=vision_layer).freeze()
    model.new_connector(cc)
    model.set_tokenizer(load_tokenizer(tokenizer))
    return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The paper's configuration, and a tour of its shapes: `python model.py`
# ----------------------------------------------------------------------------------------------------------------

def paper_config(size="2.7b"):
    """The paper's ML-Mamba: DINOv2 ViT-L/14 and SigLIP so400m at 384 px (27 x 27 patches), the MSC (msc-advanced,
    BSM), Mamba-2 of `size` (2.7b: 64 layers, d_model 2560)."""
    lm = mamba2_preset(size)
    vision = {"dinov2": DINOV2_LARGE, "siglip": SIGLIP_SO400M_384}
    cc = ConnectorConfig.for_lm(lm, vision_dim=DINOV2_LARGE.hidden_size + SIGLIP_SO400M_384.hidden_size,
                                grid=(DINOV2_LARGE.grid, DINOV2_LARGE.grid), kind="msc-advanced", scan="bsm")
    return MLMambaConfig(lm=lm, vision=vision, connector=cc)


@torch.no_grad()
def tour(size="2.7b", text_tokens=15):
    """The path from an image to the answer at the paper's configuration, one line a stage: what it is, where it is
    computed, the paper's equation or figure, and the tensor's shape. The model is built and run on the meta device:
    shapes without weights, memory or a download."""
    config, n = paper_config(size), mamba2_preset(size).n_layer

    def show(what, where, eq, tensor):
        print(f"  {what:<44} {where:<53} {eq:<14} {tuple(tensor.shape)}")
    print(f"ML-Mamba at the paper's configuration (Mamba-2 {size}), built on the meta device: shapes only")
    with torch.device("meta"):
        model, c = MLMamba(config), config.connector
        pixels = {name: torch.empty(1, 3, v.input_size, v.input_size) for name, v in config.vision.items()}
        show(f"image, {config.vision['siglip'].input_size} px, normalized per encoder", "vision.py:preprocess", "",
             pixels["siglip"])
        for name, encoder in model.vision.encoders.items():
            show(f"{name} patch tokens, block {config.vision_layer}", "vision.py:ViT.forward", "",
                 encoder(pixels[name], layer=config.vision_layer))
        x = model.vision(pixels)
        show("concatenated on the feature axis", "vision.py:DualEncoder.forward", "eq. 5", x)
        x = F.gelu(model.connector.lift(x))
        show("lifted to the LM's width: GELU(Linear)", "connector.py:Connector.forward", "eq. 7", x)
        x = model.connector.msc(x)
        show(f"MSC: {c.scan.upper()} scans, {c.n_layers} blocks", "connector.py:MSC.forward", "Figs. 4-5", x)
        x = model.connector.swiglu(x)
        show("SwiGLU", "connector.py:SwiGLU.forward", "eq. 8, Fig. 6", x)
        x = model.connector.projector(x)
        show("MLP projector: the image tokens", "connector.py:MLP.forward", "eq. 6", x)
        x = torch.empty(1, x.shape[1] + text_tokens, config.lm.d_model)
        show(f"in the <image> slots among {text_tokens} text tokens", "model.py:MLMamba.embed", "", x)
        x = model.lm.hidden_states(inputs_embeds=x)
        show(f"Mamba-2 LM, {n} blocks of SSD", "mamba2.py:Mamba2Mixer.forward, ssd.py:ssd_chunked", "eqs. 3, 9", x)
        show("next-token logits", "mamba2.py:Mamba2LMHeadModel.forward", "eq. 9", model.lm.lm_head(x[:, -1:]))
        state = model.lm.allocate_cache(1).layers[0]
    mb = n * sum(t.numel() * t.element_size() for t in (state.conv_state, state.ssm_state)) / 1e6
    show(f"decoding state a layer ({mb:.0f} MB for all {n})", "mamba2.py:Mamba2Mixer.step", "eq. 3", state.ssm_state)


if __name__ == "__main__":
    tour()
