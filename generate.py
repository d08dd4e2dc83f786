"""Talk to an ML-Mamba model about an image.

    python generate.py --model DIR --image cat.jpg --prompt "What is in the picture?"
    python generate.py --model DIR --image cat.jpg --interactive    # multi-turn: each turn reads only its tokens

The answer is printed as it is generated, then the time to load the model, the time from image encoding to the first
and to the last token (the paper's T_total), Eval_avg = new tokens / T_total, and the whole call's wall time.
On CUDA, decoding runs on CUDA graphs with the fused Triton step (fast_decode.py, fused_step.py).
"""

import argparse
import importlib.util
import os
import sys
import threading
import time

T_START = time.perf_counter()

import torch

from cli import nonnegative_float, nonnegative_int, positive_int, probability


def parse_args(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a folder written by MLMamba.save_pretrained / train.py")
    p.add_argument("--image", help="the image file (omit for a text-only prompt)")
    p.add_argument("--prompt", help="the question; omit with --interactive")
    p.add_argument("--interactive", action="store_true", help="keep the image and the conversation, ask in turn")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling: in (0, 1]; 1 = off")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="0 = off")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--eager-decode", action="store_true",
                   help="decode step by step from Python (default on CUDA: each step a CUDA graph)")
    p.add_argument("--kernels", choices=["fused", "compiled", "plain"],
                   help="the decoding step's kernels (default: fused on CUDA with Triton, else plain)")
    p.add_argument("--state", default="fp32", choices=["fp32", "bf16"],
                   help="the SSM state's dtype while decoding (bf16: as mamba-ssm keeps it, half the state's bytes; "
                        "its error: docs/speed.md)")
    p.add_argument("--compile", action="store_true",
                   help="the LM blocks through torch.compile for the prefill (pays in long chats, not for one answer)")
    args = p.parse_args(argv)
    if not args.interactive and not args.prompt:
        p.error("give --prompt, or --interactive")
    try:
        (args.prompt or "").encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 arrive as lone surrogates
        p.error("--prompt is not UTF-8 text")
    return args


def answer(model, image_tokens, prompt, conversation, args, generator, decoder):
    """Generate one reply, streaming it to stdout; returns (new token count, seconds to the first token, seconds to
    the last)."""
    tok = model.tokenizer
    new_ids, printed, first = [], "", []

    def on_token(t):
        nonlocal printed
        if not first:
            first.append(time.perf_counter() - t0)
        if t == model.eos_token_id:
            return
        new_ids.append(t)
        text = tok.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    t0 = time.perf_counter()
    ids = model.generate(None, prompt, image_tokens=image_tokens, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, on_token=on_token,
                         generator=generator, conversation=conversation, decoder=decoder)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(ids), (first or [0.0])[0], time.perf_counter() - t0


def read_turn():
    """The next line typed in the chat, or None at its end (end of input, "exit" or "quit" in any case); blank lines
    are passed over, and a line that is not UTF-8 is refused with one line."""
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            return None
        except UnicodeDecodeError:
            print("error: that line is not UTF-8 text; type it again", file=sys.stderr)
            continue
        if line.lower() in ("exit", "quit"):
            return None
        if line:
            return line


def chat(model, image_tokens, times, args, generator, decoder, conversation):
    """The answer to --prompt; with --interactive, then one for each line typed, each later turn read from the LM's
    state (`conversation`). In the chat, a turn that cannot be asked (too long) gets its one-line error and the chat
    goes on. times: (start-up and load, image encoding) seconds."""
    prompt = args.prompt or (read_turn() if args.interactive else None)
    while prompt is not None:
        first_turn = not conversation.ids
        if args.interactive:
            sys.stdout.write("ml-mamba> ")
        try:
            n_new, to_first, seconds = answer(model, image_tokens, prompt, conversation, args, generator, decoder)
        except ValueError as e:
            if not args.interactive:
                raise
            print(f"\nerror: {e}", file=sys.stderr)
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
            t_image = times[1] if first_turn and image_tokens is not None else None
            print(timing_line(times[0], t_image, to_first, seconds, n_new), file=sys.stderr)
        prompt = read_turn() if args.interactive else None


def timing_line(t_load, t_image, to_first, seconds, n_new):
    """The turn's timings: from image encoding (t_image seconds, the first turn with an image) or from the prompt
    (a text-only prompt, or a later turn, which reads only its own tokens) to the first and the last token."""
    start = "prompt" if t_image is None else "image encoding"
    total = seconds + (t_image or 0.0)
    return (f"[start-up and load {t_load:.2f} s; {start} to first token {to_first + (t_image or 0.0):.3f} s, "
            f"to last token {total:.3f} s, {n_new} new tokens, Eval_avg {n_new / total:.1f} tokens/s; wall "
            f"{time.perf_counter() - T_START:.2f} s]")


def warm_up_in_background(device):
    """A thread that sets up, while the weights load, what the first answer would otherwise wait for: CUDA's
    context, cuBLAS and cuDNN (the patch embedding's conv) with their first kernels, and Triton
    (`fused_step.warm_up`)."""
    def run():
        try:
            x = torch.ones(16, 3, 16, 16, device=device, dtype=torch.bfloat16)
            torch.nn.functional.conv2d(x, x, stride=16).flatten(1) @ x.flatten(1)[:, :16]
            if importlib.util.find_spec("triton") is not None:
                import fused_step
                fused_step.warm_up(device)
            torch.cuda.synchronize(device)
        except Exception:  # a real problem shows again, with its message, where the answer meets it
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def main(argv=None):
    args = parse_args(argv)
    import fast_decode  # imported here so that --help is instant
    import fast_ssd
    from model import Conversation, MLMamba
    from cli import USER_ERRORS, report_user_error

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32}[args.dtype]
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda, but CUDA is not available here: use --device cpu")
        warming = warm_up_in_background(args.device) if args.device.startswith("cuda") else None
        model = MLMamba.from_pretrained(args.model, dtype=dtype, device=args.device).eval()
        if warming is not None:
            warming.join()
        t_load = time.perf_counter() - T_START
        if model.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json")
        if args.device.startswith("cuda"):  # the SSD arranged for a GPU in plain PyTorch: nothing to tune or compile
            fast_ssd.use_ssd(model, "torch-fast")  # before the first token, where mamba-ssm's kernel autotunes
        # one conversation, so one prefill from an empty cache: eager, where a capture would cost more than it saves
        decoder = fast_decode.decoder_for(model.lm, args.kernels, cuda_graph=not args.eager_decode,
                                          state_dtype=fast_decode.STATE_DTYPES[args.state],
                                          prefill_graphs=False)  # None: the eager loop
        if args.compile:
            fast_decode.compile_blocks(model.lm)
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        t0 = time.perf_counter()
        image_tokens = model.encode_image(args.image) if args.image else None  # once, for every turn
        t_image = time.perf_counter() - t0
        chat(model, image_tokens, (t_load, t_image), args, generator, decoder, Conversation())
    except USER_ERRORS as e:
        return report_user_error(e)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the OS frees the model's memory and the CUDA context at once, skipping Python's teardown
