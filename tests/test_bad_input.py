"""Bad input gets a clear error before the work starts, and a run never loses its progress (docs/bad-inputs.md lists
every case these tests try and its outcome)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate as E
import train as T
from synthetic import world_files
from data import LLaVADataset, collate
from mamba2 import Mamba2Config, Mamba2LMHeadModel
from weights import load_tokenizer
from model import MLMamba
from weights import CheckpointError


@pytest.fixture(scope="module")
def saved_model(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    T.build_model(T.parse_args(["--device", "cpu"]), world_files(world)).save_pretrained(folder)
    return folder


def args_for(world, out, *extra):
    return ["--synthetic-dir", str(world), "--out", str(out), "--global-batch", "8", "--no-eval", "--device", "cpu",
            "--stage", "align", "--max-steps", "2", *extra]


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- the run folder

def test_a_run_folder_is_never_silently_mixed_or_rewound(default_world, tmp_path, capsys):
    world, out = default_world, tmp_path / "run"
    assert T.main(args_for(world, out)) == 0
    # a second run into the same folder must say what it means
    assert T.main(args_for(world, out)) == 2
    assert "already holds a run (align, final, train.log)" in one_line_error(capsys) and (out / "final").is_dir()
    # --overwrite deletes the old run first; the new one's latest names a checkpoint that exists
    (out / "align" / "checkpoint-500").mkdir()  # an older run's higher-numbered checkpoint
    assert T.main(args_for(world, out, "--overwrite")) == 0
    assert not (out / "align" / "checkpoint-500").exists()
    assert T.latest_checkpoint(out / "align") == out / "align" / "checkpoint-2"
    # --resume of a finished stage continues (nothing left to do); of an empty folder it refuses
    assert T.main(args_for(world, out, "--resume")) == 0
    assert T.main(args_for(world, tmp_path / "empty", "--resume")) == 2
    assert "holds no checkpoint to continue from" in one_line_error(capsys)
    # a pointer to a checkpoint that is not there is named, never silently restarted from step 1
    (out / "align" / "latest").write_text("checkpoint-9")
    assert T.main(args_for(world, out, "--resume")) == 2
    assert "names 'checkpoint-9', which is not a complete checkpoint" in one_line_error(capsys)
    with pytest.raises(SystemExit) as e:
        T.parse_args(args_for(world, out, "--resume", "--overwrite"))
    assert e.value.code == 2


def test_pruning_never_deletes_the_checkpoint_latest_names(world, tmp_path):
    """Higher-numbered checkpoints of another run in the folder: the new checkpoint-2 stays, and latest names it."""
    stage = tmp_path / "align"
    for step in (500, 600):
        (stage / f"checkpoint-{step}").mkdir(parents=True)
    saved = T.build_model(T.parse_args(["--device", "cpu"]), world_files(world))
    opt = torch.optim.AdamW(saved.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    T.save_checkpoint(stage, saved, saved.state_dict(), {}, sched, 2, 10)
    assert (stage / "latest").read_text() == "checkpoint-2"
    assert sorted(d.name for d in stage.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-600"]


# ---------------------------------------------------------------- training data

def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def good(image="ok.png", reply="yes"):
    return {"id": "good", "image": image, "conversations": [{"from": "human", "value": "<image>\nhello"},
                                                            {"from": "gpt", "value": reply}]}


def dataset(path, root, model):
    return LLaVADataset(path, root, model.tokenizer, model.image_token_id, model.num_image_tokens,
                        model.vision.preprocess)


def test_malformed_samples_are_set_aside_with_their_reasons(saved_model, tmp_path):
    model = MLMamba.from_pretrained(saved_model)
    Image.new("RGB", (30, 20), (0, 200, 0)).save(tmp_path / "ok.png")
    (tmp_path / "folder.png").mkdir()
    bad = {
        "not a dict": ["a", "list"],
        "no conversations": {"id": "x", "image": "ok.png"},
        "role/content": {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]},
        "null value": {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "yes"}]},
        "no reply": {"conversations": [{"from": "human", "value": "hello"}]},
        "empty reply": {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": " "}]},
        "gpt first": {"conversations": [{"from": "gpt", "value": "yes"}, {"from": "human", "value": "hello"}]},
        "two images": good() | {"conversations": [{"from": "human", "value": "<image> <image>"},
                                                  {"from": "gpt", "value": "yes"}]},
        "missing image": good("nope.png"),
        "image a number": good(7),
        "image a folder": good("folder.png"),
    }
    samples = [good()] + list(bad.values()) + [good(reply="no")]
    ds = dataset(write(tmp_path / "data.json", samples), tmp_path, model)
    assert len(ds) == 2 and sorted(ds.problems) == list(range(1, len(bad) + 1))
    reasons = dict(zip(bad, ds.problems.values()))
    assert "JSON object" in reasons["not a dict"] and "conversations" in reasons["no conversations"]
    assert "it has: role, content" in reasons["role/content"] and "None" in reasons["null value"]
    assert reasons["no reply"] == reasons["empty reply"] == "no reply to train on"
    assert "'gpt'" in reasons["gpt first"] and "more than one <image>" in reasons["two images"]
    assert "nope.png" in reasons["missing image"] and "7" in reasons["image a number"]
    assert "folder.png" in reasons["image a folder"]
    with pytest.raises(ValueError, match="must hold a JSON list of samples, not a dict"):
        dataset(write(tmp_path / "object.json", {"samples": samples}), tmp_path, model)
    (tmp_path / "broken.json").write_text('[{"id": 1,')
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        dataset(tmp_path / "broken.json", tmp_path, model)


def test_an_image_that_fails_to_decode_in_training_is_skipped(saved_model, tmp_path, monkeypatch):
    """A decompression bomb (PIL refuses it) or a corrupt file found only when its batch comes: a skipped item with
    the file's name, never a crash."""
    model = MLMamba.from_pretrained(saved_model)
    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    ds = dataset(write(tmp_path / "d.json", [good("big.png"), good("corrupt.png")]), tmp_path, model)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 600 pixels > 2 x 100: a "bomb"
    items = [ds[0], ds[1]]
    assert "big.png" in items[0]["skip"] and "decompression bomb" in items[0]["skip"].lower()
    assert "corrupt.png" in items[1]["skip"]
    batch = collate(items)
    assert batch["input_ids"] is None and len(batch["skipped"]) == 2
    # the message names the sample by its index in the file, also after others were set aside at load
    ds = dataset(write(tmp_path / "e.json", [{"id": "x"}, good("corrupt.png")]), tmp_path, model)
    assert ds[0]["skip"].startswith("sample 1 (good): ")


