"""Score a checkpoint on a LLaVA-style question file.

    python evaluate.py --model runs/synthetic/final --questions data/synthetic/test.json
    python evaluate.py --model DIR --questions pope.jsonl --image-root coco/val2014 --metric pope
    python evaluate.py --model DIR --questions vqav2.json --image-root coco/val2014 --metric vqa

Metrics:
- family accuracy: exact match after normalization, per "family" field (the synthetic world's four families);
- POPE: accuracy, precision, recall, F1 and the yes-ratio, "yes" as the positive class (answers are read as yes/no
  by their first word, as the POPE scripts do);
- VQA-v2 soft accuracy: min(#humans who gave the answer / 3, 1), averaged over the 10 choose 9 subsets of the ten
  human answers, after the standard normalization (lower case, punctuation, articles, number words, contractions).

Question files: a JSON list (LLaVA conversations, or {"question"/"text", "answer"/"label"/"answers", "image"}),
or JSON lines (POPE's {"question_id", "image", "text", "label"}).
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

from cli import positive_int
from weights import inside, listing

# ----------------------------------------------------------------------------------------------------------------
# Answer normalization (the VQA evaluation's rules)
# ----------------------------------------------------------------------------------------------------------------

_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "im": "i'm", "ive": "i've", "its": "it's", "thats": "that's", "whats": "what's",
                 "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't", "havent": "haven't", "didnt": "didn't",
                 "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't", "youre": "you're",
                 "theyre": "they're", "theres": "there's", "hes": "he's", "shes": "she's", "lets": "let's"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = r";/[]\"{}()=+\_-><@`,?!*#%^&$|~:"


def normalize_answer(text):
    """VQA-style: lower case, punctuation removed (a period only where it is not a decimal point), number words
    to digits, articles dropped, contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCT:  # separators become spaces, other marks vanish
        text = text.replace(p, " " if p in ",;/" else "")
    text = re.sub(r"(?<!\d)\.(?!\d)", "", text)  # periods that are not decimal points
    words = []
    for w in text.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_soft_accuracy(prediction, human_answers):
    """VQA-v2: for each of the 10 leave-one-out subsets of 9 human answers, min(matches / 3, 1); the mean."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in human_answers]
    if len(gts) < 2:
        return float(gts == [pred])
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        scores.append(min(sum(g == pred for g in others) / 3.0, 1.0))
    return sum(scores) / len(scores)


def yes_no(text):
    """POPE's reading of an answer: "yes" if it starts with yes, else "no"."""
    words = normalize_answer(text).split()
    return "yes" if words and words[0] == "yes" else "no"


def pope_metrics(predictions, labels):
    """Accuracy, precision, recall, F1 and the ratio of "yes" answers; "yes" is the positive class."""
    preds = [yes_no(p) for p in predictions]
    gold = [yes_no(l) for l in labels]
    tp = sum(p == g == "yes" for p, g in zip(preds, gold))
    tn = sum(p == g == "no" for p, g in zip(preds, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, gold))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(preds), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": preds.count("yes") / len(preds), "n": len(preds)}


def family_accuracy(predictions, answers, families):
    """Exact match after normalization, per family and overall."""
    per = defaultdict(list)
    for p, a, f in zip(predictions, answers, families):
        per[f].append(normalize_answer(p) == normalize_answer(a))
    out = {f: sum(v) / len(v) for f, v in sorted(per.items())}
    out["overall"] = sum(sum(v) for v in per.values()) / max(1, sum(len(v) for v in per.values()))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Question files and answering
# ----------------------------------------------------------------------------------------------------------------

RECORD_FIELDS = {"question", "text", "conversations"}  # what makes a JSON object one question's record


def read_records(path):
    """The records of a JSON list (or an object holding one under "questions" / "data") or of JSON lines."""
    text = path.read_text()
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        records = []
        for n, line in enumerate(text.splitlines(), 1):  # JSON lines (POPE)
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not valid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(records, dict) and RECORD_FIELDS & set(records):  # one record: a one-line JSON lines file
        records = [records]
    elif isinstance(records, dict):  # {"questions": [...]}, {"data": [...]}, or {id: record}
        key = next((k for k in ("questions", "data") if k in records), None)
        records = records[key] if key else list(records.values())
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} holds no questions (expected a JSON list of records, or JSON lines)")
    return records


def parse_record(r):
    """{"question", "answer", "image", "family"} from one record; a ValueError says what is wrong with it."""
    if not isinstance(r, dict):
        raise ValueError(f"a record must be a JSON object, not {type(r).__name__}")
    if "conversations" in r:
        turns = r["conversations"]
        if not (isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2])):
            raise ValueError('"conversations" must hold a question turn and an answer turn')
        q, a = turns[0].get("value"), turns[1].get("value")
        q = q.replace("<image>", "").strip() if isinstance(q, str) else q
    else:
        q = r.get("question", r.get("text"))
        a = r.get("answers", r.get("answer", r.get("label")))
        if isinstance(a, list) and a and all(isinstance(x, dict) for x in a):  # VQA-v2: [{"answer": ...}, ...]
            a = [x.get("answer") for x in a]
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"no question text (found {q!r})")
    if not (isinstance(a, str) or (isinstance(a, list) and a and all(isinstance(x, str) for x in a))):
        raise ValueError(f"the answer must be text or a list of texts, not {a!r}")
    image = r.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ValueError(f'"image" must be a file name, not {image!r}')
    return {"question": q, "answer": a, "image": image, "family": str(r.get("family", "all")),
            "id": r.get("question_id", r.get("id"))}


