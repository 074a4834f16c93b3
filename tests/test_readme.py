"""Every command in README.md runs, shrunk to tiny settings, on the output of ``medaug demo`` (run once per
session by ``tests/cli/test_demo.py``), in the working folder that stands for a new user's repository root
(``out/demo`` there is the demo's folder). So the README cannot go stale.

Each shell block of the README (```bash) must follow a marker ``<!-- readme-test: run[; OLD => NEW]... -->``.
The replacements shrink its commands for the test (fewer steps and samples, 2 CPU processes instead of 8
GPUs); ``{port}`` in a replacement becomes a free TCP port and ``{demo_args}`` the test demo's options. In a
block, each line (joined with its ``\\`` continuations, comments dropped) is split at ``&&``: ``medaug ...``
and ``torchrun ...`` parts run in order and must exit 0 and leave their ``--out`` / ``--montage`` paths;
setup parts (virtualenv, pip, ``bash .ci/run``) are checked against ``.ci/run`` and ``pyproject.toml``,
not run; anything else fails the test, so no command can slip past it.
"""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.test_demo import DEMO_ARGS, demo_run_once
from tests.train.torchrun import run_torchrun

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_SCRIPT = REPO / ".ci" / "run"
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
OUTPUT_OPTIONS = ("--out", "-o", "--montage")
SETUP_PREFIXES = ("python3 -m venv ", ". .venv/bin/activate", "pip install ", "bash .ci/run")


@dataclass(frozen=True)
class Block:
    """A shell block of the README: its first line number, its text and its marker's replacements."""

    line: int
    text: str
    replacements: tuple[tuple[str, str], ...]


class ReadmeFormatError(ValueError):
    """A shell block without its marker, a marker without its block, or a malformed marker."""


def parse_marker(text: str, line: int) -> tuple[tuple[str, str], ...]:
    """``run; OLD => NEW; ...`` → ((OLD, NEW), ...); anything else raises naming the line."""
    action, *pairs = [part.strip() for part in text.split(";")]
    if action != "run":
        raise ReadmeFormatError(f"README.md:{line}: marker action {action!r}; expected 'run'")
    replacements = []
    for pair in filter(None, pairs):
        old, separator, new = pair.partition("=>")
        if not separator or not old.strip():
            raise ReadmeFormatError(f"README.md:{line}: replacement {pair!r}; expected 'OLD => NEW'")
        replacements.append((old.strip(), new.strip()))
    return tuple(replacements)


def readme_blocks(text: str) -> list[Block]:
    """The shell blocks of ``text``, each with the replacements of the marker right above it."""
    blocks, pending, inside, start, body = [], None, None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line)
        if inside is not None:
            if not (fence and not fence.group(1)):
                body.append(line)
                continue
            if (inside in SHELL_LANGUAGES) != (pending is not None):
                raise ReadmeFormatError(f"README.md:{start}: a shell block needs a readme-test marker right above "
                                        "it, and a marker needs a shell block")
            if pending is not None:
                blocks.append(Block(start, "\n".join(body), pending))
            inside, pending, body = None, None, []
            continue
        marker = MARKER.search(line)
        if marker:
            pending = parse_marker(marker.group(1), number)
        elif fence:
            inside, start = fence.group(1), number
        elif line.strip() and pending is not None:
            raise ReadmeFormatError(f"README.md:{number}: a readme-test marker must be followed by its shell block")
    return blocks


def shell_parts(text: str) -> list[list[str]]:
    """Each ``&&``-separated command of a block's lines (continuations joined, comments dropped), as argv."""
    joined = re.sub(r"\\\n\s*", " ", text)
    parts = []
    for line in joined.splitlines():
        for piece in line.split("&&"):
            argv = shlex.split(piece, comments=True)
            if argv:
                parts.append(argv)
    return parts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shrink(block: Block) -> str:
    """The block's text with its replacements applied (each must occur) and placeholders filled."""
    text = block.text
    for old, new in block.replacements:
        assert old in text, f"README.md:{block.line}: replacement {old!r} does not occur in its block"
        text = text.replace(old, new)
    return text.replace("{port}", str(free_port())).replace("{demo_args}", " ".join(DEMO_ARGS))


BLOCKS = readme_blocks(README.read_text())