def test_training_refuses_data_with_too_few_usable_samples(world, saved_model, tmp_path, capsys):
    """Every sample without a reply: the run stops before training, saying how many were set aside and why."""
    samples = [{"image": "images/train_00000.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]}] * 20
    data = write(world / "noreply.json", samples)
    code = T.main(["--data", str(data), "--image-root", str(world), "--init-from", str(saved_model), "--out",
                   str(tmp_path / "run"), "--device", "cpu", "--global-batch", "8"])
    assert code == 2
    out, err = capsys.readouterr()
    assert "20 of 20 samples set aside: sample 0: no reply to train on" in out
    assert "0 usable samples (20 set aside as malformed) are fewer than one global batch of 8" in err
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("argv,message", [
    (["--max-steps", "0"], "0 is not a positive integer"),
    (["--max-steps=-1"], "-1 is not a positive integer"),
    (["--save-every", "0"], "0 is not a positive integer"),
    (["--global-batch", "0"], "0 is not a positive integer"),
    (["--lr=-1e-3"], "-1e-3 is not a positive number"),
    (["--epochs", "x"], "'x' is not a number"),
    (["--drop-path", "1"], "is not a fraction in [0, 1)"),
])
def test_train_settings_are_checked_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        T.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--max-new-tokens=-5"], "-5 is not a positive integer"),
    (["--temperature=-1"], "-1 is not a non-negative number"),
    (["--top-k=-3"], "-3 is not a non-negative integer"),
    (["--top-p", "0"], "0 is not a probability in (0, 1]"),
    (["--top-p", "1.5"], "1.5 is not a probability in (0, 1]"),
])
def test_generation_settings_are_checked_by_the_parser(argv, message, capsys):
    import generate
    with pytest.raises(SystemExit) as e:
        generate.parse_args(["--model", "m", "--prompt", "hi", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- evaluation

class Answerer:
    """A stand-in model for evaluate(): answers "yes" to each question it is asked (evaluate reads the images),
    counts them."""

    def __init__(self, model):
        self.tokenizer, self.asked = model.tokenizer, 0

    def eval(self):
        return self

    def generate_batch(self, images, questions, max_new_tokens):
        assert len(images) == len(questions)
        self.asked += len(questions)
        return [self.tokenizer.encode("yes").ids for _ in questions]


@pytest.mark.parametrize("content,message", [
    ("[]", "holds no questions"),
    ("", "holds no questions"),
    ('{"questions": []}', "holds no questions"),
    ('[{"question": "Is it?", "answer": null}]', "record 0: the answer must be text"),
    ('[{"question": "Is it?"}]', "record 0: the answer must be text"),
    ('[{"question": "Is it?", "answer": 3}]', "record 0: the answer must be text"),
    ('[{"question": "Is it?", "answer": "yes"}, {"answer": "no"}]', "record 1: no question text"),
    ('[{"question": "Is it?", "answer": "yes", "image": 5}]', 'record 0: "image" must be a file name'),
    ('{"question_id": 1, "text": "a?", "label": "yes"}\n{"question_id": 2, "text": "b?", "label": "no"}\n{"bad',
     "line 3: not valid JSON"),
    ('[{"question": "a?", "answer": "yes"},', "is not valid JSON"),
    ('[5]', "record 0: a record must be a JSON object"),
])
def test_a_question_file_is_checked_before_any_question_is_asked(saved_model, tmp_path, content, message):
    (tmp_path / "q.json").write_text(content)
    answerer = Answerer(MLMamba.from_pretrained(saved_model))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        E.evaluate(answerer, tmp_path / "q.json", metric="pope", answer_batch=answerer.generate_batch)
    assert answerer.asked == 0


def test_lists_of_answers_need_the_vqa_metric_and_a_missing_image_is_set_aside(saved_model, tmp_path, capsys):
    """A question whose image cannot be read is not scored: set aside, counted and named in a warning; with none left,
    one error."""
    answerer = Answerer(MLMamba.from_pretrained(saved_model))
    write(tmp_path / "vqa.json", [{"question": "What?", "answers": ["yes"] * 10}])
    with pytest.raises(ValueError, match="lists of human answers go with --metric vqa"):
        E.evaluate(answerer, tmp_path / "vqa.json", metric="family", answer_batch=answerer.generate_batch)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    write(tmp_path / "pope.json", [{"question": "Is there a cat?", "answer": "yes", "image": "a.png"},
                                   {"question": "Is there a dog?", "answer": "yes", "image": "missing.png"}])
    result = E.evaluate(answerer, tmp_path / "pope.json", metric="pope", answer_batch=answerer.generate_batch)
    assert answerer.asked == 1 and result["accuracy"] == 1.0 and result["n"] == 1 and result["set_aside"] == 1
    assert "question 1 set aside: image not found" in capsys.readouterr().err
    write(tmp_path / "none.json", [{"question": "Is there a dog?", "answer": "no", "image": "missing.png"}])
    with pytest.raises(ValueError, match="none of the 1 questions could be asked"):
        E.evaluate(answerer, tmp_path / "none.json", metric="pope", answer_batch=answerer.generate_batch)


@pytest.mark.parametrize("records,message", [
    ([{"question": "a?", "answer": "red", "image": "a.png"}], "POPE labels are yes or no; 1 are not: record 0: 'red'"),
    ([{"question": "a?", "answer": "Yes", "question_id": 3}, {"question": "b?", "answer": "no", "question_id": 3}],
     "record 1: id 3 repeats record 0's"),
    ([{"question": "a?", "answer": "yes", "image": ""}], 'record 0: "image" must be a file name, not \'\''),
])
def test_a_question_file_is_scored_only_on_what_it_can_mean(saved_model, tmp_path, records, message):
    """POPE labels are yes / no (any case), ids are unique, an image name is not empty: each is refused up front."""
    answerer = Answerer(MLMamba.from_pretrained(saved_model))
    write(tmp_path / "q.json", records)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        E.evaluate(answerer, tmp_path / "q.json", metric="pope", answer_batch=answerer.generate_batch)
    assert answerer.asked == 0


def test_a_one_line_jsonl_file_is_one_question(tmp_path):
    (tmp_path / "pope.jsonl").write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", '
                                         '"label": "yes"}\n')
    assert [q["question"] for q in E.load_questions(tmp_path / "pope.jsonl")] == ["Is there a dog?"]


# ---------------------------------------------------------------- configs and tokenizers

def tiny_lm_folder(tmp_path):
    lm = Mamba2LMHeadModel(Mamba2Config(d_model=16, n_layer=1, vocab_size=50, d_state=8, headdim=8, chunk_size=4))
    lm.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


@pytest.mark.parametrize("change,message", [
    ({"d_model": "96"}, "d_model must be an int, not '96'"),
    ({"n_layer": None}, "n_layer must be an int, not None"),
    ({"d_model": -4}, "d_model must be > 0"),
    ({"ssm_cfg": "x"}, "ssm_cfg must be an object"),
    ({"vocab_size": None}, "vocab_size must be an int"),
])
def test_a_mamba2_config_is_checked_on_load_naming_the_file_and_the_field(tmp_path, change, message):
    folder = tiny_lm_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(CheckpointError, match=message) as e:
        Mamba2LMHeadModel.from_pretrained(folder)
    assert str(folder / "config.json") in str(e.value)


def test_hf_config_fields_a_list_and_a_corrupt_tokenizer_are_named(tmp_path):
    folder = tiny_lm_folder(tmp_path)
    hf = {"model_type": "mamba2", "num_heads": 4, "head_dim": 8, "expand": 2, "hidden_size": 16,
          "num_hidden_layers": None, "vocab_size": 50, "state_size": 8, "conv_kernel": 4, "n_groups": 1,
          "layer_norm_epsilon": 1e-5}
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="n_layer must be an int, not None"):
        Mamba2LMHeadModel.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps([hf]))
    with pytest.raises(CheckpointError, match="must hold a JSON object, not a list"):
        Mamba2LMHeadModel.from_pretrained(folder)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    with pytest.raises(CheckpointError, match="is not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_an_ml_mamba_config_is_checked_on_load(saved_model, tmp_path):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(saved_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for section, change, message in [("connector", {"vision_dim": "x"}, "vision_dim must be an int"),
                                     ("connector", {"drop_path": 2}, "drop_path must be in"),
                                     ("lm", {"d_state": 0}, "d_state must be > 0")]:
        (folder / "config.json").write_text(json.dumps({**cfg, section: {**cfg[section], **change}}))
        with pytest.raises(CheckpointError, match=message) as e:
            MLMamba.from_pretrained(folder)
        assert str(folder / "config.json") in str(e.value)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "lm"}))
    with pytest.raises(CheckpointError, match="has no 'lm' field"):
        MLMamba.from_pretrained(folder)


