"""The synthetic visual-question world: the default training data, built in seconds with no download.

Small images of coloured shapes on a 3 x 3 grid (one shape per cell, 1 to 4 shapes), drawn
with Pillow, deterministic from a seed. Four question families mirror the paper's benchmarks:
    existence  "Is there a red circle?"                     yes/no, balanced; negatives drawn at random or from
                                                             objects that share a shape or a colour with one in the
                                                             picture (POPE's "random" / "adversarial" negatives)
    attribute  "What color is the triangle?" / "What shape is the red object?"       (GQA / VQA-like)
    spatial    "Is the circle left of the square?"           yes/no, left/right/above/below, about two objects whose
                                                             shapes are unique in the picture  (VSR-like)
    counting   "How many circles are there?"                 0 to 4
It is written in the standard LLaVA layout (an image folder + a JSON list of {"id", "image", "conversations"}), so
training goes through the same loader real data uses (data.py). Splits are disjoint: no scene appears in two splits.
text.json holds the training conversations once more with the scene written out in words in place of the image
("red circle northwest. blue square middle."): text-only data for the LM's pretraining stage (train.py), the stand-in
for the pretrained Mamba-2 the paper starts from. test_text.json holds the test questions with the scene in words,
to score that LM before it has seen an image (`evaluate.py --model runs/synthetic/pretrain/checkpoint-N --questions
data/synthetic/test_text.json`). docs/synthetic-world.md says why the world is built the way it is.
"""

import json
import os
import random
import shutil
from itertools import groupby
from pathlib import Path

from PIL import Image, ImageDraw

from connector import ConnectorConfig
from data import DataFiles, conversation_turns, train_tokenizer
from mamba2 import Mamba2Config
from model import EOS_TOKEN, IMAGE_TOKEN, MLMamba, MLMambaConfig, conversation_segments
from vision import ViTConfig

SHAPES = ["circle", "square", "triangle"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (230, 200, 40)}
FAMILIES = ["existence", "attribute", "spatial", "counting"]
GRID = 3
# The cells in words, one word each, in reading order. Each is one token of the world's tokenizer, so every object
# reads "color shape position." in 4 tokens, a cell's row and column come from one embedding, and the questions'
# "left of" / "right of" never name a cell.
POSITIONS = ["northwest", "north", "northeast", "west", "middle", "east", "southwest", "south", "southeast"]
DESCRIBE = "Describe the picture."  # the last training turn with describe=True; its answer is describe_scene
WORLD_VERSION = 6  # written into the DONE stamp: a world built by a generator of another version is rebuilt


# ----------------------------------------------------------------------------------------------------------------
# Scenes and questions
# ----------------------------------------------------------------------------------------------------------------

def random_scene(rng):
    """[(row, col, shape, color)] for 1 to 4 objects in distinct cells."""
    cells = rng.sample(range(GRID * GRID), rng.randint(1, 4))
    return sorted((c // GRID, c % GRID, rng.choice(SHAPES), rng.choice(list(COLORS))) for c in cells)


def draw_scene(scene, cell=16, seed=0):
    """The scene as an RGB image of (GRID * cell) pixels a side; sizes and offsets jitter with the seed."""
    rng = random.Random(seed)
    img = Image.new("RGB", (GRID * cell, GRID * cell), (245, 245, 240))
    d = ImageDraw.Draw(img)
    for r, c, shape, color in scene:
        m = rng.randint(2, 3)
        x0, y0, x1, y1 = c * cell + m, r * cell + m, (c + 1) * cell - m - 1, (r + 1) * cell - m - 1
        if shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=COLORS[color])
        elif shape == "square":
            d.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=COLORS[color])
        else:
            d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=COLORS[color])
    return img


def describe_scene(scene):
    """The scene in words, in reading order: "red circle northwest. blue square middle." """
    return " ".join(f"{color} {shape} {POSITIONS[r * GRID + c]}." for r, c, shape, color in scene)


def _yes_no(flag):
    return "yes" if flag else "no"


