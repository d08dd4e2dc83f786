"""Convert the authors' release's checkpoint into an ML-Mamba folder that generate.py and evaluate.py run.

    python convert_release.py latest-checkpoint.pt --llm mamba2-2.7b --dinov2 DINOV2 --siglip SIGLIP \\
        --tokenizer gpt-neox-20b --out ml-mamba-release

The release (github WenjunHuang94/ML-Mamba) saves {"model": {group: state dict}} with the groups llm_backbone, mlp (the
lift), bidirectional_mamba and projector; `checkpoints.release_key_map` names where each tensor lands. The frozen
encoders are not in it: they come from the public checkpoints it was trained from.
"""

import argparse
import sys

import torch

from checkpoints import release_key_map
from model import MLMamba
from weights import USER_ERRORS, CheckpointError, match_tensors, report_user_error


def convert_release(checkpoint, lm, vision, tokenizer, out, input_size=384):
    """The release's latest-checkpoint.pt -> an ML-Mamba folder that generate.py runs. lm, vision, tokenizer: the
    public checkpoints it was trained from ({"dinov2": ..., "siglip": ...}), which give the architecture and the frozen
    encoders; the checkpoint gives the LM, the lift, the Bidirectional_Mamba and the projector. Read with
    torch.load(weights_only=True): no pickled code runs. Missing, unexpected or mis-shaped tensors are all listed."""
    model = MLMamba.from_components(lm, vision, tokenizer, connector={"kind": "msc-release"}, prompt="zephyr",
                                    input_size=input_size)
    try:
        groups = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    except (OSError, RuntimeError, KeyError, TypeError, EOFError) as e:
        raise CheckpointError(f"cannot read {checkpoint} as the release's checkpoint ({{'model': {{...}}}}): "
                              f"{type(e).__name__}: {e}") from None
    tensors = {}
    for group, state in groups.items():
        if group == "llm_backbone" and all(k.startswith("llm.") for k in state):  # the backbone wrapper's prefix
            state = {k.removeprefix("llm."): v for k, v in state.items()}
        tensors.update({f"{group}.{k}": v for k, v in state.items()})
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
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    vision = {n: path for n, path in (("dinov2", args.dinov2), ("siglip", args.siglip)) if path}
    try:
        convert_release(args.checkpoint, args.llm, vision, args.tokenizer, args.out)
    except USER_ERRORS as e:
        return report_user_error(e)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