def test_a_folder_given_as_an_image_is_named_as_a_folder(tmp_path):
    from images import ImageError, load_image
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        load_image(tmp_path)


# ---------------------------------------------------------------- random corruptions

def corruptions(seed, n):
    """n random corruptions of a valid two-turn LLaVA sample: dropped keys, wrong types, nulls, swapped roles, bad
    paths, at every level of the structure."""
    rng = random.Random(seed)
    junk = [None, 0, 3.5, True, "", "x", [], {}, ["a"], {"from": "human"}, "<image>", "../../etc/passwd"]
    for _ in range(n):
        sample = good()
        sample["conversations"] += [{"from": "human", "value": "again?"}, {"from": "gpt", "value": "no"}]
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(6)
            turns = sample.get("conversations")
            if kind == 0:
                sample.pop(rng.choice(list(sample) or ["id"]), None)
            elif kind == 1:
                sample[rng.choice(["image", "conversations", "id"])] = rng.choice(junk)
            elif kind == 2 and isinstance(turns, list) and turns:
                turns[rng.randrange(len(turns))] = rng.choice(junk)
            elif kind == 3 and isinstance(turns, list) and turns and isinstance(turns[0], dict):
                turn = rng.choice([t for t in turns if isinstance(t, dict)])
                turn[rng.choice(["from", "value"])] = rng.choice(junk + ["gpt", "human", "system"])
            elif kind == 4 and isinstance(turns, list) and len(turns) > 1:
                i, j = rng.sample(range(len(turns)), 2)
                turns[i], turns[j] = turns[j], turns[i]
            elif kind == 5:
                sample = rng.choice(junk)
                break
        yield sample