def load_questions(path, shown=5):
    """[{"question", "answer" (str or list of human answers), "image" or None, "family"}] from a question file,
    checked whole before any question is asked: malformed records are listed (the first few) in one error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"question file not found: {path}")
    out, problems, seen = [], [], {}
    for i, r in enumerate(read_records(path)):
        try:
            q = parse_record(r)
        except ValueError as e:
            problems.append(f"record {i}: {e}")
            continue
        if q["id"] is not None and seen.setdefault(repr(q["id"]), i) != i:
            problems.append(f"record {i}: id {q['id']!r} repeats record {seen[repr(q['id'])]}'s")
        out.append(q)
    if problems:
        raise ValueError(f"{path}: {len(problems)} malformed record(s): {listing(problems, shown, sep='; ')}")
    return out


def answer_questions(model, questions, image_root, max_new_tokens=10, progress=True, batch_size=32,
                     answer_batch=None):
    """Greedy answers, `batch_size` questions at a time: answer_batch(images, prompts, max_new_tokens) -> token id
    lists (default: `fast_decode.generate_batch` with the model, the answers one at a time would give). A question
    whose image cannot be read is set aside with a warning: its answer is None."""
    from fast_decode import generate_batch
    from images import ImageError, load_image
    answer_batch = answer_batch or partial(generate_batch, model)
    answers = [None] * len(questions)
    for start in range(0, len(questions), batch_size):
        asked, images = [], []  # the batch's questions with a readable image (or none), and their images
        for i in range(start, min(start + batch_size, len(questions))):
            q = questions[i]
            try:
                if q["image"] and inside(image_root, q["image"]) is None:
                    raise ImageError(f"image {q['image']!r} is outside the image root {image_root}")
                images.append(load_image(Path(image_root) / q["image"]) if q["image"] else None)
                asked.append(i)
            except ImageError as e:
                print(f"warning: question {i} set aside: {e}", file=sys.stderr, flush=True)
        if asked:
            ids = answer_batch(images, [questions[i]["question"] for i in asked], max_new_tokens)
            for i, reply in zip(asked, ids):
                answers[i] = model.tokenizer.decode(reply).strip()
        done = min(start + batch_size, len(questions))
        if progress and (done // 200 > start // 200 or done == len(questions)):
            print(f"  answered {done}/{len(questions)}", flush=True)
    return answers


def evaluate(model, question_file, image_root=None, metric="family", max_new_tokens=10, answer_batch=None):
    """Score `model` on a question file with a metric (see the module docstring); answer_batch: as in
    answer_questions."""
    import torch
    questions = load_questions(question_file)
    if metric in ("family", "pope") and any(isinstance(q["answer"], list) for q in questions):
        raise ValueError(f"{question_file}: the {metric} metric needs one answer per question; lists of human answers "
                         "go with --metric vqa")
    if metric == "pope":
        labels = [f"record {i}: {q['answer']!r}" for i, q in enumerate(questions)
                  if normalize_answer(q["answer"]) not in ("yes", "no")]
        if labels:
            raise ValueError(f"{question_file}: POPE labels are yes or no; {len(labels)} are not: {listing(labels, 5)}")
    root = image_root or Path(question_file).parent
    model.eval()
    with torch.no_grad():
        preds = answer_questions(model, questions, root, max_new_tokens, answer_batch=answer_batch)
    asked = [(p, q) for p, q in zip(preds, questions) if p is not None]  # unreadable images are set aside
    set_aside = len(questions) - len(asked)
    if not asked:
        raise ValueError(f"{question_file}: none of the {len(questions)} questions could be asked (every image was "
                         "unreadable; see the warnings)")
    preds, questions = [p for p, _ in asked], [q for _, q in asked]
    if metric == "pope":
        result = pope_metrics(preds, [q["answer"] for q in questions])
    elif metric == "vqa":
        scores = [vqa_soft_accuracy(p, q["answer"] if isinstance(q["answer"], list) else [q["answer"]])
                  for p, q in zip(preds, questions)]
        result = {"vqa_accuracy": sum(scores) / len(scores), "n": len(scores)}
    else:
        result = family_accuracy(preds, [q["answer"] for q in questions], [q["family"] for q in questions])
    return {**result, "set_aside": set_aside}


def score_run(run_dir, question_file, log=print):
    """train.py's last step: the model in run_dir/final scored per family on the CPU, the scores written to
    run_dir/eval.json and logged in one line."""
    from model import MLMamba
    result = evaluate(MLMamba.from_pretrained(Path(run_dir) / "final"), question_file)
    (Path(run_dir) / "eval.json").write_text(json.dumps(result, indent=2))
    set_aside = result.pop("set_aside")
    log("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in result.items())
        + (f" ({set_aside} questions set aside: unreadable images)" if set_aside else ""))


def speed_up(model, device, compiled=True):
    """On CUDA: the prefill's SSD arranged for the GPU (mamba-ssm's kernel where installed) and, if `compiled`, the
    LM blocks through torch.compile, which fuses each block's elementwise work in the batched prefills. Elsewhere the
    model as it is."""
    if device.startswith("cuda"):
        import fast_decode
        import fast_ssd
        fast_ssd.use_ssd(model)
        if compiled:
            fast_decode.compile_blocks(model.lm)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--questions", required=True)
    p.add_argument("--image-root", default=None, help="default: the question file's folder")
    p.add_argument("--metric", default="family", choices=["family", "pope", "vqa"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=positive_int, default=10)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="on CUDA, the LM blocks eager in the prefills (default: compiled, fast_decode.compile_blocks)")
    args = p.parse_args(argv)
    from model import MLMamba
    from cli import USER_ERRORS, report_user_error
    try:
        model = speed_up(MLMamba.from_pretrained(args.model, device=args.device), args.device, args.compile)
        result = evaluate(model, args.questions, args.image_root, args.metric, args.max_new_tokens)
    except USER_ERRORS as e:
        return report_user_error(e)
    for k, v in result.items():
        print(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
