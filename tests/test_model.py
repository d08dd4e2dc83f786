"""The assembled ML-Mamba: splicing, causality, labels, padding, cached generation, save/load, stages, the CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import convert_release
from conftest import TEXTS, make_tokenizer, tiny_config
from model import IGNORE_INDEX, Conversation, MLMamba, encode_conversation, from_components, until_stop
from weights import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    return MLMamba(tiny_config(), tokenizer).eval()


def random_image(seed=0, size=(50, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def test_prompt_format_and_label_masking(tokenizer):
    """The "In: / Out:" prompt of eq. 9's f_T(Q): the text as tokenized, labels on the replies and stop tokens only."""
    turns = [("human", "<image>\nWhat color is the triangle?"), ("gpt", "Green."), ("human", "How many?"),
             ("gpt", "Two.")]
    ids, labels = encode_conversation(tokenizer, turns, image_token_id=tokenizer.token_to_id("<image>"))
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<image>\nWhat color is the triangle?\nOut: Green.<|endoftext|>\nIn: How many?\nOut: "
                    "Two.<|endoftext|>").replace("<image>", "In: <image>", 1)
    # the labelled tokens are exactly the replies and their stop tokens
    trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "Green.<|endoftext|>Two.<|endoftext|>"
    # no placeholder in the text: "<image>\n" opens the first human turn, as in LLaVA's data, and is not a target
    img = tokenizer.token_to_id("<image>")
    ids2, labels2 = encode_conversation(tokenizer, [("human", "Hi"), ("gpt", "Yes."), ("human", "And?")], img)
    ids3, labels3 = encode_conversation(tokenizer, [("human", "<image>\nHi"), ("gpt", "Yes."), ("human", "And?")], img)
    assert (ids2, labels2) == (ids3, labels3) and ids2.count(img) == 1 and labels2[ids2.index(img)] == IGNORE_INDEX
    with pytest.raises(ValueError, match="expected 'gpt'"):
        encode_conversation(tokenizer, [("human", "a"), ("human", "b")])
    # with N image tokens the placeholder becomes N slots, none a target; everything else is unchanged
    ids4, labels4 = encode_conversation(tokenizer, turns, image_token_id=img, num_image_tokens=4)
    p = ids.index(img)
    assert ids4 == ids[:p] + [img] * 4 + ids[p + 1:] and labels4 == labels[:p] + [IGNORE_INDEX] * 4 + labels[p + 1:]
    with pytest.raises(ValueError, match="2 <image> placeholders"):
        encode_conversation(tokenizer, [("human", "<image> and <image>")], img)


def test_image_tokens_go_into_the_slots_by_one_masked_assignment(model):
    """embed: the image tokens fill each sample's N slots in order; every other row is its token's embedding; a
    text-only sample in the same batch ignores its (zero-pixel) image tokens."""
    N, D = model.num_image_tokens, model.config.lm.d_model
    rows = [encode_conversation(model.tokenizer, [("human", "How many?")], model.image_token_id, N)[0],
            encode_conversation(model.tokenizer, [("human", "Hello there, how are you?")])[0]]
    L = max(map(len, rows))
    ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
    image_tokens = torch.randn(2, N, D)
    with torch.no_grad():
        embeds = model.embed(ids, image_tokens)
        text = model.lm.embedding(ids)
    slots = (ids[0] == model.image_token_id).nonzero().flatten()
    assert len(slots) == N and embeds.shape == (2, L, D)
    torch.testing.assert_close(embeds[0, slots], image_tokens[0], rtol=0, atol=0)
    others = torch.ones(L, dtype=torch.bool)
    others[slots] = False
    torch.testing.assert_close(embeds[0, others], text[0, others], rtol=0, atol=0)
    torch.testing.assert_close(embeds[1], text[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"needs {N} <image> slots"):
        model.embed(ids[:, :slots[0] + 2], image_tokens)
    with pytest.raises(ValueError, match="no image was given"):
        model.embed(ids)


def batch_of(model, conversations, image_seeds):
    rows = [encode_conversation(model.tokenizer, c, model.image_token_id, model.num_image_tokens)
            for c in conversations]
    L = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [0] * (L - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [IGNORE_INDEX] * (L - len(r[1])) for r in rows])
    px = [model.preprocess(random_image(s)) for s in image_seeds]
    pixels = {k: torch.cat([p[k] for p in px]) for k in px[0]}
    return pixels, ids, labels