def test_random_corruptions_are_kept_or_set_aside_never_an_exception(saved_model, tmp_path):
    model = MLMamba.from_pretrained(saved_model)
    Image.new("RGB", (30, 20), (0, 200, 0)).save(tmp_path / "ok.png")
    outcomes = {"kept": 0, "set aside": 0}
    for k, sample in enumerate(corruptions(seed=0, n=300)):
        ds = dataset(write(tmp_path / "c.json", [sample]), tmp_path, model)
        if ds.problems:
            assert len(ds) == 0 and isinstance(ds.problems[0], str) and ds.problems[0], sample
            outcomes["set aside"] += 1
            continue
        item = ds[0]
        batch = collate([item])
        assert "skip" in item or (batch["input_ids"].shape[1] > 0 and (batch["labels"] != -100).any()), sample
        outcomes["kept"] += 1
    assert outcomes["kept"] > 20 and outcomes["set aside"] > 150, outcomes


# ---------------------------------------------------------------- the release's converter

def test_the_converter_never_writes_over_its_inputs_or_a_full_folder(tmp_path, capsys):
    """convert_release.py checks --out before it reads anything: not one of its inputs (the Mamba-2 folder would lose
    its weights), not a file, and not a folder that holds files unless --overwrite; each refusal is one line, exit 2,
    and every file stays as it was."""
    import convert_release
    lm, out = tmp_path / "lm", tmp_path / "out"
    lm.mkdir()
    (lm / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "ckpt.pt").write_bytes(b"checkpoint")
    args = [str(tmp_path / "ckpt.pt"), "--llm", str(lm), "--tokenizer", str(tmp_path / "tok.json"), "--out"]
    cases = {str(lm): "holds the input", str(tmp_path): "holds the input", str(tmp_path / "ckpt.pt"): "holds the input"}
    out.mkdir()
    (out / "config.json").write_text("{}")
    cases[str(out)] = "is not empty; give another folder, or --overwrite"
    (tmp_path / "file").write_text("x")
    cases[str(tmp_path / "file")] = "is a file"
    for target, message in cases.items():
        assert convert_release.main(args + [target]) == 2
        assert message in one_line_error(capsys), target
    assert (lm / "model.safetensors").read_bytes() == b"weights" and (out / "config.json").read_text() == "{}"
    assert convert_release.main(args + [str(out), "--overwrite"]) == 2  # past the check, to the next missing input
    assert "needs at least one vision encoder" in one_line_error(capsys)


