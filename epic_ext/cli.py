"""What the command lines of epic_ext share: the user-error exception, the help formatter, the checks of paths
and model configs that run before anything heavy starts, and the skipped-sample policy of train and eval."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# A Hugging Face Hub id ("org/name"): anything else that is not a local directory is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UsageError(ValueError):
    """A mistake in the command line or its inputs: the CLI prints the message as one line and exits non-zero."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default (but not an absent one, None, or one the help text states itself);
    descriptions keep their paragraphs."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        return "\n\n".join(argparse.HelpFormatter._fill_text(self, part, width, indent)
                           for part in text.split("\n\n"))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def configure_logging() -> None:
    """Logging of a training CLI: INFO on rank 0, WARNING on the other ranks, DeepSpeed's and torch's chatter at
    WARNING."""
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Runs a CLI's main; a UsageError becomes `error: <message>` on stderr (one line) and exit status 2."""
    try:
        return main(argv)
    except UsageError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def require_file(path: str | None, option: str) -> str:
    """The path, if it names a readable file; otherwise a UsageError naming the option."""
    if not path:
        raise UsageError(f"{option} is required")
    if os.path.isdir(path):
        raise UsageError(f"{option}: {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise UsageError(f"{option}: {path} does not exist")
    return path


def load_records_option(path: str | None, option: str) -> list[dict]:
    """The records of a LLaVA-format file given as `option`; a missing file, malformed JSON or a malformed record
    is a UsageError naming the option (and the line, for JSON errors)."""
    from .data.records import load_records  # noqa: PLC0415

    require_file(path, option)
    try:
        records = load_records(path)
    except (ValueError, UnicodeDecodeError) as error:
        raise UsageError(f"{option}: {error}") from error
    if not records:
        raise UsageError(f"{option}: {path} holds no records")
    return records


def load_model_config(path: str | None, option: str = "--model", families: Mapping[str, Any] | None = None):
    """The transformers config of a llava-hf checkpoint (config.json only: no weights are read).

    Args:
        path: a local checkpoint directory, or a Hub id ("org/name").
        option: the command-line option named in errors.
        families: model_type -> epic_ext.models.families.Family accepted (None: LLaVA-1.5 only).

    Returns:
        The model's config (LlavaConfig: num_hidden_layers and image_seq_length resolved, defaults included).

    Raises:
        UsageError: a missing directory, a directory without config.json, an unreadable config, or a model
            that is not LlavaForConditionalGeneration.
    """
    if not path:
        raise UsageError(f"{option} is required")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"{option}: {path} has no config.json (expected a llava-hf checkpoint directory)")
    elif os.path.exists(path):
        raise UsageError(f"{option}: {path} is a file; give the checkpoint directory")
    elif not _HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise UsageError(f"{option}: {path} does not exist (expected a llava-hf checkpoint directory)")
    from transformers import AutoConfig  # noqa: PLC0415

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{option}: cannot read the config of {path}: {first}") from error
    if families is None:
        if getattr(config, "model_type", None) != "llava":
            raise UsageError(f"{option}: {path} is a {getattr(config, 'model_type', None)!r} model; this command "
                             "supports LLaVA (LlavaForConditionalGeneration, model_type 'llava')")
        return config
    from .models.families import family_of  # noqa: PLC0415

    try:
        family_of(config, families)
    except ValueError as error:
        raise UsageError(f"{option}: {path}: {error}") from None
    return config


def add_attn_implementation_argument(parser: argparse.ArgumentParser, where: str = "") -> None:
    """--attn-implementation eager|sdpa|flash_attention_2 (default sdpa): the language model's attention; `where`
    ends the help's first clause (e.g. " (--measure)")."""
    from .models.families import ATTN_IMPLEMENTATIONS, DEFAULT_ATTN_IMPLEMENTATION  # noqa: PLC0415

    parser.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default=DEFAULT_ATTN_IMPLEMENTATION,
                        help=f"the language model's attention{where}; the vision tower keeps sdpa; "
                             "flash_attention_2 needs the flash-attn package and a CUDA device")


def check_attn_implementation_option(name: str, device: str | None = None, dtype=None, *,
                                     dtype_hint: str = "--dtype bf16 or fp16",
                                     option: str = "--attn-implementation") -> str:
    """`name` if it can run here (epic_ext.models.families.check_attn_implementation: flash-attn importable, the
    device, the dtype), else a UsageError naming the option (and `dtype_hint` for a dtype it cannot run in); runs
    before any model loads."""
    from .models.families import check_attn_implementation  # noqa: PLC0415

    try:
        return check_attn_implementation(name, device, dtype)
    except ValueError as error:
        message = str(error)
        message = (option + message[len("attn_implementation"):] if message.startswith("attn_implementation")
                   else f"{option}: {message}")
        if "float16 or bfloat16 only" in message:
            message += f": give {dtype_hint}"
        raise UsageError(message) from None


def describe_skips(skipped: Mapping[str, int]) -> str:
    """`missing_image: 31, bad_record: 1`, most frequent reason first."""
    return ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
                     if count)


def check_skipped(skipped: Mapping[str, int], total: int, max_fraction: float, *, image_folder: str | None = None,
                  what: str = "samples") -> None:
    """Raises UsageError when more than `max_fraction` of `total` samples were skipped (--max-skip-fraction).

    Args:
        skipped: reason -> number of samples skipped for it.
        total: samples looked at (skipped ones included).
        max_fraction: the largest tolerated fraction, in [0, 1].
        image_folder: named in the message when missing images are among the reasons.
        what: what the samples are ("training samples", "evaluation items").
    """
    count = sum(skipped.values())
    if total <= 0 or count <= max_fraction * total:
        return
    hint = ""
    if skipped.get("missing_image") and image_folder is not None:
        exists = "" if os.path.isdir(image_folder) else ", which does not exist"
        hint = f"; check --image-folder ({image_folder}{exists})"
    raise UsageError(f"{count} of {total} {what} skipped ({describe_skips(skipped)}), more than "
                     f"--max-skip-fraction {max_fraction:g}{hint}")