def test_a_stop_token_typed_in_the_text_is_text(model):
    """User text is read as plain text: a typed "<|endoftext|>" (in a question, an answer or a later chat turn) is its
    characters, never the control token; the format's own stop tokens, and "<image>", keep their ids."""
    tok, eos, img = model.tokenizer, model.eos_token_id, model.image_token_id
    typed = "Is it <|endoftext|> here?"
    ids, labels = encode_conversation(tok, [("human", typed), ("gpt", "No <|endoftext|> there.")], img, 4)
    assert ids.count(eos) == 1 and ids[-1] == eos and ids.count(img) == 4  # the format's stop token alone
    assert tok.decode(ids, skip_special_tokens=True) == "In: \nIs it <|endoftext|> here?\nOut: No <|endoftext|> there."
    prompt_ids = model.prompt_ids(typed, False, 4)
    assert eos not in prompt_ids and tok.decode(prompt_ids) == f"In: {typed}\nOut: "
    conversation = Conversation(ids=prompt_ids + tok.encode("Yes.").ids)
    _, unread = conversation.next_turn_ids(model, "Why <|endoftext|>?")
    assert unread.count(eos) == 1 and unread[0] == eos  # the answer's stop token, added; the typed one is text


def test_loss_counts_exactly_the_reply_tokens(model):
    """Eq. 9 in training: the loss is the mean cross-entropy over exactly the reply tokens, recomputed from the
    logits."""
    conv = [("human", "<image>\nIs the circle left of the square?"), ("gpt", "Yes.")]
    pixels, ids, labels = batch_of(model, [conv], [0])
    with torch.no_grad():
        logits, loss = model(pixels, ids, labels)
    assert logits.shape[1] == ids.shape[1]  # the ids already hold the N image slots
    # by hand: position s - 1 predicts each reply token s
    targets = [(t, int(ids[0, t])) for t in range(ids.shape[1]) if labels[0, t] != -100]
    manual = torch.stack([F.cross_entropy(logits[0, s - 1], torch.tensor(tok)) for s, tok in targets]).mean()
    torch.testing.assert_close(loss, manual)
    assert len(targets) == len(model.tokenizer.encode("Yes.").ids) + 1  # and the stop token


def test_summed_loss_no_labels_and_text_only_rows(model):
    """loss_reduction="sum" is the sum of the reply tokens' cross-entropies; without labels there is no loss; a
    text-only batch (no pixel values, no image slots) is the LM alone on its ids; a model without a tokenizer has no
    image token, and its ids are embedded as text."""
    conv = [("human", "<image>\nIs the circle left of the square?"), ("gpt", "Yes.")]
    pixels, ids, labels = batch_of(model, [conv], [0])
    with torch.no_grad():
        logits, loss_sum = model(pixels, ids, labels, loss_reduction="sum")
        _, loss_mean = model(pixels, ids, labels)
        targets = labels[0, 1:] != IGNORE_INDEX
        manual = F.cross_entropy(logits[0, :-1][targets], labels[0, 1:][targets], reduction="none")
        torch.testing.assert_close(loss_sum, manual.sum())
        torch.testing.assert_close(loss_mean, manual.mean())
        assert model(pixels, ids)[1] is None
        text = torch.tensor([model.tokenizer.encode("In: How many?\nOut: Two.").ids])
        text_labels = text.masked_fill(torch.arange(text.shape[1]) < 5, IGNORE_INDEX)
        text_logits, text_loss = model(None, text, text_labels)
        lm_logits = model.lm(text)
        torch.testing.assert_close(text_logits, lm_logits.float())
        torch.testing.assert_close(text_loss, F.cross_entropy(lm_logits[0, 4:-1].float(), text[0, 5:]))
        bare = MLMamba(tiny_config()).eval()
        assert bare.image_token_id is None
        torch.testing.assert_close(bare.embed(text), bare.lm.embedding(text))