def make_question(scene, family, rng):
    """(question, answer) of one family about the scene, or None when the scene cannot pose it."""
    objects = [(s, c) for _, _, s, c in scene]
    if family == "existence":
        if rng.random() < 0.5:  # positive
            s, c = rng.choice(objects)
            return f"Is there a {c} {s}?", "yes"
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in objects]
        co_occurring = [(s, c) for s, c in absent if any(s == s2 or c == c2 for s2, c2 in objects)]
        pool = co_occurring if co_occurring and rng.random() < 0.5 else absent  # adversarial or random negative
        s, c = rng.choice(pool)
        return f"Is there a {c} {s}?", "no"
    if family == "attribute":
        unique_shapes = [s for s in SHAPES if sum(o[0] == s for o in objects) == 1]
        unique_colors = [c for c in COLORS if sum(o[1] == c for o in objects) == 1]
        if unique_shapes and (not unique_colors or rng.random() < 0.5):
            s = rng.choice(unique_shapes)
            return f"What color is the {s}?", next(c for s2, c in objects if s2 == s)
        if unique_colors:
            c = rng.choice(unique_colors)
            return f"What shape is the {c} object?", next(s2 for s2, c2 in objects if c2 == c)
        return None
    if family == "spatial":
        unique = [o for o in scene if sum(o2[2] == o[2] for o2 in scene) == 1]  # named by the shape alone
        pairs = [(a, b) for a in unique for b in unique if a != b]
        relations = [(a, b, rel) for a, b in pairs for rel in ("left of", "right of", "above", "below")
                     if (rel in ("left of", "right of") and a[1] != b[1])
                     or (rel in ("above", "below") and a[0] != b[0])]
        if not relations:
            return None
        a, b, rel = rng.choice(relations)
        truth = {"left of": a[1] < b[1], "right of": a[1] > b[1], "above": a[0] < b[0], "below": a[0] > b[0]}[rel]
        return f"Is the {a[2]} {rel} the {b[2]}?", _yes_no(truth)
    if family == "counting":
        s = rng.choice(SHAPES)
        return f"How many {s}s are there?", str(sum(o[0] == s for o in objects))
    raise ValueError(f"unknown question family {family!r}")


def _in_words(conversation, words):
    """The conversation text-only: the image placeholder replaced by the scene in words."""
    return [dict(turn, value=turn["value"].replace(IMAGE_TOKEN, words)) for turn in conversation]


def _questions(scene, rng):
    """[(family, (question, answer))]: one question of each family the scene can pose, in FAMILIES order."""
    qas = [(f, make_question(scene, f, rng)) for f in FAMILIES]
    return [(f, qa) for f, qa in qas if qa is not None]


def _training_conversation(scene, rng, extra_rng, extra_spatial, describe):
    """A training sample's turns: the scene's questions in random order, then `extra_spatial` more spatial questions
    put at random places among them (from their own random stream); the image comes with the first question. With
    `describe`, a last turn asks for the whole scene in words (after every question, so no answer can read it)."""
    qas = _questions(scene, rng)
    rng.shuffle(qas)
    for _ in range(extra_spatial):
        qa = make_question(scene, "spatial", extra_rng)
        if qa is None:
            break
        qas.insert(extra_rng.randint(0, len(qas)), ("spatial", qa))
    conv = []
    for j, (_, (q, a)) in enumerate(qas):
        conv += [{"from": "human", "value": (f"{IMAGE_TOKEN}\n" if j == 0 else "") + q}, {"from": "gpt", "value": a}]
    if describe:
        conv += [{"from": "human", "value": DESCRIBE}, {"from": "gpt", "value": describe_scene(scene)}]
    return conv


def _world_stamp(seed, n_train, n_val, n_test, cell, extra_spatial, describe):
    return {"version": WORLD_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test,
            "cell": cell, "extra_spatial": extra_spatial, "describe": describe}


def synthetic_dataset_is_built(root, seed=0, n_train=3000, n_val=200, n_test=300, cell=16, extra_spatial=0,
                               describe=False):
    """True when root holds a finished build of this generator version with these settings (its DONE stamp)."""
    done = Path(root) / "DONE"
    try:
        return json.loads(done.read_text()) == _world_stamp(seed, n_train, n_val, n_test, cell, extra_spatial,
                                                            describe)
    except (OSError, ValueError):
        return False