def test_library_calls_with_impossible_arguments_get_one_value_error(saved_model):
    """generate with a prompt that is not text or sampling settings out of range, generate_batch with mismatched or
    empty lists: each a ValueError that names the arguments, before any work."""
    from fast_decode import generate_batch
    model = MLMamba.from_pretrained(saved_model)
    for kwargs, message in ((dict(prompt=None), "the prompt must be text"),
                            (dict(prompt="Hi", top_p=0.0), "0 < top_p <= 1"),
                            (dict(prompt="Hi", temperature=-1.0), "temperature >= 0"),
                            (dict(prompt="Hi", top_k=-2), "top_k >= 0")):
        with pytest.raises(ValueError, match=message):
            model.generate(None, max_new_tokens=2, **kwargs)
    for images, prompts in (([None], ["a", "b"]), ([None, None], ["a"]), ([], [])):
        with pytest.raises(ValueError, match="one image \\(or None\\) per prompt"):
            generate_batch(model, images, prompts)


def test_nothing_is_read_from_outside_its_root(world, saved_model, tmp_path, capsys):
    """A training sample's or a question's image that leaves the image root ("..", an absolute path) is set aside and
    named, though the file exists; a shard index that names a file outside the model folder is refused."""
    from safetensors.torch import save_file
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "in.png")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]
    samples = [{"image": name, "conversations": turns} for name in ("in.png", "../outside.png", str(outside))]
    write(tmp_path / "train.json", samples)
    model = MLMamba.from_pretrained(saved_model)
    data = LLaVADataset(tmp_path / "train.json", root, model.tokenizer, model.image_token_id, 9,
                        model.vision.preprocess)
    assert len(data) == 1 and sorted(data.problems) == [1, 2]
    assert all("is outside the image root" in reason for reason in data.problems.values())
    answerer = Answerer(model)
    write(tmp_path / "q.json", [{"question": "Is it?", "answer": "yes", "image": name}
                                for name in ("in.png", "../outside.png")])
    result = E.evaluate(answerer, tmp_path / "q.json", root, metric="pope", answer_batch=answerer.generate_batch)
    assert answerer.asked == 1 and result["set_aside"] == 1 and "outside the image root" in capsys.readouterr().err
    folder = tmp_path / "lm"
    folder.mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "evil.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="names the shard '../evil.safetensors', outside"):
        from weights import read_tensors
        read_tensors(folder)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(extra=1), "unknown MLMambaConfig fields: \\['extra'\\]"),
    (lambda c: c.update(max_length="512"), "max_length must be an int, not '512'"),
    (lambda c: c.update(vision_layer=99), "vision_layer 99 is not a block of encoders 2 deep"),
    (lambda c: c.update(vision_layer="-2"), "vision_layer must be an int"),
    (lambda c: c.update(vision=[1]), "vision must be an object"),
])
def test_a_config_field_of_the_wrong_kind_is_one_line_naming_it(saved_model, tmp_path, change, message):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(saved_model, folder)
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        MLMamba.from_pretrained(folder)