def test_padding_changes_no_loss_and_no_logit(model):
    short = [("human", "<image>\nHow many?"), ("gpt", "Two.")]
    long = [("human", "<image>\nWhat is in the picture? Tell me everything."), ("gpt", "A red circle.")]
    pixels, ids, labels = batch_of(model, [short], [1])
    with torch.no_grad():
        logits_alone, loss_alone = model(pixels, ids, labels)
        # the same sample padded with 7 more pad tokens: same loss
        pad_ids = F.pad(ids, (0, 7), value=5)
        pad_labels = F.pad(labels, (0, 7), value=IGNORE_INDEX)
        _, loss_padded = model(pixels, pad_ids, pad_labels)
        torch.testing.assert_close(loss_padded, loss_alone)
        # in a batch with a longer sample: its real positions keep their logits
        pixels2, ids2, labels2 = batch_of(model, [short, long], [1, 2])
        logits_batch, _ = model(pixels2, ids2, labels2)
    n = logits_alone.shape[1]
    torch.testing.assert_close(logits_batch[0, :n], logits_alone[0], rtol=1e-5, atol=1e-5)


def test_training_loss_without_logits_equals_the_full_forward(model):
    """return_logits=False (train.py) runs the LM head only where a target is predicted: same loss, same gradients."""
    convs = [[("human", "<image>\nHow many?"), ("gpt", "Two."), ("human", "And the colour?"), ("gpt", "Red.")],
             [("human", "<image>\nWhat is in the picture? Tell me everything."), ("gpt", "A red circle.")]]
    pixels, ids, labels = batch_of(model, convs, [4, 5])
    grads = []
    for return_logits in (True, False):
        model.zero_grad()
        logits, loss = model(pixels, ids, labels, loss_reduction="sum", return_logits=return_logits)
        loss.backward()
        assert (logits is None) == (not return_logits)
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_full, g_full), (loss_targets, g_targets) = grads
    torch.testing.assert_close(loss_targets, loss_full, rtol=1e-6, atol=0)
    assert g_full.keys() == g_targets.keys() and "lm.embedding.weight" in g_full and len(g_full) > 20
    for name in g_full:
        torch.testing.assert_close(g_targets[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_causality_over_the_spliced_sequence(model):
    """Eq. 9's LM is causal over the image + text sequence: a late token changes no earlier logit and changes its
    own."""
    conv = [("human", "<image>\nWhat color is the triangle?"), ("gpt", "Green and blue.")]
    pixels, ids, _ = batch_of(model, [conv], [3])
    t = ids.shape[1] - 4  # change a late text token
    ids2 = ids.clone()
    ids2[0, t] = (ids2[0, t] + 7) % 250
    with torch.no_grad():
        a, _ = model(pixels, ids)
        b, _ = model(pixels, ids2)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t], b[:, t])


def test_cached_generation_equals_greedy_full_forward(model):
    img = random_image(4)
    new = model.generate(img, "What is in the picture?", max_new_tokens=12)
    ids, _ = encode_conversation(model.tokenizer, [("human", "What is in the picture?")], model.image_token_id,
                                 model.num_image_tokens)
    pixels = model.preprocess(img)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            logits, _ = model(pixels, torch.tensor([seq]))
            nxt = int(logits[0, -1, :model.config.lm.vocab_size].argmax())
            if nxt == model.eos_token_id:
                break
            seq.append(nxt)
    assert new == seq[len(ids):]
    assert len(new) > 0


def test_batched_answers_equal_the_answers_one_at_a_time(model):
    """fast_decode.generate_batch (images encoded together, prompts of different lengths right-padded, `length`
    marking their ends) gives each question the greedy answer `generate` gives it alone, text-only questions
    included."""
    from fast_decode import generate_batch
    images = [random_image(1), None, random_image(2, size=(30, 60)), random_image(3), None]
    prompts = ["What is in the picture?", "Hi", "How many triangles are there in this picture, counting all?",
               "Color?", "Is the circle left of the square? Answer in one word."]
    batched = generate_batch(model, images, prompts, max_new_tokens=8)
    alone = [model.generate(image, prompt, max_new_tokens=8) for image, prompt in zip(images, prompts)]
    assert batched == alone
    assert all(alone)  # every question gets a non-empty answer to compare


