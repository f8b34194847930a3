"""The README stays short and true: its policy table is what its command prints, and every table in ``docs/``
names the command that makes it.

The replay test reruns the command printed under the README's policy table and compares every cell of the
README's table with the same column of the command's own markdown table (rows of the ``ALL`` group). When the
figures drift (a rule changed), the failure message holds the table to paste.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 260
POLICY_SECTION = "## Policies: what they cost and save"
SUBCOMMANDS = {"serve", "demo", "replay", "calibrate"}


def table_rows(lines: list[str]) -> list[list[str]]:
    """The cells of a markdown table's lines (header first, the ``|---|`` line dropped)."""
    rows = []
    for line in lines:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", cell) for cell in cells):
            continue
        rows.append(cells)
    return rows


def tables(text: str) -> list[tuple[int, list[str]]]:
    """Every markdown table outside code blocks: (index of its header line, its lines)."""
    found: list[tuple[int, list[str]]] = []
    lines = text.splitlines()
    in_code = False
    start: int | None = None
    for index, line in enumerate([*lines, ""]):
        if line.startswith("```"):
            in_code = not in_code
        is_row = not in_code and line.startswith("|")
        if is_row and start is None:
            start = index
        elif not is_row and start is not None:
            found.append((start, lines[start:index]))
            start = None
    return found


def paragraph_before(lines: list[str], index: int) -> str:
    """The text between the previous blank-line-separated block and line ``index`` (the lines just above it)."""
    end = index
    while end > 0 and not lines[end - 1].strip():
        end -= 1
    start = end
    while start > 0 and lines[start - 1].strip():
        start -= 1
    return " ".join(line.strip() for line in lines[start:end])


def command_problems(command: str) -> list[str]:
    """Why a documented command could not run here (empty when it names a real program, script and files)."""
    words = shlex.split(command)
    problems = []
    if words[:1] == [".venv/bin/thinkbrake"]:
        if len(words) < 2 or words[1] not in SUBCOMMANDS:
            problems.append(f"{command!r}: no such thinkbrake subcommand")
    elif words[:1] in (["python"], [".venv/bin/python"]):
        if len(words) < 2 or not words[1].startswith("benchmarks/") or not (ROOT / words[1]).is_file():
            problems.append(f"{command!r}: no such benchmark script")
    else:
        problems.append(f"{command!r}: neither `.venv/bin/thinkbrake` nor `python benchmarks/...`")
    shared = ROOT.parent / "shared"
    for word in words:
        if word.startswith("../shared/") and shared.is_dir() and not (ROOT / word).exists():
            problems.append(f"{command!r}: {word} does not exist")
    return problems


def test_readme_stays_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move details to docs/"
    )


def test_two_commands_head_the_set_up() -> None:
    """The heading that promises two commands is followed by a block of exactly those two commands."""
    lines = README.read_text().splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("## ") and "two commands" in line)
    fence = next(i for i in range(heading + 1, len(lines)) if lines[i].startswith("```"))
    assert all(not line.startswith("#") for line in lines[heading + 1 : fence]), "another heading comes first"
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    commands = [line.split("#")[0].strip() for line in lines[fence + 1 : end] if line.strip()]
    assert commands == [
        "bash .ci/install && .venv/bin/thinkbrake demo",
        "bash .ci/install && .venv/bin/python -m pytest",
    ]


def test_readme_links_exist() -> None:
    targets = re.findall(r"\]\(([^)#]+)\)", README.read_text())
    assert targets, "the README links to docs/"
    missing = [target for target in targets if not (ROOT / target).exists()]
    assert not missing, f"README links to missing files: {missing}"
    assert {path.name for path in DOCS.glob("*.md")} <= {Path(t).name for t in targets if t.startswith("docs/")}


def test_every_docs_table_names_its_command() -> None:
    """Each table in docs/ has, in the paragraph just above it, ``Command:`` (or ``Commands:``) and the commands
    that regenerate it in backticks; each names a real subcommand or benchmark script and existing trace files."""
    problems: list[str] = []
    count = 0
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        lines = text.splitlines()
        for index, _table in tables(text):
            count += 1
            where = f"{path.name}:{index + 1}"
            above = paragraph_before(lines, index)
            if not re.match(r"Commands?: ", above):
                problems.append(f"{where}: no 'Command:' paragraph right above the table")
                continue
            commands = [c for c in re.findall(r"`([^`]+)`", above) if c.startswith((".venv/bin/", "python "))]
            if not commands:
                problems.append(f"{where}: the 'Command:' paragraph names no command")
            for command in commands:
                problems += [f"{where}: {problem}" for problem in command_problems(command)]
    assert count > 0, "docs/ has tables"
    assert not problems, "\n".join(problems)


def readme_policy_table() -> tuple[list[list[str]], str]:
    """The README's policy table (header first) and the replay command in the code block after it."""
    text = README.read_text()
    section = text[text.index(POLICY_SECTION) :]
    section = section[: section.index("\n## ", 1)]
    _index, lines = tables(section)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if "thinkbrake replay" in line]
    assert len(commands) == 1, f"one replay command under the policy table, found {commands}"
    return table_rows(lines), commands[0]


def test_readme_policy_table_names_replay_columns() -> None:
    """Cheap half of the check: the table's columns are the replay report's, so the replay test can compare them."""
    from controller.offline.report import COLUMNS

    rows, command = readme_policy_table()
    titles = {title for _key, title in COLUMNS}
    assert rows[0][0] == "policy" and set(rows[0]) <= titles, f"columns not in replay's report: {rows[0]}"
    assert not command_problems(command)
    assert len(rows) > 2


@pytest.mark.replay
def test_readme_policy_table_is_what_its_command_prints(tmp_path: Path) -> None:
    rows, command = readme_policy_table()
    words = shlex.split(command)
    trace_files = [ROOT / word for word in words if word.endswith((".jsonl", ".jsonl.gz"))]
    if not all(path.exists() for path in trace_files):
        pytest.skip(f"dev traces not found: {trace_files}")
    assert words[0] == ".venv/bin/thinkbrake"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=3600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed_lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    printed = table_rows(printed_lines)
    header, body = printed[0], printed[1:]
    by_policy = {row[header.index("policy")]: row for row in body if row[header.index("group")] == "ALL"}
    readme_header = rows[0]
    expected = ["| " + " | ".join(readme_header) + " |", "|" + "---|" * len(readme_header)]
    expected += [
        "| " + " | ".join(row[header.index(title)] for title in readme_header) + " |" for row in by_policy.values()
    ]
    regenerated = "\n".join(expected)
    # answer comparisons are time-bounded: on a heavily loaded machine a slow one counts as "different" and can
    # move a figure, so the message lists the ones the replay stopped
    stopped = re.findall(r"answer comparison stopped after [^\r\n]*", done.stderr)
    note = f"the table now:\n{regenerated}\n(comparisons stopped at their time bound: {len(stopped)}: {stopped})"
    readme_rows = rows[1:]
    assert [row[0] for row in readme_rows] == list(by_policy), f"policies differ; {note}"
    for row in readme_rows:
        printed_row = by_policy[row[0]]
        for title, cell in zip(readme_header, row, strict=True):
            assert cell == printed_row[header.index(title)], (
                f"README {row[0]} '{title}' is {cell}, the command prints {printed_row[header.index(title)]}; {note}"
            )
