"""What the subcommands share: a one-line-error parser, int checks, the common flags."""

from __future__ import annotations

import argparse
import math
import re

from infermeter.specs.presets import DEFAULT_MODEL


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not usage text plus an error."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # A value such as "-5GiB" or "-1%" is a bad value, not a flag: argparse's own pattern
        # takes plain negative numbers only, and said "expected one argument" for these.
        self._negative_number_matcher = re.compile(r"^-\d")

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def seed_arg(text: str) -> int:
    """A seed torch's generators take: 0 to 2^63 - 1 (a larger one overflowed in torch)."""
    value = _integer(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} must be from 0 to 2^63 - 1")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def temperature_arg(text: str) -> float:
    """--temperature: 0 decodes greedily, as without the flag; below 0 means nothing."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0 (0: greedy decoding)")
    return value


def top_p_arg(text: str) -> float:
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print each Result as one JSON line instead of a table")
    parser.add_argument("--output", metavar="PATH",
                        help="append the Results to this JSONL file (written atomically)")


def add_cache_flags(parser: argparse.ArgumentParser) -> None:
    """The cache a command sizes or moves: model, batch sizes, sequence lengths, KV dtype."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="preset name or path to config.json / params.json / a checkpoint "
                        f"folder (default {DEFAULT_MODEL})")
    parser.add_argument("--batch-size", type=positive_int, nargs="+", default=[1],
                        help="sequences per batch; several make a sweep (default 1)")
    parser.add_argument("--seq-len", type=positive_int, nargs="+", default=[512],
                        help="KV-cache tokens per sequence; several make a sweep (default 512)")
    parser.add_argument("--kv-dtype", help="KV dtype: fp32, fp16, bf16, fp8, int8 (default: "
                        "the model's dtype)")


def add_model_flags(parser: argparse.ArgumentParser, *aliases: str) -> None:
    """The model a command loads into the engine: --checkpoint (and its aliases) or --model."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", *aliases, dest="checkpoint", metavar="PATH",
                        help="Meta (params.json + consolidated.NN.pth) or HF (config.json + "
                        "*.safetensors) checkpoint folder, or a GGUF file")
    source.add_argument("--model", help="preset name or config path: random weights, seeded")


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    """Where the engine runs and in which dtypes (engine/dtypes.run_dtypes takes them)."""
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", help="weights and activations: fp32, fp16 or bf16 (default: "
                        "bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--kv-dtype", metavar="DTYPE", help="KV-cache dtype (default: --dtype)")
