"""The command lines' plumbing: argparse types that refuse bad values before any work starts, a parser built from a
config dataclass (each option declared once, as a field), and how a command ends on a user's mistake.
"""

import argparse
import math
import sys
from dataclasses import field, fields

from weights import CheckpointError


def option(default, help=None, group=None, **argparse_kwargs):
    """A config field that is also a command-line option: --name-with-dashes, with this help and the argparse
    arguments given (type, choices, action); group: the --help section it is listed in."""
    return field(default=default, metadata=dict(help=help, group=group, **argparse_kwargs))


def parser_for(config_class, preset_names=(), **parser_kwargs):
    """An ArgumentParser with one --option per field of config_class (declared with `option`). An option not given
    is left out of the parsed namespace (its preset's or the field's default applies). A field a preset sets shows
    "default: per preset" in --help (preset_names: the fields any preset sets), any other its default."""
    p = argparse.ArgumentParser(allow_abbrev=False, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter, **parser_kwargs)
    groups = {None: p}
    for f in fields(config_class):
        kwargs = {k: v for k, v in f.metadata.items() if k not in ("group", "help")}
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        groups[group].add_argument("--" + f.name.replace("_", "-"), help=help_text(f, f.name in preset_names),
                                   **kwargs)
    return p


def help_text(f, by_preset):
    """A field's help, with its default where the help does not state it (a preset's, where a preset sets it)."""
    text = f.metadata["help"] or ""
    if "default" in text or (not by_preset and (f.default is None or f.type is bool)):
        return text or None
    return f"{text}{'; ' if text else ''}default: {'per preset' if by_preset else f.default}"


def _number(kind, test, wanted):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# argparse types: a bad value ends in argparse's one-line usage error (exit code 2) before any work starts
positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _number(float, lambda v: v >= 0 and math.isfinite(v), "a non-negative number")
probability = _number(float, lambda v: 0 < v <= 1, "a probability in (0, 1]")
fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


# A missing or malformed file, checkpoint, image or setting (images.ImageError is a ValueError): one line, exit code
# 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CheckpointError, FileNotFoundError, ValueError)


def report_user_error(e):
    """Print e as one line on stderr; returns the exit code 2."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2
