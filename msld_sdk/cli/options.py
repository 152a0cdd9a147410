"""What every ``msld`` command shares: the help formatter (each option's default shown), number
types that refuse nonsense at parse time, ``--overwrite``, and the top-level error handling
(one line per error, exit 2 for usage errors and 1 for failures, ``-v`` adds the traceback).
The torch-side commands (``msld export``, ``msld import``) use the same pieces."""
from __future__ import annotations

import argparse
import sys
import traceback

from ..errors import MissingExtraError, MsldError, UsageError


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default unless its help already says it; ``display`` on an action
    replaces its metavar in usage and help (e.g. ``X Y [Z]``)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return h
        if isinstance(action, argparse._StoreTrueAction):
            return h + " (default: off)"
        return h + " (default: %(default)s)"

    def _format_args(self, action, default_metavar):
        return getattr(action, "display", None) or super()._format_args(action, default_metavar)


def _number(kind, low, what):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
        return v
    parse.__name__ = what
    return parse


positive_int = _number(int, 1, "a positive integer")
non_negative_int = _number(int, 0, "a non-negative integer")


def seed_int(text: str) -> int:
    """A seed: an integer from 0 to 2**64-1 (``msld_sdk.sampling.MAX_SEED``)."""
    from ..sampling import MAX_SEED
    v = non_negative_int(text)
    if v > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most 2**64-1, not {text}")
    return v


def timestep_list(text: str) -> list[int]:
    """``999,561,249,61``: a dpmpp2m timestep grid, noisiest first (checked against the plan later)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integer timesteps, "
                                         "noisiest first (e.g. 999,561,249,61)")
    return [int(p) for p in parts]


def unit_float(text: str) -> float:
    """A number in [0, 1) (a threshold: the range ``run`` accepts)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be from 0 to below 1, not {text}")
    return v


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that msld did not write (an output msld wrote is replaced "
                        "whole without it; an input is never replaced; docs/outputs.md)")


def run_command(prog: str, fn, argv: list, verbose: bool | None = None) -> int:
    """Run ``fn()`` and turn whatever it raises into one line on stderr and an exit code: 2 for
    usage errors (``UsageError``, ``MissingExtraError``, argparse), 1 for every other failure,
    130 when interrupted. With ``verbose`` (default: ``-v``/``--verbose`` in ``argv``) the
    traceback is printed too."""
    if verbose is None:
        verbose = "-v" in argv or "--verbose" in argv
    try:
        return fn()
    except SystemExit as e:          # argparse (usage line already printed) or an explicit exit
        if isinstance(e.code, str):
            print(f"{prog}: error: {e.code}", file=sys.stderr)
            return 2
        return 0 if e.code is None else int(e.code)
    except KeyboardInterrupt:
        _trace(verbose)
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, MissingExtraError) as e:
        _trace(verbose)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except MsldError as e:
        _trace(verbose)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        _trace(verbose)
        print(f"{prog}: error: out of memory; try a smaller -k, fewer inputs at once, or a smaller image",
              file=sys.stderr)
        return 1
    except OSError as e:
        _trace(verbose)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"{prog}: error: {e.strerror or e}{where}; check the path and its permissions", file=sys.stderr)
        return 1
    except Exception as e:           # a bug: still one line, the traceback with -v
        _trace(verbose)
        print(f"{prog}: error: {type(e).__name__}: {e} (an unexpected failure; run again with -v for the "
              "traceback and report it)", file=sys.stderr)
        return 1


def _trace(verbose: bool) -> None:
    if verbose:
        traceback.print_exc(file=sys.stderr)
