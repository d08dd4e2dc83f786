"""Training: the synthetic world, the LLaVA loader, stages, checkpoints and resume, NaN stop, 2-process DDP and
FSDP, and the evaluation metrics."""

import json
import math
import os
import re
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.distributed.tensor import DTensor

import train as T
from conftest import assert_adam_close
from data import collate, conversation_turns
from run_folder import speed
from synthetic import (FAMILIES, POSITIONS, build_synthetic_dataset, describe_scene, make_question, random_scene,
                       synthetic_dataset_is_built, world_files, world_tokenizer)
from evaluate import family_accuracy, load_questions, normalize_answer, pope_metrics, vqa_soft_accuracy
from model import IGNORE_INDEX
from weights import read_tensors


def args_for(world, out, *extra):
    return T.parse_args(["--synthetic-dir", str(world), "--out", str(out), "--global-batch", "8", "--no-eval",
                         "--log-every", "1000", "--device", "cpu", *extra])


# ---------------------------------------------------------------- the synthetic world

def test_generator_is_deterministic_and_splits_are_disjoint(world, tmp_path):
    build_synthetic_dataset(tmp_path, n_train=48, n_val=4, n_test=12, seed=3)
    for name in ("train.json", "test.json", "scenes.json"):
        assert (tmp_path / name).read_text() == (world / name).read_text()
    assert (tmp_path / "images/test_00005.png").read_bytes() == (world / "images/test_00005.png").read_bytes()
    # the DONE stamp says which build this is: train.py rebuilds for another seed or generator version
    assert synthetic_dataset_is_built(world, seed=3, n_train=48, n_val=4, n_test=12)
    assert not synthetic_dataset_is_built(world, seed=4, n_train=48, n_val=4, n_test=12)
    assert not synthetic_dataset_is_built(tmp_path / "nowhere")
    scenes = json.loads((world / "scenes.json").read_text())
    by_split = {s: {json.dumps(v) for k, v in scenes.items() if k.startswith(f"images/{s}_")}
                for s in ("train", "val", "test")}
    assert len(by_split["train"]) == 48 and len(by_split["test"]) == 12
    assert not (by_split["train"] & by_split["test"]) and not (by_split["train"] & by_split["val"])
    # test questions: one per family the scene allows, answers true to the scene
    test = json.loads((world / "test.json").read_text())
    assert {s["family"] for s in test} == set(FAMILIES)
    for s in test:
        scene = scenes[s["image"]]
        q, a = s["conversations"][0]["value"], s["conversations"][1]["value"]
        if s["family"] == "counting":
            shape = q.split("How many ")[1].split("s are")[0]
            assert a == str(sum(o[2] == shape for o in scene))
        if s["family"] == "existence":
            color, shape = q[len("<image>\nIs there a "):-1].split(" ")
            assert a == ("yes" if [color, shape] in [[o[3], o[2]] for o in scene] else "no")


def test_text_json_is_the_training_conversations_with_the_scene_in_words(world):
    """text.json (the pretrain stage's data): the same conversations, text-only, the placeholder replaced by every
    object of the scene as "color shape position." in reading order, positions read off scenes.json's (row, col)."""
    train = json.loads((world / "train.json").read_text())
    text = json.loads((world / "text.json").read_text())
    scenes = json.loads((world / "scenes.json").read_text())
    assert len(text) == len(train) and not any("image" in t for t in text)
    names = [["northwest", "north", "northeast"], ["west", "middle", "east"], ["southwest", "south", "southeast"]]
    for s, t in zip(train, text):
        scene = scenes[s["image"]]
        words = " ".join(f"{color} {shape} {names[r][c]}." for r, c, shape, color in sorted(scene))
        assert describe_scene(scene) == words
        first = s["conversations"][0]["value"]
        assert t["conversations"][0]["value"] == first.replace("<image>", words)
        assert t["conversations"][1:] == s["conversations"][1:]


def test_each_cell_in_words_is_one_token_of_the_default_worlds_tokenizer(default_world):
    """The text stage reads every object as "color shape position." with one token per position (synthetic.POSITIONS),
    with the tokenizer train.py trains on the default world's conversations and their text version."""
    tok = world_tokenizer([default_world / "train.json", default_world / "text.json"])
    text = json.loads((default_world / "text.json").read_text())
    scene = text[0]["conversations"][0]["value"].split("\n")[0]  # "red circle northwest. blue square middle."
    assert [len(tok.encode(" " + p).ids) for p in POSITIONS] == [1] * 9
    assert len(tok.encode("In: " + scene).ids) == 2 + 4 * scene.count(".")


def test_test_text_json_is_the_test_questions_with_the_scene_in_words(world):
    """test_text.json: each test question, family and answer, text-only, the scene in words before the question."""
    test = json.loads((world / "test.json").read_text())
    test_text = json.loads((world / "test_text.json").read_text())
    scenes = json.loads((world / "scenes.json").read_text())
    assert len(test_text) == len(test) and not any("image" in t for t in test_text)
    for s, t in zip(test, test_text):
        assert t["id"] == s["id"] + "-text" and t["family"] == s["family"]
        question = s["conversations"][0]["value"]
        assert question.startswith("<image>\n")
        words = describe_scene(scenes[s["image"]])
        assert t["conversations"][0]["value"] == words + "\n" + question[len("<image>\n"):]
        assert t["conversations"][1] == s["conversations"][1]
    # evaluate.py reads it as text-only questions
    q = load_questions(world / "test_text.json")[0]
    assert q["image"] is None and q["question"].startswith(describe_scene(scenes[test[0]["image"]]))