def test_a_conversation_reads_each_later_turn_alone_and_answers_as_a_fresh_read(model, monkeypatch):
    """Chat from the fixed-size state: a later turn runs only its own tokens through the cache (the stop token,
    added where the answer was cut short, and the new question), and answers as reading the whole conversation's
    tokens from the start does; the cache then holds every token but a final stop token."""
    image, conversation = random_image(1), Conversation()
    first = model.generate(image, "What is in the picture?", max_new_tokens=6, conversation=conversation)
    assert first == model.generate(image, "What is in the picture?", max_new_tokens=6)
    assert len(first) == 6 and conversation.ids[-1] != model.eos_token_id  # cut short: the stop token is added
    all_ids, unread = conversation.next_turn_ids(model, "And its colour?")
    assert all_ids[len(conversation.ids)] == model.eos_token_id and 1 < len(unread) < len(all_ids) // 2
    read, prefill = [], model.lm.prefill
    monkeypatch.setattr(model.lm, "prefill", lambda cache, input_ids=None, inputs_embeds=None, length=None: (
        read.append(inputs_embeds.shape[1]) or prefill(cache, input_ids, inputs_embeds, length)))
    second = model.generate(None, "And its colour?", max_new_tokens=6, conversation=conversation)
    assert read == [len(unread)]
    fresh = model.lm.generate(inputs_embeds=model.embed(torch.tensor([all_ids]), model.encode_image(image)),
                              max_new_tokens=6, eos_token_id=model.eos_token_id)[0].tolist()
    assert second == until_stop(fresh, model.eos_token_id)
    assert conversation.ids[-1] != model.eos_token_id  # cut short again: the cache holds every token
    held = model.lm.allocate_cache(1)
    model.lm.prefill(held, inputs_embeds=model.embed(torch.tensor([conversation.ids]), model.encode_image(image)))
    for mine, ref in zip(conversation.cache.layers, held.layers):
        torch.testing.assert_close(mine.ssm_state, ref.ssm_state, rtol=1e-5, atol=1e-5)
    stopped = Conversation(ids=conversation.ids[:9] + [model.eos_token_id])  # an answer that stopped
    ids, unread = stopped.next_turn_ids(model, "Why?")
    assert ids[:10] == stopped.ids and unread[0] == model.eos_token_id and model.eos_token_id not in unread[1:]
    with pytest.raises(ValueError, match="one image per conversation"):
        model.generate(None, "<image> and this?", conversation=conversation)