def test_a_deeply_nested_config_and_a_tokenizer_bigger_than_the_vocabulary_are_refused(saved_model, tmp_path):
    import shutil
    from data import train_tokenizer
    folder = tmp_path / "m"
    shutil.copytree(saved_model, folder)
    (folder / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        MLMamba.from_pretrained(folder)
    model = MLMamba.from_pretrained(saved_model)
    V = model.config.lm.vocab_size
    big = train_tokenizer([f"word{i} " * 3 for i in range(3000)], vocab_size=V + 200)
    with pytest.raises(ValueError, match=f"text token ids go up to {V + 199}, the LM's vocabulary to {V - 1}"):
        model.set_tokenizer(big)
    small = train_tokenizer(["a b c"], vocab_size=V)  # fewer tokens: the LM could say ids it cannot decode
    with pytest.raises(ValueError, match=f"the LM's vocabulary to {V - 1}: use the LM's own tokenizer"):
        model.set_tokenizer(small)


def test_a_tokenizer_whose_image_token_comes_after_the_lm_vocabulary_is_accepted(saved_model):
    """GPT-NeoX-20B's case: its text tokens fill Mamba-2's vocabulary of 50277, and "<image>" is added after them
    (id 50277): the image slots are filled by the connector and never predicted, so the LM needs no row for it."""
    from tokenizers import Tokenizer, models
    model = MLMamba.from_pretrained(saved_model)
    V = model.config.lm.vocab_size
    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, V)}}
    model.set_tokenizer(Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>")))
    assert (model.eos_token_id, model.image_token_id) == (0, V)
    N = model.num_image_tokens
    image_tokens = torch.randn(1, N, model.config.lm.d_model)
    embeds = model.embed(torch.tensor([[V] * N + [1, 2]]), image_tokens)
    assert torch.equal(embeds[0, :N], image_tokens[0]) and torch.equal(embeds[0, N:], model.lm.embedding.weight[1:3])


def test_a_run_that_stops_on_a_bad_input_leaves_its_folder_untouched(world, tmp_path, capsys):
    """--data missing: one line naming it, and nothing written into --out, so the corrected run is not refused."""
    out = tmp_path / "run"
    assert T.main(["--data", str(tmp_path / "nope.json"), "--out", str(out), "--device", "cpu"]) == 2
    assert "--data file not found" in one_line_error(capsys) and not out.exists()


def test_a_second_run_into_a_folder_in_use_is_one_line_naming_the_first(tmp_path):
    """Two runs into one --out at once: the second gets one line with the first's process, whatever --overwrite."""
    import run_folder
    code = ("import run_folder, train\n"
            f"with run_folder.taken({str(tmp_path / 'run')!r}, [], train.Process()):\n    pass")
    with run_folder.taken(tmp_path / "run", [], T.Process()):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[1])
        assert result.returncode != 0 and f"is in use by another run (process {os.getpid()})" in result.stderr
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