def spatial_truth(question, scene):
    """The answer to "Is the A left of / right of / above / below the B?" read off the scene's (row, col)."""
    m = re.fullmatch(r"(?:<image>\n)?Is the (\w+) (left of|right of|above|below) the (\w+)\?", question)
    (ra, ca), (rb, cb) = [next((r, c) for r, c, shape, _ in scene if shape == name) for name in (m[1], m[3])]
    return "yes" if {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[m[2]] else "no"


def test_the_describe_turn_ends_each_training_conversation_with_the_scene_in_words(tmp_path):
    """describe=True appends "Describe the picture." -> describe_scene(scene) to every training conversation (in
    train.json and, in words, in text.json); everything else is the world of describe=False."""
    build_synthetic_dataset(tmp_path / "plain", n_train=40, n_val=4, n_test=8, seed=5)
    build_synthetic_dataset(tmp_path / "desc", n_train=40, n_val=4, n_test=8, seed=5, describe=True)
    for name in ("scenes.json", "val.json", "test.json", "test_text.json"):
        assert (tmp_path / "plain" / name).read_text() == (tmp_path / "desc" / name).read_text()
    assert not synthetic_dataset_is_built(tmp_path / "desc", seed=5, n_train=40, n_val=4, n_test=8)
    assert synthetic_dataset_is_built(tmp_path / "desc", seed=5, n_train=40, n_val=4, n_test=8, describe=True)
    scenes = json.loads((tmp_path / "plain" / "scenes.json").read_text())
    images = [s["image"] for s in json.loads((tmp_path / "plain" / "train.json").read_text())]  # text.json's order
    for name in ("train.json", "text.json"):
        plain, desc = (json.loads((tmp_path / w / name).read_text()) for w in ("plain", "desc"))
        for image, p, d in zip(images, plain, desc, strict=True):
            *rest, ask, reply = d["conversations"]
            assert rest == p["conversations"]
            assert ask == {"from": "human", "value": "Describe the picture."}
            r, c, shape, color = scenes[image][0]
            assert reply["from"] == "gpt" and reply["value"] == describe_scene(scenes[image])
            assert reply["value"].startswith(f"{color} {shape} {POSITIONS[3 * r + c]}.")


def test_extra_spatial_questions_are_true_and_leave_the_rest_of_the_world_alone(tmp_path):
    """extra_spatial=1 adds one spatial question to each training conversation whose scene can pose one, true to the
    scene; the scenes, images, val/test questions and the other training questions are those of extra_spatial=0."""
    build_synthetic_dataset(tmp_path / "plain", n_train=60, n_val=4, n_test=8, seed=5, extra_spatial=0)
    build_synthetic_dataset(tmp_path / "extra", n_train=60, n_val=4, n_test=8, seed=5, extra_spatial=1)
    for name in ("scenes.json", "val.json", "test.json"):
        assert (tmp_path / "plain" / name).read_text() == (tmp_path / "extra" / name).read_text()
    assert synthetic_dataset_is_built(tmp_path / "plain", seed=5, n_train=60, n_val=4, n_test=8)  # default: none
    assert not synthetic_dataset_is_built(tmp_path / "extra", seed=5, n_train=60, n_val=4, n_test=8)
    assert synthetic_dataset_is_built(tmp_path / "extra", seed=5, n_train=60, n_val=4, n_test=8, extra_spatial=1)
    scenes = json.loads((tmp_path / "plain" / "scenes.json").read_text())
    plain, extra = (json.loads((tmp_path / w / "train.json").read_text()) for w in ("plain", "extra"))
    def question_answer_pairs(sample):
        turns = [text.replace("<image>\n", "") for _, text in conversation_turns(sample)]
        return list(zip(turns[0::2], turns[1::2]))
    added = 0
    for p, e in zip(plain, extra):
        turns = {"plain": question_answer_pairs(p), "extra": question_answer_pairs(e)}
        n_spatial = sum(q.startswith("Is the ") for q, _ in turns["plain"])
        assert n_spatial <= 1
        rest = list(turns["extra"])
        for turn in turns["plain"]:  # every turn of the plain conversation is there, and one spatial turn more
            rest.remove(turn)
        assert len(rest) == n_spatial and all(q.startswith("Is the ") for q, _ in rest)
        added += len(rest)
        scene = scenes[e["image"]]
        for q, a in turns["extra"]:
            if q.startswith("Is the "):
                assert a == spatial_truth(q, scene), q
    assert 10 < added < 60  # some scenes have no two unique shapes in different rows or columns


def test_a_rebuilt_world_replaces_the_old_one_whole(tmp_path):
    root = tmp_path / "world"
    build_synthetic_dataset(root, n_train=20, n_val=2, n_test=3, seed=1)
    old_train = (root / "train.json").read_text()
    paths = build_synthetic_dataset(root, n_train=6, n_val=2, n_test=3, seed=2)
    assert paths["train"] == root / "train.json" and (root / "train.json").read_text() != old_train
    assert len(list((root / "images").iterdir())) == 6 + 2 + 3  # none of the first world's 20 training images left
    assert synthetic_dataset_is_built(root, seed=2, n_train=6, n_val=2, n_test=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # no half-built or old folder beside it


def test_existence_is_balanced_with_co_occurring_negatives():
    import random
    rng = random.Random(0)
    scene = [(0, 0, "circle", "red"), (1, 1, "square", "blue")]
    answers = [make_question(scene, "existence", rng) for _ in range(400)]
    yes = sum(a == "yes" for _, a in answers)
    assert 160 < yes < 240
    negatives = [q for q, a in answers if a == "no"]
    co = [q for q in negatives if "circle" in q or "red" in q or "square" in q or "blue" in q]
    assert 0.4 < len(co) / len(negatives) < 0.95


def test_spatial_questions_name_unique_shapes_and_answer_from_the_grid():
    """Every spatial question names two objects by shape alone, both the only one of their shape in the scene, and
    its answer equals the relation read off their grid cells (row, col)."""
    import random
    rng = random.Random(1)
    checked = {"yes": 0, "no": 0}
    for _ in range(300):
        scene = random_scene(rng)
        qa = make_question(scene, "spatial", rng)
        shapes = [s for _, _, s, _ in scene]
        if qa is None:  # only when fewer than two shapes occur exactly once
            assert sum(shapes.count(s) == 1 for s in set(shapes)) < 2
            continue
        q, a = qa
        m = re.fullmatch(r"Is the (\w+) (left of|right of|above|below) the (\w+)\?", q)
        assert m, q
        first, rel, second = m.groups()
        assert shapes.count(first) == 1 and shapes.count(second) == 1 and first != second
        (r1, c1), (r2, c2) = [next((r, c) for r, c, s, _ in scene if s == name) for name in (first, second)]
        truth = {"left of": c1 < c2, "right of": c1 > c2, "above": r1 < r2, "below": r1 > r2}[rel]
        assert a == ("yes" if truth else "no")
        checked[a] += 1
    assert checked["yes"] > 30 and checked["no"] > 30


# ---------------------------------------------------------------- the LLaVA loader

def test_loader_edge_cases(world, tmp_path):
    from conftest import tiny_config
    from data import train_tokenizer
    from model import MLMamba
    tok = train_tokenizer(["In: hello\nOut: yes", "Was ist das? Ünïcødé ✓"], vocab_size=300)
    model = MLMamba(tiny_config(vocab_size=tok.get_vocab_size()), tok)
    Image.new("RGB", (30, 20), (0, 200, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    samples = [
        {"id": "text", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "yes"}]},
        {"id": "multi", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\nhello"}, {"from": "gpt", "value": "yes"},
            {"from": "human", "value": "again?"}, {"from": "gpt", "value": "no"}]},
        {"id": "odd", "image": "ok.png", "conversations": [
            {"from": "human", "value": "hello\n<image>"}, {"from": "gpt", "value": "yes"}]},
        {"id": "unicode", "image": "ok.png", "conversations": [
            {"from": "human", "value": "Was ist das? Ünïcødé ✓"}, {"from": "gpt", "value": "Ünïcødé ✓"}]},
        {"id": "broken", "image": "broken.jpg", "conversations": [
            {"from": "human", "value": "<image>\nhello"}, {"from": "gpt", "value": "yes"}]},
        {"id": "missing", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nhello"}, {"from": "gpt", "value": "yes"}]},
        {"id": "two", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "yes"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(samples, ensure_ascii=False))
    ds = T.dataset_for(model, tmp_path / "data.json", tmp_path)
    items = [ds[i] for i in range(len(ds))]  # the missing image and the two placeholders are set aside at load
    assert sorted(ds.problems) == [5, 6] and "nope.png" in ds.problems[5] and "more than one" in ds.problems[6]
    assert ["skip" in x for x in items] == [False, False, False, False, True]  # broken.jpg fails only to decode
    assert "sample 4 (broken)" in items[4]["skip"] and "broken.jpg" in items[4]["skip"]
    img, N = model.image_token_id, model.num_image_tokens
    assert items[0]["pixels"] is None and img not in items[0]["input_ids"]
    assert items[1]["input_ids"].count(img) == N and len([l for l in items[1]["labels"] if l != -100]) > 2
    odd = items[2]["input_ids"]
    assert odd.index(img) > 3 and odd[odd.index(img):][:N] == [img] * N  # N slots where the text put the image
    assert tok.decode(items[3]["input_ids"][:6], skip_special_tokens=False).startswith("In: <image>")  # none: added
    assert tok.decode([t for t, l in zip(items[3]["input_ids"], items[3]["labels"]) if l != -100]) == "Ünïcødé ✓"
    batch = collate(items)
    assert batch["skipped"] == [items[4]["skip"]]
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"]["siglip"].shape == (4, 3, 42, 42)
    assert torch.all(batch["pixel_values"]["siglip"][0] == 0)  # the text-only row
    assert (batch["labels"][0, len(items[0]["labels"]):] == IGNORE_INDEX).all()
    with torch.no_grad():
        _, loss = model(batch["pixel_values"], batch["input_ids"], batch["labels"])
    assert torch.isfinite(loss)


def test_pixel_cache_gives_the_same_pixels_without_rereading(world, tmp_path):
    import shutil
    model = T.build_model(args_for(world, tmp_path), world_files(world))
    root = tmp_path / "copy"
    shutil.copytree(world, root)
    plain = T.dataset_for(model, root / "train.json", root)
    cached = T.dataset_for(model, root / "train.json", root, cache_images=True)
    first = [cached[i] for i in range(3)]
    for i in range(3):  # the cached pixels are the file's, for each encoder
        for name, px in plain[i]["pixels"].items():
            assert torch.equal(first[i]["pixels"][name], px)
    shutil.rmtree(root / "images")  # a second read comes from memory: no file needed, nothing skipped
    again = [cached[i] for i in range(3)]
    assert all(torch.equal(a["pixels"]["siglip"], b["pixels"]["siglip"]) for a, b in zip(first, again))
    assert all("skip" not in x for x in again) and "train_00000.png" in plain[0]["skip"]
    # keyed by the image, not the sample: a second sample on the same picture reads it from memory too
    cached.samples.append(dict(cached.samples[1], id="same-image"))
    cached.file_index.append(len(cached.file_index))
    assert torch.equal(cached[len(cached) - 1]["pixels"]["dinov2"], first[1]["pixels"]["dinov2"])
    assert len(cached.pixel_cache) == 3


# ---------------------------------------------------------------- stages, checkpoints, resume, NaN

def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", ["pretrain", "align", "finetune"])
def test_one_step_changes_exactly_the_stage_parameters(world, tmp_path, stage):
    cfg = args_for(world, tmp_path, "--stage", stage, "--max-steps", "1")
    model = T.build_model(cfg, world_files(world))
    dataset = T.dataset_for(model, world / ("text.json" if stage == "pretrain" else "train.json"), world)
    before = params(model)
    T.run_stage(stage, model, dataset, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    prefixes = {"pretrain": ("lm.",), "align": ("connector.",), "finetune": ("connector.", "lm.")}[stage]
    assert changed and all(n.startswith(prefixes) for n in changed)
    expected = {n for n in before if n.startswith(prefixes)}
    assert len(changed) >= 0.9 * len(expected)  # (a few may get no gradient in one step, e.g. unused vocab rows)
    assert not any(n.startswith("vision.") for n in changed)
    if stage == "finetune":
        assert any(n.startswith("lm.") for n in changed)


def test_default_run_pretrains_the_lm_on_text_first_and_real_data_does_not(world, default_world, tmp_path,
                                                                           capsys):
    """Synthetic default: pretrain (the LM alone, on text.json), align, finetune, in that order, each with its own
    checkpoints. Real data goes straight to align unless given --pretrain-data; --stage pretrain without it fails."""
    T.train(args_for(default_world, tmp_path, "--max-steps", "1"))
    out = capsys.readouterr().out
    assert out.index("[pretrain] trainable") < out.index("[align] trainable") < out.index("[finetune] trainable")
    assert "text-only for pretrain" in out
    assert {d.name for d in tmp_path.iterdir() if (d / "latest").is_file()} == {"pretrain", "align", "finetune"}
    logged = (tmp_path / "train.log").read_text().splitlines()  # the run's lines, kept beside its checkpoints
    assert logged and all(line in out.splitlines() for line in logged)
    assert [line.split()[0] for line in logged if " step 1/" in line] == ["[pretrain]", "[align]", "[finetune]"]
    first = {line.split()[0]: line for line in logged if " step 1/" in line}
    assert "(run ~" in first["[pretrain]"] and "(run ~" in first["[align]"] and "(run ~" not in first["[finetune]"]
    assert T.main(["--data", str(world / "train.json"), "--init-from", str(tmp_path / "final"), "--stage",
                   "pretrain", "--out", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--stage pretrain needs --pretrain-data" in capsys.readouterr().err


def test_the_progress_lines_eta_covers_the_stage_and_the_run():
    """10 samples/s: 50 samples left in the stage take 5 s; with 150 in later stages the run has 20 s left."""
    assert speed(100, 1000, 10.0, 50).endswith("10.0 samples/s 100 tokens/s ETA 0m05s")
    assert speed(100, 1000, 10.0, 50, later_samples=150).endswith("ETA 0m05s (run ~0m20s)")
    assert speed(100, 1000, 10.0, 50, later_samples=1150).endswith("(run ~2m00s)")


def test_the_progress_line_gives_mfu_from_6_flops_per_trainable_and_2_per_frozen_parameter(monkeypatch):
    """MFU = tokens/s x FLOPs per token / the peak of all processes; FLOPs per token: 6 per trainable parameter and
    2 per frozen one. Only bf16 runs on a GPU of known peak print it (a CPU has none)."""
    import run_folder
    lin = torch.nn.Linear(10, 10)  # 110 parameters, the bias frozen
    lin.bias.requires_grad_(False)
    assert run_folder.flops_per_token(lin) == 6 * 100 + 2 * 10
    assert " 100 tokens/s MFU 25.0% ETA" in speed(100, 1000, 10.0, 50, mfu_basis=(620, 620 * 400))
    assert "MFU" not in speed(100, 1000, 10.0, 50) and run_folder.peak_flops("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert run_folder.peak_flops("cuda:0") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert run_folder.peak_flops("cuda") is None


def test_lm_size_options_build_the_synthetic_lm_at_that_size(world, tmp_path):
    """--lm-width and --lm-layers set the synthetic world's LM (d_model 96 and 3 layers by default on the CPU)."""
    default = T.build_model(args_for(world, tmp_path), world_files(world))
    wide = T.build_model(args_for(world, tmp_path, "--lm-width", "48", "--lm-layers", "2"), world_files(world))
    assert (default.lm.config.d_model, len(default.lm.layers)) == (96, 3)
    assert (wide.lm.config.d_model, len(wide.lm.layers)) == (48, 2)
    assert wide.lm.layers[0].mixer.in_proj.weight.shape[1] == 48


def test_patch_8_gives_the_synthetic_model_2_x_2_image_tokens_a_cell(world, tmp_path):
    """--patch 8: the encoders cut the 48 px images into 6 x 6 patches and the connector scans that grid (eqs. 7-8),
    so each 16 px cell is 4 image tokens; the tokens of one cell see its pixels alone. A patch that does not divide
    the image is refused."""
    import synthetic
    model = T.build_model(args_for(world, tmp_path, "--patch", "8"), world_files(world))
    assert model.num_image_tokens == 36 and model.config.connector.grid == (6, 6)
    img = torch.zeros(1, 3, 48, 48)
    img[..., 16:24, 8:16] = 1.0  # cell (1, 0)'s top-right quarter: patch row 2, column 1
    pixels = {k: img for k in model.vision.encoders}
    with torch.no_grad():
        changed = (model.vision(pixels) - model.vision({k: torch.zeros_like(img) for k in pixels})).abs().sum(-1)[0]
    assert changed.argmax().item() == 2 * 6 + 1 and changed[2 * 6 + 1] > 0
    with pytest.raises(ValueError, match="does not divide"):
        synthetic.world_model(model.tokenizer, patch=10)


def test_the_synthetic_preset_on_a_gpu_adds_a_wider_lm_and_the_describe_turn():
    """config/synthetic.py: 8 px patches on the CPU; on CUDA (on_cuda) lm_width 192, the describe turn and 16 px
    patches; the CPU keeps 96 and no describe turn; options given on the command line win over both; the paper preset
    compiles the blocks on CUDA only."""
    def picked(*argv):
        cfg = T.parse_args(list(argv))
        return cfg.lm_width, cfg.describe, cfg.patch, cfg.lr
    assert picked("--device", "cpu") == (96, False, 8, 1e-3)
    assert picked("--device", "cuda") == (192, True, 16, 1e-3)
    assert picked("--device", "cuda:1") == (192, True, 16, 1e-3)
    assert picked("--device", "cuda", "--lm-width", "96", "--no-describe", "--patch", "8") == (96, False, 8, 1e-3)
    assert picked("--device", "cpu", "--describe", "--patch", "16") == (96, True, 16, 1e-3)
    paper_on_cuda = T.parse_args(["--device", "cuda", "--data", "x.json"])
    assert paper_on_cuda.lm_width == 96 and paper_on_cuda.compile  # the paper preset: compiled blocks on CUDA
    assert not T.parse_args(["--device", "cpu", "--data", "x.json"]).compile
    assert not T.parse_args(["--device", "cuda", "--data", "x.json", "--no-compile"]).compile
    assert T.parse_args(["--device", "cuda"]).device == "cuda"


def test_connector_has_its_own_learning_rate(world, tmp_path):
    cfg = args_for(world, tmp_path)
    assert (cfg.preset, cfg.lr, cfg.connector_lr, cfg.align_lr) == ("synthetic", 1e-3, 1e-4, 1e-4)
    real = T.parse_args(["--data", "x.json", "--lr", "3e-5"])
    assert (real.preset, real.lr, real.align_lr, real.global_batch) == ("paper", 3e-5, 1e-3, 64)
    assert real.connector_lr is None  # the paper's recipe: one lr unless asked
    assert T.parse_args(["--data", "x.json", "--preset", "synthetic"]).lr == 1e-3  # a preset is named, not guessed
    with pytest.raises(Exception):  # frozen once parsed
        cfg.lr = 1.0
    model = T.build_model(cfg, world_files(world))
    model.set_stage("finetune")
    opt = T.make_optimizer(model, 1e-3, 0.1, connector_lr=1e-4)
    connector = {id(p) for p in model.connector.parameters()}
    seen = set()
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["lr"] == (1e-4 if id(p) in connector else 1e-3)
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
            seen.add(id(p))
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    # the schedule scales each group from its own lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert sorted({round(x, 12) for x in sched.get_last_lr()}) == [5e-5, 5e-4]


def test_resume_after_interruption_equals_an_uninterrupted_run(default_world, tmp_path):
    common = ["--stage", "finetune", "--max-steps", "6", "--save-every", "2"]  # drop-path: the RNG matters too
    full = T.train(args_for(default_world, tmp_path / "a", *common))
    with pytest.raises(KeyboardInterrupt):  # "killed" after step 5: the last checkpoint is step 4
        T.train(args_for(default_world, tmp_path / "b", *common), on_step=stop_after(5))
    assert (tmp_path / "b/finetune/latest").read_text() == "checkpoint-4"
    resumed = T.train(args_for(default_world, tmp_path / "b", *common, "--resume"))
    a, b = params(full), params(resumed)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=0, msg=n)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(default_world, tmp_path, monkeypatch):
    common = ["--stage", "align", "--max-steps", "4", "--save-every", "2"]
    with pytest.raises(KeyboardInterrupt):
        T.train(args_for(default_world, tmp_path, *common), on_step=stop_after(2))
    assert (tmp_path / "align/latest").read_text() == "checkpoint-2"
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("killed while writing")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        T.train(args_for(default_world, tmp_path, *common, "--resume"))  # dies while writing checkpoint-4
    monkeypatch.undo()
    assert (tmp_path / "align/latest").read_text() == "checkpoint-2"  # the pointer never moved
    from model import MLMamba
    MLMamba.from_pretrained(tmp_path / "align/checkpoint-2")  # and it still loads


def test_nan_loss_stops_and_names_the_step(world, tmp_path):
    cfg = args_for(world, tmp_path, "--stage", "finetune", "--max-steps", "3")
    model = T.build_model(cfg, world_files(world))
    with torch.no_grad():
        model.lm.norm_f.weight.fill_(float("nan"))
    with pytest.raises(T.TrainingError, match="loss is nan at step 1: stopping. The last good checkpoint is none"):
        T.run_stage("finetune", model, T.dataset_for(model, world / "train.json", world), cfg)


# ---------------------------------------------------------------- two processes (gloo) vs one

def stop_after(n):
    """An on_step callback that interrupts the run after step n, as a kill would."""
    def on_step(step):
        if step == n:
            raise KeyboardInterrupt(f"stopped after step {step}")
    return on_step


def spawn_two(worker, *args, tries=3):
    """Two gloo processes of worker(rank, 2, port, *args) on a free port. The port is free when chosen but released
    before the processes bind it: if another program takes it in between, the rendezvous fails to bind and the pair
    is started again on another port."""
    for attempt in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            return mp.spawn(worker, args=(2, port, *args), nprocs=2)
        except mp.ProcessRaisedException as e:
            if "address already in use" not in str(e).lower() or attempt == tries - 1:
                raise


def _worker(rank, world_size, port, argv, out, stop=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if rank == 0:  # its progress lines (loss, grad-norm per step) go to a file the test reads
        sys.stdout = open(f"{out}/rank0.log", "w")
    model = T.train(T.parse_args(argv), on_step=stop_after(stop) if stop else None)
    sys.stdout.flush()
    # DDP: this process's whole replica; FSDP: its shard of each parameter (rows rank*k ... of dim 0)
    torch.save({n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
                for n, p in model.named_parameters()},
               f"{out}/rank{rank}.pt")


def progress(text):
    """[(loss, grad-norm)] per step from train.py's progress lines."""
    return [(float(m[1]), float(m[2])) for m in re.finditer(r"step \d+/\d+ .*?loss (\S+) grad-norm (\S+)", text)]



def assert_two_processes_match_one(worker, argv, parallel, tmp_path, capsys):
    """Two processes of `worker` on argv with --parallel against train.py in this process: the same loss and
    gradient norm at every step, replicas equal (DDP) or each parameter split in two halves (FSDP), the whole weights
    within Adam's rounding bound of the single run's, and the final checkpoint, written by rank 0 from the gathered
    shards, the same model."""
    spawn_two(worker, argv + ["--out", str(tmp_path / parallel), "--parallel", parallel], str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", map_location="cpu") for r in (0, 1))
    capsys.readouterr()
    single = {n: v.cpu() for n, v in params(T.train(T.parse_args(argv + ["--out", str(tmp_path / "single")]))).items()}
    # the same loss and gradient norm at every step (printed with 4 decimals and 3 significant digits)
    steps, steps_single = progress((tmp_path / "rank0.log").read_text()), progress(capsys.readouterr().out)
    assert len(steps) == len(steps_single) == 3
    for (loss, norm), (loss_single, norm_single) in zip(steps, steps_single):
        assert loss == pytest.approx(loss_single, abs=2e-4) and norm == pytest.approx(norm_single, rel=1e-2)
    whole = {}
    for n in single:
        if parallel == "ddp":
            assert torch.equal(r0[n], r1[n]), f"replicas differ at {n}"
            whole[n] = r0[n]
        else:  # each process held about half of every parameter; together they make the whole
            assert r0[n].shape[0] == -(-single[n].shape[0] // 2), f"{n} not sharded: {tuple(r0[n].shape)}"
            whole[n] = torch.cat([r0[n], r1[n]])
    assert_adam_close(whole, single, lr=1e-3, steps=3)  # Adam hides a gradient's scale: the grad-norm checks it
    saved = read_tensors(tmp_path / parallel / "final")
    assert set(saved) == set(single) - {"lm.lm_head.weight"}
    for n, v in saved.items():
        assert torch.equal(v, whole[n]), n


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(default_world, tmp_path, parallel, capsys):
    argv = ["--synthetic-dir", str(default_world), "--global-batch", "8", "--no-eval", "--log-every", "1",
            "--device", "cpu", "--max-steps", "3", "--stage", "finetune",
            "--drop-path", "0"]  # stochastic depth draws different masks when the batch is split over ranks
    assert_two_processes_match_one(_worker, argv, parallel, tmp_path, capsys)


def _cuda_worker(rank, world_size, port, argv, out):
    torch.backends.cudnn.allow_tf32 = False  # the frozen encoders' convolutions in fp32, as the single run's
    _worker(rank, world_size, port, argv, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gpus_over_nccl_match_one_gpu(default_world, tmp_path, parallel, capsys, monkeypatch):
    """The two-process test above on two GPUs (NCCL for the CUDA tensors), fp32, the plain step loop."""
    argv = ["--synthetic-dir", str(default_world), "--global-batch", "8", "--no-eval", "--log-every", "1",
            "--device", "cuda", "--precision", "fp32", "--fast", "off", "--max-steps", "3", "--stage", "finetune",
            "--drop-path", "0"]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert_two_processes_match_one(_cuda_worker, argv, parallel, tmp_path, capsys)


def test_compile_with_gradient_checkpointing_keeps_in_proj_and_trains_as_whole_block_checkpointing(world, tmp_path,
                                                                                                  monkeypatch):
    """train.py --compile --gradient-checkpointing: the connector and the frozen encoders are compiled, the compiled
    blocks checkpoint themselves, keeping in_proj's product and running the SSD's forward once
    (fast_decode.forward_keeping_ssd, selective recomputation), Inductor times its kernels' settings, the LM's
    whole-block checkpointing stays off, and two steps end at the weights of an eager model with whole-block
    checkpointing. (Dynamo's eager backend: no compiler here.)"""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    import fast_decode
    from mamba2 import Mamba2Block
    from vision import ViT, ViTBlock
    compiled = {}

    def compiled_block_forward(kept=False, ssd_kept=False):
        forward = (fast_decode.forward_keeping_ssd if ssd_kept else fast_decode.forward_keeping_in_proj if kept
                   else Mamba2Block.forward)
        return compiled.setdefault((kept, ssd_kept), torch.compile(forward, backend="eager"))
    monkeypatch.setattr(fast_decode, "compiled_block_forward", compiled_block_forward)
    monkeypatch.setattr(fast_decode, "compiled_connector_forward",
                        lambda cls: compiled.setdefault(cls, torch.compile(cls.forward, backend="eager")))
    monkeypatch.setattr(fast_decode, "compiled_vit_forwards", lambda: compiled.setdefault("vit", tuple(
        torch.compile(fn, backend="eager") for fn in (ViT.embed, ViTBlock.forward))))
    argv = ("--gradient-checkpointing", "--max-steps", "2", "--stage", "finetune", "--drop-path", "0")
    with functorch_config.patch(force_non_lazy_backward_lowering=False), \
            inductor_config.patch(coordinate_descent_tuning=False):  # compile_blocks sets both
        kept = T.train(args_for(world, tmp_path / "kept", "--compile", *argv))
        assert inductor_config.coordinate_descent_tuning is True
    assert list(compiled) == [type(kept.connector), (True, True), "vit"] and kept.lm.gradient_checkpointing is False
    assert kept.connector.forward.__func__ is compiled[type(kept.connector)]
    assert all(block.forward.__func__ is compiled[True, True] for block in kept.lm.layers)
    for encoder in kept.vision.encoders.values():
        assert encoder.embed.__func__ is compiled["vit"][0]
        assert all(block.forward.__func__ is compiled["vit"][1] for block in encoder.blocks)
    whole = T.train(args_for(world, tmp_path / "whole", *argv))
    assert whole.lm.gradient_checkpointing is True
    assert_adam_close(params(kept), params(whole), lr=1e-3, steps=2)


def test_compile_leaves_the_encoders_eager_where_they_run_once(world, tmp_path, monkeypatch):
    """train.py --compile with DeviceSteps (--fast on): the frozen encoders run once per dataset, before the first
    step, so fast_decode.compile_encoders is not called (the plain loop calls it: the test above)."""
    import fast_decode
    calls = []
    monkeypatch.setattr(fast_decode, "compile_blocks", lambda lm, **kw: calls.append("blocks"))
    monkeypatch.setattr(fast_decode, "compile_connector", lambda connector: calls.append("connector"))
    monkeypatch.setattr(fast_decode, "compile_encoders", lambda vision: calls.append("encoders"))
    T.train(args_for(world, tmp_path, "--compile", "--fast", "on", "--max-steps", "1", "--stage", "finetune"))
    assert calls == ["connector", "blocks"]


@pytest.mark.gpu
def test_compiled_training_on_cuda_takes_the_triton_ssd(default_world, tmp_path, capsys):
    """train.py --compile on CUDA gives every Mamba-2 mixer ssd_triton (fast_ssd.py; the fastest in compiled blocks,
    docs/speed.md) and trains: finite losses, the first (before any update) equal to an eager run's within bf16
    autocast's rounding."""
    pytest.importorskip("triton")
    import fast_ssd
    from mamba2 import Mamba2Mixer
    losses = {}
    for flag in ("--compile", "--no-compile"):
        model = T.train(args_for(default_world, tmp_path / flag, "--device", "cuda", flag, "--max-steps", "2",
                                 "--stage", "finetune", "--log-every", "1", "--drop-path", "0"))
        forms = {mod.ssd for mod in model.modules() if isinstance(mod, Mamba2Mixer)}
        assert forms == ({fast_ssd.ssd_triton} if flag == "--compile" else {fast_ssd.SSD_FORMS["auto"]}), forms
        losses[flag] = [float(v) for v in re.findall(r"loss (\S+) grad-norm", capsys.readouterr().out)]
    assert len(losses["--compile"]) == 2 and all(math.isfinite(v) for v in losses["--compile"])
    assert losses["--compile"][0] == pytest.approx(losses["--no-compile"][0], rel=2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_plain_loop_steps_with_fused_adamw_on_cuda(world, tmp_path, monkeypatch, device):
    """train.PlainSteps (the paper preset's loop) takes torch's fused AdamW on CUDA, the optimizer benchmark.py train
    measures, and torch's default form on the CPU."""
    made, make = [], T.make_optimizer
    monkeypatch.setattr(T, "make_optimizer", lambda *a, **k: made.append(make(*a, **k)) or made[-1])
    T.train(args_for(world, tmp_path, "--device", device, "--fast", "off", "--stage", "finetune", "--max-steps", "1"))
    assert len(made) == 1 and made[0].defaults["fused"] is (True if device == "cuda" else None)


def _interrupted_worker(rank, world_size, port, argv, out, stop):
    try:
        _worker(rank, world_size, port, argv, out, stop)
    except KeyboardInterrupt:  # the stop skipped train()'s own teardown: a live gloo group can abort at exit
        torch.distributed.destroy_process_group()


def test_fsdp_checkpoint_resumes_in_one_process(default_world, tmp_path):
    """2-process FSDP stops after step 2 (checkpoint-2 was gathered from the shards); one process resumes it and ends
    where an uninterrupted one-process run does: the optimizer state is stored whole, keyed by parameter name."""
    argv = ["--synthetic-dir", str(default_world), "--global-batch", "8", "--no-eval", "--log-every", "1000",
            "--device", "cpu", "--max-steps", "4", "--save-every", "2", "--stage", "finetune", "--drop-path", "0"]
    out = ["--out", str(tmp_path / "run")]
    spawn_two(_interrupted_worker, argv + out + ["--parallel", "fsdp"], str(tmp_path), 2)
    assert (tmp_path / "run/finetune/latest").read_text() == "checkpoint-2"
    resumed = params(T.train(T.parse_args(argv + out + ["--resume"])))
    straight = params(T.train(T.parse_args(argv + ["--out", str(tmp_path / "straight")])))
    assert_adam_close(resumed, straight, lr=1e-3, steps=4)  # steps 1-2 ran split over 2 processes


# ---------------------------------------------------------------- evaluation metrics

def test_answer_normalization_and_vqa_soft_accuracy():
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("The Red, circle!") == "red circle"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("3.5") == "3.5"
    humans = ["2"] * 3 + ["two"] + ["3"] * 6  # "2" given by 4 people (after normalization)
    assert vqa_soft_accuracy("two", humans) == pytest.approx(1.0)
    humans = ["2"] * 2 + ["3"] * 8
    # leave-one-out: 2 subsets drop a "2" (1 match -> 1/3), 8 keep both (2 matches -> 2/3)
    assert vqa_soft_accuracy("2", humans) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_soft_accuracy("4", humans) == 0.0


def test_pope_metrics_by_hand():
    preds = ["Yes, there is.", "no", "yes", "No.", "yes", "no"]
    gold = ["yes", "yes", "no", "no", "yes", "no"]
    m = pope_metrics(preds, gold)  # tp 2, fn 1, fp 1, tn 2
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.5)


def test_question_file_formats_and_family_accuracy(tmp_path):
    (tmp_path / "pope.jsonl").write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", '
                                         '"label": "yes"}\n{"question_id": 2, "image": "b.jpg", "text": "Is there '
                                         'a cat?", "label": "no"}\n')
    qs = load_questions(tmp_path / "pope.jsonl")
    assert [q["answer"] for q in qs] == ["yes", "no"] and qs[0]["image"] == "a.jpg"
    (tmp_path / "vqa.json").write_text(json.dumps([{"question": "How many?", "image": "c.jpg",
                                                    "answers": [{"answer": "2"}] * 10}]))
    assert load_questions(tmp_path / "vqa.json")[0]["answer"] == ["2"] * 10
    acc = family_accuracy(["yes", "Red.", "2", "no"], ["yes", "red", "3", "no"],
                          ["existence", "attribute", "counting", "existence"])
    assert acc == {"attribute": 1.0, "counting": 0.0, "existence": 1.0, "overall": 0.75}


def test_init_from_with_another_connector_keeps_the_lm_and_builds_a_new_connector(world, tmp_path, capsys):
    """The ablation set-up (the paper's Tables 6-7): one LM, a new connector of each kind. --init-from alone keeps
    the folder's connector; --connector / --scan other than its own replace it and keep everything else."""
    files = world_files(world)
    saved = T.build_model(args_for(world, tmp_path), files)
    saved.save_pretrained(tmp_path / "lm")
    ref = saved.state_dict()
    for extra, kind, scan in [((), "msc-advanced", "bsm"), (("--connector", "msc-advanced"), "msc-advanced", "bsm"),
                              (("--connector", "mlp"), "mlp", "bsm"), (("--scan", "csm"), "msc-advanced", "csm")]:
        model = T.build_model(args_for(world, tmp_path, "--init-from", str(tmp_path / "lm"), *extra), files)
        state = model.state_dict()
        assert (model.config.connector.kind, model.config.connector.scan) == (kind, scan)
        for name, tensor in ref.items():
            if not name.startswith("connector."):
                assert torch.equal(state[name], tensor), name
        new = {n for n in state if n.startswith("connector.")}
        if (kind, scan) == ("msc-advanced", "bsm"):  # kept, tensor for tensor
            assert all(torch.equal(state[n], ref[n]) for n in new)
            assert "new" not in capsys.readouterr().out
        else:
            assert any(n not in ref or not torch.equal(state[n], ref[n]) for n in new)
            assert f"a new {kind}/{scan} connector" in capsys.readouterr().out
        assert model.tokenizer.encode("red circle").ids == saved.tokenizer.encode("red circle").ids
    # it trains and saves as the new kind, with the same seed the same new connector
    T.train(args_for(world, tmp_path / "run", "--init-from", str(tmp_path / "lm"), "--connector", "mlp", "--stage",
                     "align", "--max-steps", "1"))
    saved_config = json.loads((tmp_path / "run/final/config.json").read_text())
    assert saved_config["connector"]["kind"] == "mlp"
    a = T.build_model(args_for(world, tmp_path, "--init-from", str(tmp_path / "lm"), "--connector", "mlp"), files)
    b = T.build_model(args_for(world, tmp_path, "--init-from", str(tmp_path / "lm"), "--connector", "mlp"), files)
    assert all(torch.equal(x, y) for x, y in zip(a.connector.parameters(), b.connector.parameters()))
