"""The README is tested: every fenced block marked for it runs, and its output is compared with what
the README shows.

A block opts in with an HTML comment (invisible on GitHub) on the line right above its fence:

    <!-- readme-test: session=place setup=sample-trace -->
    <!-- readme-test: session=report mask=[0-9.]+ s\b -->
    <!-- readme-test: skip needs a GPU -->

- A block whose lines start with ``$ `` is a console session: each ``$ command`` runs (in bash, in
  the session's directory) and the lines after it, up to the next ``$ ``, are its expected output.
  A line ``...`` stands for any output. Output is compared word by word (rich wraps long lines at the
  terminal's width, so line breaks are not compared); stdout and stderr are read together.
- Any other block is a script: it runs with ``bash -e`` and must exit 0.
- ``session=NAME``: blocks of one session share a directory and run in README order (a later block
  reads what an earlier one wrote). ``setup=sample-trace`` copies the shipped trace to ``./trace``.
- ``mask=REGEX`` (repeatable): what matches is replaced by ``<masked>`` in both the README and the
  output: the parts that are not deterministic (timings, absolute paths), marked where they are.
- ``single``: only the block's first ``$ `` line is a command (for a command that prints ``$ `` lines).
- ``slow``: runs only with ``MOEPROF_README_SLOW=1`` in the environment (``moeprof demo``: 44-80 s on a
  2-core machine, far longer on a busy one); CI sets it.
- ``skip REASON``: not run, and the reason says why.

Sections listed in :data:`COVERED_SECTIONS` must mark every block that runs ``moeprof``: a new
section opts in by adding its name there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SAMPLE_TRACE = ROOT / "sample_data" / "trace"
COVERED_SECTIONS = {"demo", "report", "place"}

FLAGS = {"single", "slow"}
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
SECTION = re.compile(r"<!--\s*section:\s*([\w-]+)\s*-->")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w-]*)")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    section: str | None
    lang: str
    text: str
    marker: str | None = None
    options: dict[str, list[str]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"

    @property
    def is_console(self) -> bool:
        return any(line.startswith("$ ") for line in self.text.splitlines())

    @property
    def runs_moeprof(self) -> bool:
        return bool(re.search(r"^(\$ )?moeprof\b", self.text, re.M))


def parse_options(marker: str) -> dict[str, list[str]]:
    if marker.startswith("skip"):
        return {"skip": [marker[4:].strip() or "no reason given"]}
    out: dict[str, list[str]] = {}
    key = None
    for word in marker.split():
        if word in FLAGS:
            out.setdefault(word, []).append("")
            key = None
        elif re.match(r"\w+=", word):
            key, _, value = word.partition("=")
            out.setdefault(key, []).append(value)
        elif key is not None:  # a value may hold spaces: it runs to the next key= or flag
            out[key][-1] += " " + word
        else:
            raise ValueError(f"readme-test marker: {word!r} is neither KEY=VALUE nor one of {sorted(FLAGS)}")
    return out


def parse_readme(text: str) -> list[Block]:
    blocks, section, pending = [], None, None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := SECTION.search(line):
            section = m.group(1)
        if m := MARKER.search(line):
            pending = m.group(1)
        elif (m := FENCE.match(line)) is not None:
            fence = m.group(1)
            body = []
            j = i + 1
            while j < len(lines) and not lines[j].startswith(fence):
                body.append(lines[j])
                j += 1
            b = Block(i + 1, section, m.group(2), "\n".join(body) + "\n", pending)
            if pending is not None:
                b.options = parse_options(pending)
            blocks.append(b)
            pending = None
            i = j
        elif line.strip():
            pending = None  # a marker belongs to the fence right below it
        i += 1
    return blocks


BLOCKS = parse_readme(README.read_text(encoding="utf-8"))
MARKED = [b for b in BLOCKS if b.marker is not None]


def normalise(text: str, masks: list[str]) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    for mask in masks:
        text = re.sub(mask, "<masked>", text)
    return " ".join(text.split())


def expect_in_order(expected: str, actual: str, masks: list[str], where: str) -> None:
    """Every piece of ``expected`` between ``...`` lines appears in ``actual``, in order."""
    pieces = re.split(r"^\s*\.\.\.\s*$", expected, flags=re.M)
    got = normalise(actual, masks)
    at = 0
    for k, piece in enumerate(pieces):
        want = normalise(piece, masks)
        if not want:
            continue
        found = got.find(want, at)
        if found < 0 or (k == 0 and found != 0) or (k == len(pieces) - 1 and found + len(want) != len(got)):
            raise AssertionError(f"{where}: the README shows\n{piece.strip()}\n\nbut the command printed\n{actual}")
        at = found + len(want)


def console_script(text: str, single: bool = False) -> tuple[str, list[str]]:
    """The bash script of a console block (a sentinel line before each command) and each expected output.
    ``single``: only the first ``$ `` line is a command (the output itself shows ``$ `` lines)."""
    script, expected = ["cd \"$SESSION\""], []
    for line in text.splitlines():
        if line.startswith("$ ") and not (single and expected):
            # The sentinel must not reset $?: `$ echo $?` reads the previous command's status.
            script.append(f"__status=$?; echo '@@readme-command {len(expected)}@@'; (exit $__status)")
            script.append(line[2:])
            expected.append("")
        elif expected:
            expected[-1] += line + "\n"
    return "\n".join(script) + "\n", expected


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(block: Block) -> Path:
        name = (block.options.get("session") or [block.id])[0]
        if name not in made:
            d = tmp_path_factory.mktemp(f"readme-{name}")
            if "sample-trace" in block.options.get("setup", []):
                shutil.copytree(SAMPLE_TRACE, d / "trace")
            made[name] = d
        return made[name]

    return get


def run_bash(script: str, cwd: Path, *, strict: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES", "FORCE_COLOR"}}
    env.update(NO_COLOR="1", TERM="dumb", SESSION=str(cwd), MOEPROF_ROOT=str(ROOT),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return subprocess.run(["bash", "-e" if strict else "+e", "-c", script], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=3600)


@pytest.mark.parametrize("block", MARKED, ids=lambda b: b.id)
def test_readme_block(block, sessions):
    if "skip" in block.options:
        pytest.skip(f"{block.id}: {block.options['skip'][0]}")
    if "slow" in block.options and not os.environ.get("MOEPROF_README_SLOW"):
        pytest.skip(f"{block.id}: slow (about a minute on 2 cores); set MOEPROF_README_SLOW=1 to run it")
    cwd = sessions(block)
    masks = block.options.get("mask", [])
    if not block.is_console:
        r = run_bash(block.text, cwd, strict=True)
        assert r.returncode == 0, f"{block.id} failed with exit code {r.returncode}:\n{r.stdout}"
        return
    single = "single" in block.options
    script, expected = console_script(block.text, single)
    r = run_bash(script, cwd, strict=False)
    outputs = re.split(r"^@@readme-command \d+@@\n", r.stdout, flags=re.M)[1:]
    assert len(outputs) == len(expected), f"{block.id}: the session stopped early:\n{r.stdout}"
    commands = [line for line in block.text.splitlines() if line.startswith("$ ")][:len(expected)]
    for command, want, got in zip(commands, expected, outputs):
        expect_in_order(want, got, masks, f"{block.id} `{command}`")


def test_covered_sections_mark_every_moeprof_block():
    unmarked = [b.id for b in BLOCKS if b.section in COVERED_SECTIONS and b.runs_moeprof and b.marker is None]
    assert not unmarked, f"README blocks that run moeprof but are neither tested nor skipped: {unmarked}"
    assert {b.section for b in MARKED} >= COVERED_SECTIONS


def test_the_parser_reads_markers_sessions_and_wildcards():
    blocks = parse_readme(
        "<!-- section: x -->\n<!-- readme-test: session=s mask=\\d+ -->\n```console\n$ echo 12 a\n7 a\n```\n"
        "```bash\nmoeprof --help\n```\n"
    )
    assert [b.marker is not None for b in blocks] == [True, False]
    assert blocks[0].options == {"session": ["s"], "mask": ["\\d+"]} and blocks[0].section == "x"
    assert parse_options("single slow session=demo mask=--rules \\S+") == {
        "single": [""], "slow": [""], "session": ["demo"], "mask": ["--rules \\S+"]}
    script, expected = console_script(blocks[0].text)
    assert expected == ["7 a\n"] and "echo 12 a" in script
    expect_in_order(expected[0], "12 a\n", ["\\d+"], "t")
    expect_in_order("first\n...\nlast\n", "first\nmiddle\nlast\n", [], "t")
    with pytest.raises(AssertionError):
        expect_in_order("first\nlast\n", "first\nmiddle\nlast\n", [], "t")
    with pytest.raises(AssertionError):
        expect_in_order("7 b\n", "7 a\n", [], "t")
