"""The producer's bad-input matrix, shared by the Python API tests and the CLI tests.

Each case builds ``Client.submit`` keyword arguments (files are written under
the test's tmp_path) and names the field the error must blame. :func:`cli_args`
turns the same keywords into ``genimg submit`` options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BadInput:
    id: str
    build: Callable[[Path, str], dict[str, Any]]
    """``(tmp_path, output) -> submit kwargs``; ``output`` is a valid s3:// URL of the test bucket."""
    field: str


def _file(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _ok_prompts(tmp: Path) -> Path:
    return _file(tmp, "ok.txt", b"a handwritten 7\nthe digit three\n")


BAD_INPUTS: list[BadInput] = [
    BadInput("count_zero", lambda t, o: {"count": 0, "output": o}, "count"),
    BadInput("count_negative", lambda t, o: {"count": -3, "output": o}, "count"),
    BadInput("count_huge", lambda t, o: {"count": 10**12, "output": o}, "count"),
    BadInput("seed_negative", lambda t, o: {"count": 5, "seed": -1, "output": o}, "seed"),
    BadInput("seed_above_2_63", lambda t, o: {"count": 5, "seed": 2**63, "output": o}, "seed"),
    BadInput("dedup_unknown", lambda t, o: {"count": 5, "dedup": "fuzzy", "output": o}, "dedup"),
    BadInput("prompt_file_empty", lambda t, o: {"prompts": _file(t, "empty.txt", b""), "output": o}, "prompts"),
    BadInput("prompt_file_whitespace_only",
             lambda t, o: {"prompts": _file(t, "blank.txt", b"  \n\t\n \r\n\n"), "output": o}, "prompts"),
    BadInput("prompt_of_one_megabyte",
             lambda t, o: {"prompts": _file(t, "big.txt", b"ok\n" + b"x" * 1_000_000 + b"\n"), "output": o},
             "prompts"),
    BadInput("prompt_file_invalid_utf8",
             lambda t, o: {"prompts": _file(t, "bad.txt", b"fine\n\xff\xfe broken\n"), "output": o}, "prompts"),
    BadInput("prompt_with_control_character", lambda t, o: {"prompts": ["ok", "bell\x07"], "output": o}, "prompts"),
    BadInput("prompt_over_2000_characters", lambda t, o: {"prompts": ["x" * 2001], "output": o}, "prompts"),
    BadInput("prompt_file_missing", lambda t, o: {"prompts": t / "nope.txt", "output": o}, "prompts"),
    BadInput("csv_without_the_prompt_column",
             lambda t, o: {"prompts": _file(t, "p.csv", b"text\nhello\n"), "output": o}, "prompts"),
    BadInput("prompts_and_count_together", lambda t, o: {"prompts": ["a"], "count": 5, "output": o}, "prompts"),
    BadInput("neither_prompts_nor_count", lambda t, o: {"output": o}, "prompts"),
    BadInput("unknown_model", lambda t, o: {"count": 5, "model": "dalle", "output": o}, "model"),
    BadInput("unknown_image_format", lambda t, o: {"count": 5, "image_format": "gif", "output": o}, "image_format"),
    BadInput("unknown_prompt_format",
             lambda t, o: {"prompts": _ok_prompts(t), "prompt_format": "xml", "output": o}, "prompt_format"),
    BadInput("unknown_prompt_file_suffix",
             lambda t, o: {"prompts": _file(t, "p.doc", b"a\n"), "output": o}, "prompt_format"),
    BadInput("output_with_dotdot", lambda t, o: {"count": 5, "output": f"{o}/a/../b"}, "output"),
    BadInput("output_http_scheme", lambda t, o: {"count": 5, "output": "http://example.com/out"}, "output"),
    BadInput("output_ftp_scheme", lambda t, o: {"count": 5, "output": "ftp://example.com/out"}, "output"),
    BadInput("output_relative_path", lambda t, o: {"count": 5, "output": "out/run-1"}, "output"),
    BadInput("output_local_path_outside_allowed_root",
             lambda t, o: {"count": 5, "output": "file:///etc/genimg-out"}, "output"),
    BadInput("output_bucket_that_does_not_exist",
             lambda t, o: {"count": 5, "output": "s3://genimg-no-such-bucket-0000/x"}, "output"),
    BadInput("shard_size_zero", lambda t, o: {"count": 5, "shard_size": 0, "output": o}, "shard_size"),
    BadInput("shard_size_above_limit", lambda t, o: {"count": 5, "shard_size": 10_001, "output": o}, "shard_size"),
    BadInput("images_per_prompt_above_64",
             lambda t, o: {"prompts": ["a"], "images_per_prompt": 65, "output": o}, "images_per_prompt"),
    BadInput("images_per_prompt_for_noise2img",
             lambda t, o: {"count": 5, "images_per_prompt": 2, "output": o}, "images_per_prompt"),
    BadInput("quality_above_100", lambda t, o: {"count": 5, "quality": 101, "output": o}, "quality"),
    BadInput("priority_unknown_name", lambda t, o: {"count": 5, "priority": "urgent", "output": o}, "priority"),
    BadInput("priority_above_9", lambda t, o: {"count": 5, "priority": 10, "output": o}, "priority"),
    BadInput("name_with_spaces", lambda t, o: {"count": 5, "name": "my job", "output": o}, "name"),
    BadInput("idempotency_key_with_spaces",
             lambda t, o: {"count": 5, "idempotency_key": "a b", "output": o}, "idempotency_key"),
]


def cli_args(kwargs: dict[str, Any]) -> list[str]:
    """``genimg submit`` options equivalent to ``Client.submit(**kwargs)``."""
    args: list[str] = []
    for key, value in kwargs.items():
        if key == "prompts":
            if isinstance(value, (str, Path)):
                args += ["--prompts", str(value)]
            else:
                for p in value:
                    args += ["--prompt", p]
        elif isinstance(value, bool):
            args.append(f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}")
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args