@pytest.mark.parametrize("content,message", [
    ({"model": {"mlp": {"0.weight": torch.ones(2, dtype=torch.int64)}}}, "mlp.0.weight is torch.int64, not a floating"),
    ({"model": {"mlp": {"0.weight": torch.tensor([1.0, float("nan")])}}}, "mlp.0.weight holds NaN or infinite"),
    ({"model": [1, 2]}, "is not the release's checkpoint"),
    ({"model": {"mlp": torch.ones(2)}}, "is not the release's checkpoint"),
    (torch.ones(3), "is not the release's checkpoint"),
    ({"model": {"mlp": {"0.weight": 5}}}, "mlp.0.weight is int, not a floating"),
])
def test_the_converter_takes_only_finite_floating_tensors_in_the_releases_layout(tmp_path, content, message):
    import convert_release
    torch.save(content, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=message):
        convert_release.read_release_tensors(tmp_path / "ckpt.pt")


class Payload:
    def __reduce__(self):
        return (print, ("a pickled payload ran",))


def test_a_pickled_object_in_a_release_checkpoint_is_one_line_and_never_runs(tmp_path, capsys):
    import convert_release
    torch.save({"model": {"mlp": Payload()}}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors") as e:
        convert_release.read_release_tensors(tmp_path / "ckpt.pt")
    assert "weights_only=False" not in str(e.value) and "payload ran" not in capsys.readouterr().out


def test_random_question_files_and_release_checkpoints_are_read_or_refused_in_one_line(tmp_path):
    """Random corruptions of a POPE record and of a release checkpoint: each is read, or refused with a ValueError /
    CheckpointError (one line), never another exception."""
    import convert_release
    rng = random.Random(1)
    junk = [None, 0, 3.5, True, "", "x", [], {}, ["a"], "yes", "no", {"answer": "yes"}, "../x.png", float("nan")]
    outcomes = {"read": 0, "refused": 0}
    for _ in range(200):
        record = {"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"}
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(list(record) + ["question", "answer", "answers", "conversations", "family"])
            record[key] = rng.choice(junk)
        lines = [json.dumps(rng.choice([record, junk[rng.randrange(len(junk))]])) for _ in range(rng.randint(1, 3))]
        (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
        try:
            E.load_questions(tmp_path / "q.jsonl")
            outcomes["read"] += 1
        except ValueError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["read"] > 10 and outcomes["refused"] > 50, outcomes
    tensors = [torch.ones(2), torch.ones(2, dtype=torch.int32), torch.tensor([float("inf")]), 1, "x", None, [1.0]]
    for _ in range(100):
        groups = {g: {f"{k}.weight": rng.choice(tensors) for k in range(2)} for g in ("mlp", "projector")}
        content = rng.choice([{"model": groups}, {"model": rng.choice(tensors)}, groups, rng.choice(tensors)])
        torch.save(content, tmp_path / "c.pt")
        try:
            convert_release.read_release_tensors(tmp_path / "c.pt")
        except CheckpointError as e:
            assert "\n" not in str(e)