def test_stage_switch_trains_the_right_parameters(model):
    """The training stages: pretrain trains the LM, align the connector, finetune both; the encoders never."""
    align = model.set_stage("align")
    assert align and all(n.startswith("connector.") for n in align)
    finetune = model.set_stage("finetune")
    assert {n.split(".")[0] for n in finetune} == {"connector", "lm"}
    pretrain = model.set_stage("pretrain")
    assert pretrain and all(n.startswith("lm.") for n in pretrain)
    assert not any(p.requires_grad for p in model.connector.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    with pytest.raises(ValueError, match="unknown stage"):
        model.set_stage("full")


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = MLMamba.from_pretrained(tmp_path).eval()
    pixels, ids, labels = batch_of(model, [[("human", "<image>\nHow many?"), ("gpt", "Two.")]], [5])
    with torch.no_grad():
        a, la = model(pixels, ids, labels)
        b, lb = loaded(pixels, ids, labels)
    assert torch.equal(a, b) and torch.equal(la, lb)
    img = random_image(6)
    assert loaded.generate(img, "How many?", max_new_tokens=6) == model.generate(img, "How many?", max_new_tokens=6)


# ---------------------------------------------------------------- from public-format components, through the CLI

@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    """A tiny ML-Mamba assembled from tiny checkpoints in the public formats, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    tok = make_tokenizer(TEXTS)
    tok.save(str(root / "tokenizer.json"))
    transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, state_size=16, n_groups=1,
        chunk_size=16, tie_word_embeddings=True)).save_pretrained(root / "lm")
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
        mlp_ratio=2)).save_pretrained(root / "dinov2")
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=42,
        patch_size=14)).save_pretrained(root / "siglip")
    model = from_components(root / "lm", {"dinov2": root / "dinov2", "siglip": root / "siglip"},
                                    root / "tokenizer.json", connector={"kind": "msc-advanced", "init": "lm"},
                                    input_size=42)
    assert model.vision.num_patches == 9 and model.vision.feature_dim == 40
    model.config.max_length = 100
    model.save_pretrained(root / "mlmamba")
    random_image(7).save(root / "image.png")
    return root


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_generate_cli_end_to_end(cli_model):
    out = run_cli("--model", cli_model / "mlmamba", "--image", cli_model / "image.png", "--prompt",
                  "What is in the picture?", "--max-new-tokens", "5", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    import re
    times = re.search(r"start-up and load ([\d.]+) s; image encoding to first token ([\d.]+) s, to last token "
                      r"([\d.]+) s, \d+ new tokens, Eval_avg [\d.]+ tokens/s; wall ([\d.]+) s", out.stderr)
    assert times, out.stderr
    load, first, last, wall = map(float, times.groups())
    assert 0 < first <= last and load + last <= wall + 0.02  # printed to 0.01 s (load, wall), 0.001 s
    # the printed answer is what the model generates
    model = MLMamba.from_pretrained(cli_model / "mlmamba").eval()
    ids = model.generate(cli_model / "image.png", "What is in the picture?", max_new_tokens=5)
    assert out.stdout.strip() == model.tokenizer.decode(ids).strip() and out.stdout.endswith("\n")


def test_generate_cli_with_a_bf16_state_decodes_with_one(cli_model, monkeypatch, capsys):
    """--state bf16: the decoder keeps the SSM state in bf16 (fast_decode.allocate_cache), and on this tiny model it
    answers as the fp32 state does."""
    import fast_decode
    import generate
    caches, allocate = [], fast_decode.allocate_cache
    monkeypatch.setattr(fast_decode, "allocate_cache", lambda *a, **k: caches.append(allocate(*a, **k)) or caches[-1])
    args = ["--model", str(cli_model / "mlmamba"), "--image", str(cli_model / "image.png"), "--prompt", "How many?",
            "--max-new-tokens", "5", "--device", "cpu"]
    assert generate.main([*args, "--state", "bf16"]) == 0
    answer = capsys.readouterr().out
    assert caches and all(layer.ssm_state.dtype == torch.bfloat16 for layer in caches[-1].layers)
    assert generate.main(args) == 0
    assert capsys.readouterr().out == answer and answer.strip()


@pytest.mark.slow
def test_generate_cli_with_compiled_blocks_answers_as_without(cli_model):
    """--compile runs the prefill through compiled blocks: the same answer as the plain blocks."""
    args = ("--model", cli_model / "mlmamba", "--image", cli_model / "image.png", "--prompt", "How many?",
            "--max-new-tokens", "5", "--device", "cpu")
    plain, compiled = run_cli(*args), run_cli(*args, "--compile")
    assert plain.returncode == compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == plain.stdout and plain.stdout.strip()


def test_generate_cli_interactive(cli_model):
    out = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(cli_model / "mlmamba"),
                          "--image", str(cli_model / "image.png"), "--interactive", "--max-new-tokens", "3"],
                         input="How many?\nWhat color?\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ml-mamba>") == 2 and out.stderr.count("Eval_avg") == 2
    # the first turn's time counts from the image's encoding; the second encodes no image
    timings = [line for line in out.stderr.splitlines() if "Eval_avg" in line]
    assert "image encoding to first token" in timings[0] and "; prompt to first token" in timings[1]
    # each turn's answer is the one generate gives with the conversation so far
    model, conversation = MLMamba.from_pretrained(cli_model / "mlmamba").eval(), Conversation()
    image_tokens = model.encode_image(cli_model / "image.png")
    replies = [model.tokenizer.decode(model.generate(None, q, image_tokens=image_tokens, max_new_tokens=3,
                                                     conversation=conversation)) for q in ("How many?", "What color?")]
    streamed = [r.rstrip("\ufffd") for r in replies]  # a last, incomplete multi-byte character is never printed
    assert [part[:len(r)] for part, r in zip(out.stdout.split("ml-mamba> ")[1:], streamed)] == streamed


@pytest.mark.parametrize("case", ["no_model", "bad_image", "long_prompt"])
def test_generate_cli_bad_input_is_one_line(cli_model, case):
    args = {"no_model": ["--model", cli_model / "nope", "--prompt", "hi"],
            "bad_image": ["--model", cli_model / "mlmamba", "--image", cli_model / "missing.jpg", "--prompt", "hi"],
            "long_prompt": ["--model", cli_model / "mlmamba", "--image", cli_model / "image.png", "--prompt",
                            "What is in the picture? " * 20]}[case]
    out = run_cli(*args, "--device", "cpu")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert {"no_model": "nope", "bad_image": "missing.jpg", "long_prompt": "the limit is 100"}[case] in out.stderr


@pytest.mark.gpu
def test_cuda_forward_matches_cpu_and_bf16_generates(model):
    pixels, ids, labels = batch_of(model, [[("human", "<image>\nHow many?"), ("gpt", "Two.")]], [9])
    with torch.no_grad():
        cpu_logits, cpu_loss = model(pixels, ids, labels)
        model.cuda()
        gpu_logits, gpu_loss = model({k: v.cuda() for k, v in pixels.items()}, ids.cuda(), labels.cuda())
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, rtol=2e-3, atol=2e-3)  # cuDNN convs may use TF32
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=2e-3, atol=2e-3)
    model.to(torch.bfloat16)
    out = model.generate(random_image(9), "How many?", max_new_tokens=6)
    assert 0 < len(out) <= 6 and all(0 <= t < model.config.lm.vocab_size for t in out)


def test_the_release_prompt_format_zephyr(tokenizer, tmp_path):
    """prompt="zephyr" (the authors' release): <|user|>\\n{q}<|endoftext|>\\n<|assistant|>\\n{a}<|endoftext|>,
    turns joined by "\\n", the image's N slots before all the text wherever the placeholder stood; labels on the
    replies and their stop tokens; generation follows the model's prompt, which its saved config keeps."""
    img = tokenizer.token_to_id("<image>")
    turns = [("human", "<image>\nWhat color is the triangle?"), ("gpt", "Green."), ("human", "How many?"),
             ("gpt", "Two.")]
    ids, labels = encode_conversation(tokenizer, turns, img, num_image_tokens=3, prompt="zephyr")
    assert ids[:3] == [img] * 3 and img not in ids[3:] and labels[:3] == [IGNORE_INDEX] * 3
    assert tokenizer.decode(ids[3:], skip_special_tokens=False) == (
        "<|user|>\nWhat color is the triangle?<|endoftext|>\n<|assistant|>\nGreen.<|endoftext|>"
        "\n<|user|>\nHow many?<|endoftext|>\n<|assistant|>\nTwo.<|endoftext|>")
    trained = tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "Green.<|endoftext|>Two.<|endoftext|>"
    # a stop token typed in a turn is text, in this format too: the ids hold only the format's two
    typed, _ = encode_conversation(tokenizer, [("human", "a<|endoftext|>b"), ("gpt", "ok")], None, prompt="zephyr")
    assert typed.count(tokenizer.token_to_id("<|endoftext|>")) == 2
    # a text-only sample: no slots, the literal placeholder dropped from the text
    text_ids, _ = encode_conversation(tokenizer, [("human", "<image> hi"), ("gpt", "yes")], None, prompt="zephyr")
    assert img not in text_ids
    config = tiny_config()
    config.prompt = "zephyr"
    torch.manual_seed(0)
    model = MLMamba(config, tokenizer).eval()
    model.save_pretrained(tmp_path / "z")
    assert MLMamba.from_pretrained(tmp_path / "z").config.prompt == "zephyr"
    image = random_image(5)
    new = model.generate(image, "What is in the picture?", max_new_tokens=8)
    ids, _ = encode_conversation(model.tokenizer, [("human", "What is in the picture?")], model.image_token_id,
                                 model.num_image_tokens, prompt="zephyr")
    pixels, seq = model.preprocess(image), list(ids)
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model(pixels, torch.tensor([seq]))[0][0, -1, :model.config.lm.vocab_size].argmax())
            if nxt == model.eos_token_id:
                break
            seq.append(nxt)
    assert new == seq[len(ids):] and len(new) > 0
    with pytest.raises(ValueError, match="unknown prompt format"):
        encode_conversation(tokenizer, turns, prompt="chatml")


def test_one_encoder_and_the_release_recipe_build_from_public_checkpoints(cli_model):
    """train.py with --siglip alone (the paper's encoder ablation, Table 5) builds an ML-Mamba on that encoder only;
    --preset release is the authors' one-stage recipe: their connector and prompt, finetune only, batch 128."""
    import train as T
    common = ["--data", "x.json", "--llm", str(cli_model / "lm"), "--tokenizer", str(cli_model / "tokenizer.json"),
              "--image-size", "42", "--device", "cpu"]
    model = T.build_model(T.parse_args(common + ["--siglip", str(cli_model / "siglip")]), None)
    assert list(model.vision.encoders) == ["siglip"] and model.config.connector.vision_dim == 16
    release = T.parse_args(common + ["--dinov2", str(cli_model / "dinov2"), "--preset", "release"])
    assert (release.stage, release.global_batch, release.lr) == ("finetune", 128, 2e-5)
    model = T.build_model(release, None)
    assert list(model.vision.encoders) == ["dinov2"] and model.config.connector.vision_dim == 24
    assert (model.config.connector.kind, model.config.prompt) == ("msc-release", "zephyr")
    with pytest.raises(ValueError, match="--siglip and / or --dinov2"):
        T.build_model(T.parse_args(common), None)


def release_checkpoint(cli_model, tmp_path):
    """A latest-checkpoint.pt in the release's layout for the tiny public checkpoints: {"model": {group: {name:
    tensor}}}, the connector's names and shapes written out here (LM width 32, d_inner 64, 8 heads, state 16, conv
    96 channels, vision 24 + 16), the LM in mamba_ssm's names."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    lm = from_components(cli_model / "lm", {"siglip": cli_model / "siglip"}, cli_model / "tokenizer.json",
                                 input_size=42).lm
    lm.save_pretrained(tmp_path / "lm-ss")
    from weights import read_tensors
    llm = {k: r(*v.shape) for k, v in read_tensors(tmp_path / "lm-ss").items()}
    llm["lm_head.weight"] = llm["backbone.embedding.weight"]  # tied, saved anyway
    mixer = {"in_proj.weight": (168, 32), "conv1d.weight": (96, 1, 4), "conv1d.bias": (96,), "conv1d_b.weight":
             (96, 1, 4), "conv1d_b.bias": (96,), "dt_bias": (8,), "dt_bias_b": (8,), "A_log": (8,), "A_log_b": (8,),
             "D": (8,), "D_b": (8,), "norm.weight": (64,), "out_proj.weight": (32, 64)}
    bi = {"norm_f.weight": r(32) + 1, "norm_f.bias": r(32)}
    for i in range(2):
        bi.update({f"layers.{i}.mixer.{k}": r(*shape) for k, shape in mixer.items()})
        bi.update({f"layers.{i}.norm.weight": r(32) + 1, f"layers.{i}.norm.bias": r(32)})
        bi.update({f"layers.{i}.mlp.{w}.{t}": r(32, 32) if t == "weight" else r(32)
                   for w in ("w1", "w2", "w3") for t in ("weight", "bias")})
    projector = {"projector.0.weight": r(128, 32), "projector.0.bias": r(128), "projector.2.weight": r(32, 128),
                 "projector.2.bias": r(32), "projector.4.weight": r(32, 32), "projector.4.bias": r(32)}
    groups = {"llm_backbone": llm, "mlp": {"0.weight": r(32, 40), "0.bias": r(32)}, "bidirectional_mamba": bi,
              "projector": projector}
    return groups


def test_the_release_checkpoint_converts_into_a_folder_generate_runs(cli_model, tmp_path):
    """python convert_release.py: every tensor lands where the release's forward uses it (checked through the
    connector's output, computed by hand from the release's tensors: its SwiGLU's gate pair is w1, w2); generate.py
    runs the folder; a checkpoint with a tensor missing and one extra names both."""
    groups = release_checkpoint(cli_model, tmp_path)
    torch.save({"model": groups}, tmp_path / "latest-checkpoint.pt")
    args = [str(tmp_path / "latest-checkpoint.pt"), "--llm", str(cli_model / "lm"), "--dinov2",
            str(cli_model / "dinov2"), "--siglip", str(cli_model / "siglip"), "--tokenizer",
            str(cli_model / "tokenizer.json"), "--out", str(tmp_path / "converted")]
    assert convert_release.main(args) == 0
    model = MLMamba.from_pretrained(tmp_path / "converted").eval()
    assert (model.config.connector.kind, model.config.prompt) == ("msc-release", "zephyr")
    llm = groups["llm_backbone"]
    assert torch.equal(model.lm.layers[1].mixer.in_proj.weight, llm["backbone.layers.1.mixer.in_proj.weight"])
    bi, t = groups["bidirectional_mamba"], lambda name: bi[name]
    v = torch.randn(2, 9, 40)
    with torch.no_grad():
        x = F.gelu(v @ groups["mlp"]["0.weight"].T + groups["mlp"]["0.bias"])
        for i, block in enumerate(model.connector.msc.blocks):
            assert torch.equal(block.mixer.conv1d_b.weight, t(f"layers.{i}.mixer.conv1d_b.weight"))
            x = x + block.mixer(x)
            h = F.layer_norm(x, (32,), t(f"layers.{i}.norm.weight"), t(f"layers.{i}.norm.bias"), 1e-5)
            lin = lambda w, z: z @ t(f"layers.{i}.mlp.{w}.weight").T + t(f"layers.{i}.mlp.{w}.bias")  # noqa: E731
            x = x + lin("w3", F.silu(lin("w1", h)) * lin("w2", h))
        x = F.layer_norm(x, (32,), t("norm_f.weight"), t("norm_f.bias"), 1e-5)
        for n, act in (("0", F.gelu), ("2", F.gelu), ("4", lambda z: z)):
            x = act(x @ groups["projector"][f"projector.{n}.weight"].T + groups["projector"][f"projector.{n}.bias"])
        torch.testing.assert_close(model.connector(v), x, rtol=1e-5, atol=1e-5)
    out = run_cli("--model", tmp_path / "converted", "--image", cli_model / "image.png", "--prompt", "What?",
                  "--max-new-tokens", "3", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    del groups["bidirectional_mamba"]["layers.1.mlp.w2.bias"]
    groups["projector"]["projector.6.weight"] = torch.zeros(1)
    torch.save({"model": groups}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"(?s)missing.*bidirectional_mamba.layers.1.mlp.w2.bias.*"
                                              r"unexpected.*projector.projector.6.weight"):
        convert_release.convert_release(tmp_path / "bad.pt", cli_model / "lm", {"dinov2": cli_model / "dinov2",
                                        "siglip": cli_model / "siglip"}, cli_model / "tokenizer.json", tmp_path / "x",
                                        input_size=42)


def test_the_chat_skips_blank_lines_survives_a_bad_turn_and_ends_on_exit(cli_model):
    """--interactive: a blank line is passed over, a turn past the length limit gets its one-line error and the chat
    goes on, "  Quit " ends it (what follows is never asked)."""
    lines = ["How many?", "", "What is in the picture? " * 20, "What color?", "  Quit ", "Never asked"]
    out = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(cli_model / "mlmamba"),
                          "--image", str(cli_model / "image.png"), "--interactive", "--max-new-tokens", "3"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Eval_avg") == 2 and out.stderr.count("the limit is 100") == 1
    assert "Traceback" not in out.stderr and out.stdout.count("you>") == 5  # 4 lines read, then "Quit"