def build_synthetic_dataset(root, n_train=3000, n_val=200, n_test=300, seed=0, cell=16, extra_spatial=0,
                            describe=False):
    """Write images/ and train.json, val.json, test.json (LLaVA layout) under root; returns the json paths.

    Train samples are multi-turn (`_training_conversation`); val and test samples hold one question each (every
    family for every image), with a "family" field for scoring. text.json: the training conversations, text-only,
    with the scene described in words where the image was; test_text.json: the test questions written the same way,
    to score with evaluate.py a LM that has not seen an image yet (the pretrain stage's checkpoints).
    The world is written into a new folder beside root and then renamed to root (a world already there is moved
    aside and deleted), so no reader ever sees half a world, nor images of one world under another's questions."""
    final = Path(root)
    final.parent.mkdir(parents=True, exist_ok=True)
    root = final.parent / f".{final.name}.building-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    rng = random.Random(seed)
    extra_rng = random.Random(seed + 12345)  # the extra spatial questions' own stream
    seen = set()
    paths, scenes, text, test_text = {}, {}, [], []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        samples = []
        i = 0
        while i < n:
            scene = random_scene(rng)
            key = tuple(scene)
            if key in seen:  # disjoint splits: every scene is drawn once, in one split
                continue
            seen.add(key)
            name = f"{split}_{i:05d}.png"
            draw_scene(scene, cell, seed=rng.randrange(1 << 30)).save(root / "images" / name)
            scenes[f"images/{name}"] = scene
            words = describe_scene(scene)  # what replaces the image in text.json and test_text.json
            if split == "train":
                conv = _training_conversation(scene, rng, extra_rng, extra_spatial, describe)
                samples.append({"id": f"{split}-{i}", "image": f"images/{name}", "conversations": conv})
                text.append({"id": f"{split}-{i}-text", "conversations": _in_words(conv, words)})
            else:
                for f, (q, a) in _questions(scene, rng):
                    conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\n" + q}, {"from": "gpt", "value": a}]
                    samples.append({"id": f"{split}-{i}-{f}", "image": f"images/{name}", "family": f,
                                    "conversations": conv})
                    if split == "test":
                        test_text.append({"id": f"{split}-{i}-{f}-text", "family": f,
                                          "conversations": _in_words(conv, words)})
            i += 1
        (root / f"{split}.json").write_text(json.dumps(samples, indent=0))
        paths[split] = final / f"{split}.json"
    (root / "text.json").write_text(json.dumps(text, indent=0))
    paths["text"] = final / "text.json"
    (root / "test_text.json").write_text(json.dumps(test_text, indent=0))
    paths["test_text"] = final / "test_text.json"
    (root / "scenes.json").write_text(json.dumps(scenes))  # the ground truth of every image, for checking
    (root / "DONE").write_text(json.dumps(_world_stamp(seed, n_train, n_val, n_test, cell, extra_spatial, describe)))
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(root, final)
    shutil.rmtree(old, ignore_errors=True)
    return paths


def world_files(root):
    """The files a training run reads from the world at root (data.DataFiles)."""
    root = Path(root)
    return DataFiles(root / "train.json", root, root / "text.json", root / "test.json")


def prepare_world(root, log=print, **settings):
    """Build the world at root unless a finished build with these settings (build_synthetic_dataset's) is there."""
    if not synthetic_dataset_is_built(root, **settings):  # missing, other settings or another generator version
        log(f"building the synthetic visual-question world in {root} ...")
        build_synthetic_dataset(root, **settings)


# ----------------------------------------------------------------------------------------------------------------
# The world's tiny ML-Mamba and its tokenizer (train.py's default run)
# ----------------------------------------------------------------------------------------------------------------

def world_model(tokenizer, lm_width=96, lm_layers=3, prompt="in-out", patch=16, **connector):
    """Two small from-scratch encoders (frozen), the connector (ConnectorConfig fields: kind, scan, drop_path), a
    small Mamba-2 LM. Images are 48 px; with 16 px patches the image tokens are a 3 x 3 grid, one per cell of the
    scenes; with 8 px patches a 6 x 6 grid, each shape spread over 2 x 2 tokens that the connector can join."""
    image = GRID * 16  # px, the world's images (build_synthetic_dataset's default cell)
    if image % patch:
        raise ValueError(f"patch {patch} px does not divide the world's {image} px images; use a divisor (16, 8)")
    side = image // patch
    # chunk 16: the conversations are ~60-100 tokens, and the intra-chunk (Q, Q) products grow with Q
    lm = Mamba2Config(d_model=lm_width, n_layer=lm_layers, vocab_size=tokenizer.get_vocab_size(), d_state=16,
                      headdim=16, chunk_size=16, pad_vocab_size_multiple=16)
    vit = dict(image_size=image, patch_size=patch, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               input_size=image)
    vision = {"dinov2": ViTConfig("dinov2", **vit), "siglip": ViTConfig("siglip", **vit)}
    cc = ConnectorConfig.for_lm(lm, vision_dim=128, grid=(side, side), **connector)
    return MLMamba(MLMambaConfig(lm=lm, vision=vision, connector=cc, max_length=512, prompt=prompt), tokenizer)


def world_tokenizer(json_paths, prompt="in-out"):
    """A byte-level BPE tokenizer trained on the prompts and replies, as the model reads them, of LLaVA-format files."""
    samples = [x for f in json_paths if f for x in json.loads(Path(f).read_text())]
    turns = [list(turn) for x in samples  # each turn's text, the stop token written out (a run of segments is one turn)
             for _, turn in groupby(conversation_segments(conversation_turns(x), prompt), key=lambda seg: seg[1])]
    return train_tokenizer(["".join(EOS_TOKEN if s is None else s for s, _ in turn) for turn in turns])