# ---------------------------------------------------------------- setup commands: checked, not run


def ci_torch_pin() -> str:
    match = re.search(r"pip install -q torch==(\S+)", CI_SCRIPT.read_text())
    assert match, ".ci/run no longer pins torch; update this test"
    return match.group(1)


def check_setup(argv: list[str], line: int) -> None:
    """A setup command of the README agrees with what CI does (the torch pin, the extras, the script)."""
    text = " ".join(argv)
    assert text.startswith(SETUP_PREFIXES), f"README.md:{line}: {text!r} is neither a medaug command nor a known setup step"
    pinned = [arg.split("==", 1)[1] for arg in argv if arg.startswith("torch==")]
    assert all(version == ci_torch_pin() for version in pinned), f"README.md:{line}: torch=={pinned} but CI pins {ci_torch_pin()}"
    for arg in argv:
        extra = re.fullmatch(r"\.\[(\w+)\]", arg)
        if extra:
            assert f"\n{extra.group(1)} = [" in (REPO / "pyproject.toml").read_text(), f"README.md:{line}: no extra {arg}"
    if text.startswith("bash .ci/run"):
        assert CI_SCRIPT.is_file() and "<!-- test-command -->" in CI_SCRIPT.read_text()


# ---------------------------------------------------------------- medaug commands: run


def run_command(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    if argv[0] == "torchrun":
        return run_torchrun([sys.executable, "-m", "torch.distributed.run", *argv[1:]], cwd=cwd, timeout=900)
    return subprocess.run([sys.executable, "-m", "medaug_cli.app", *argv[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def output_paths(argv: list[str]) -> list[str]:
    if "--dry-run" in argv:
        return []
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in OUTPUT_OPTIONS]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{block.line}" for block in BLOCKS])
def test_readme_block_runs(block, tmp_path_factory):
    workspace = demo_run_once(tmp_path_factory).workspace
    for argv in shell_parts(shrink(block)):
        if argv[0] not in ("medaug", "torchrun"):
            check_setup(argv, block.line)
            continue
        finished = run_command(argv, workspace)
        shown = " ".join(argv)
        assert finished.returncode == 0, f"README.md:{block.line}: {shown}\n{finished.stdout[-2000:]}\n{finished.stderr[-4000:]}"
        for path in output_paths(argv):
            assert (workspace / path).exists(), f"README.md:{block.line}: {shown} did not write {path}"


def test_readme_has_the_quickstart_and_the_test_command():
    commands = [" ".join(argv) for block in BLOCKS for argv in shell_parts(block.text)]
    assert "medaug demo" in commands and "bash .ci/run" in commands
    lines = README.read_text().splitlines()
    marker = lines.index("<!-- test-command -->")
    assert re.fullmatch(r"`python -m pytest .+`", lines[marker + 1])  # .ci/run evals this line


def test_every_command_of_the_cli_is_in_the_readme():
    import typer.main

    from medaug_cli.app import app

    text = README.read_text()
    root = typer.main.get_command(app)
    names = []
    for name, command in root.commands.items():
        names += [f"{name} {sub}" for sub in getattr(command, "commands", {})] or [name]
    missing = [name for name in names if f"medaug {name}" not in text and f"medaug_cli.app {name}" not in text]
    assert not missing, f"README.md does not mention: {', '.join(f'medaug {name}' for name in missing)}"


def test_markers_are_parsed_as_documented():
    text = "<!-- readme-test: run; --n 48 => --n 6 -->\n```bash\nmedaug synthesize --n 48 \\\n  --out x && medaug demo  # c\n```\n"
    blocks = readme_blocks(text)
    assert blocks == [Block(2, "medaug synthesize --n 48 \\\n  --out x && medaug demo  # c", (("--n 48", "--n 6"),))]
    assert shell_parts(shrink(blocks[0])) == [["medaug", "synthesize", "--n", "6", "--out", "x"], ["medaug", "demo"]]
    for broken in ("```bash\nmedaug demo\n```\n", "<!-- readme-test: run -->\n```yaml\na: 1\n```\n",
                   "<!-- readme-test: run -->\ntext\n```bash\nmedaug demo\n```\n", "<!-- readme-test: skip -->\n"):
        with pytest.raises(ReadmeFormatError):
            readme_blocks(broken)
