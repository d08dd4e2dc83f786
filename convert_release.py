"""Convert the authors' release's checkpoint into an ML-Mamba folder that generate.py and evaluate.py run.

    python convert_release.py latest-checkpoint.pt --llm mamba2-2.7b --dinov2 DINOV2 --siglip SIGLIP \\
        --tokenizer gpt-neox-20b --out ml-mamba-release

The release (github WenjunHuang94/ML-Mamba) saves {"model": {group: state dict}} with the groups llm_backbone, mlp (the
lift), bidirectional_mamba and projector; `checkpoints.release_key_map` names where each tensor lands. The frozen
encoders are not in it: they come from the public checkpoints it was trained from.
"""

import argparse
import pickle
import sys
from pathlib import Path

import torch

from checkpoints import release_key_map
from model import from_components
from cli import USER_ERRORS, report_user_error
from weights import CheckpointError, match_tensors


def check_out(out, inputs, overwrite=False):
    """`out` may be written: not one of the inputs nor a folder holding one (their files would be replaced), and, unless
    overwrite, empty or absent. Checked before any conversion; a ValueError names the problem and the way out."""
    out = Path(out).resolve()
    for path in map(Path, inputs):
        path = path.resolve()
        if path == out or out in path.parents:
            raise ValueError(f"--out {out} holds the input {path}: writing there would replace it; "
                             "choose another --out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty; give another folder, or --overwrite to write over its files")


def read_release_tensors(checkpoint):
    """{"group.name": tensor} from the release's {"model": {group: {name: tensor}}}, read with
    torch.load(weights_only=True), so no pickled code runs; every tensor floating-point and finite. Anything else is a
    CheckpointError of one line naming what is wrong."""
    layout = f"the release's checkpoint {checkpoint} ({{'model': {{group: {{name: tensor}}}}}})"
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{checkpoint} holds Python objects other than tensors, which are not read (nothing "
                              "in it was run): it is not the release's checkpoint") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read {layout}: {type(e).__name__}: {e}") from None
    groups = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(groups, dict) or not all(isinstance(s, dict) for s in groups.values()):
        raise CheckpointError(f"{checkpoint} is not {layout}")
    tensors = {}
    for group, state in groups.items():
        if group == "llm_backbone" and all(str(k).startswith("llm.") for k in state):  # the wrapper's prefix
            state = {k.removeprefix("llm."): v for k, v in state.items()}
        tensors.update({f"{group}.{k}": v for k, v in state.items()})
    for name, t in tensors.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise CheckpointError(f"{checkpoint}: {name} is {t.dtype if torch.is_tensor(t) else type(t).__name__}, "
                                  "not a floating-point tensor")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{checkpoint}: {name} holds NaN or infinite values")
    return tensors


def convert_release(checkpoint, lm, vision, tokenizer, out, input_size=384, overwrite=False):
    """The release's latest-checkpoint.pt -> an ML-Mamba folder that generate.py runs. lm, vision, tokenizer: the
    public checkpoints it was trained from ({"dinov2": ..., "siglip": ...}), which give the architecture and the frozen
    encoders; the checkpoint gives the LM, the lift, the Bidirectional_Mamba and the projector. Read with
    torch.load(weights_only=True): no pickled code runs. Missing, unexpected or mis-shaped tensors are all listed.
    `out` is checked first (`check_out`)."""
    check_out(out, [checkpoint, lm, tokenizer, *vision.values()], overwrite)
    model = from_components(lm, vision, tokenizer, connector={"kind": "msc-release"}, prompt="zephyr",
                            input_size=input_size)
    tensors = read_release_tensors(checkpoint)
    tied = model.config.lm.tie_embeddings
    key_map = release_key_map(model.config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k in key_map}
    state = match_tensors(expected, tensors, key_map, ignore={"llm_backbone.lm_head.weight"} if tied else (),
                          source=f"the release's checkpoint {checkpoint}")
    model.load_state_dict(state, strict=False)
    model.lm.tie_weights()
    model.save_pretrained(out)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the release's latest-checkpoint.pt")
    p.add_argument("--llm", required=True, help="the Mamba-2 checkpoint it was trained from (for the config)")
    p.add_argument("--dinov2", help="the DINOv2 checkpoint (frozen, not in the release's file)")
    p.add_argument("--siglip", help="the SigLIP checkpoint (frozen, not in the release's file)")
    p.add_argument("--tokenizer", required=True, help="GPT-NeoX-20B's tokenizer.json or its folder")
    p.add_argument("--out", required=True, help="a new or empty folder")
    p.add_argument("--overwrite", action="store_true", help="write over the files of a --out that is not empty")
    args = p.parse_args(argv)
    vision = {n: path for n, path in (("dinov2", args.dinov2), ("siglip", args.siglip)) if path}
    try:
        convert_release(args.checkpoint, args.llm, vision, args.tokenizer, args.out, overwrite=args.overwrite)
    except USER_ERRORS as e:
        return report_user_error(e)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
