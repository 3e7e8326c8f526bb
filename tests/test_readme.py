"""The README's Python snippets run.

Every fenced block opened with three backticks and ``python`` in ``README.md`` is executed, in
the order of the file, with one namespace per section, a section being the text under a ``##``
or ``###`` heading up to the next such heading: the blocks of a section share their variables,
so a later block may use what an earlier one defined, and nothing leaks from one section to the
next (a subsection does not see its parent's variables). Each section runs in a
fresh temporary directory (snippets may write files such as ``run.pt``), with the repository
root importable (``from models... import ...``), a cleared Pyro parameter store, seed 0 and
matplotlib's ``Agg`` backend (``plt.show()`` draws nothing).

A block that cannot run here on purpose (it needs ``torchrun``, a GPU, or minutes of CPU) is
marked in the README itself, on the line before its opening fence, with::

    <!-- readme-test: skip (the reason) -->

The marker is an HTML comment, so it is invisible in the rendered README but plain in its
source; a marker without a reason is an error. Keep skips rare: a snippet that is merely slow
should use small sizes instead.

A failure names the section, the README line and the first line of the failing block, and the
traceback points at README lines (the snippet is compiled with its README line numbers).

``KNOWN_BROKEN`` lists sections whose snippets are known not to run and that are owned by other
work in progress; each entry is a strict ``xfail``, so it turns into a failure as soon as the
section runs, and the entry must then be removed.
"""

from __future__ import annotations

import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
SKIP_MARKER = re.compile(r"^<!--\s*readme-test:\s*skip\b(?P<rest>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")

# section heading -> why its snippets do not run yet (see the module docstring)
KNOWN_BROKEN: dict[str, str] = {}


@dataclass
class CodeBlock:
    """One fenced Python block of a Markdown file."""

    line: int  # 1-based line of the first code line (the line after the opening fence)
    code: str
    skip_reason: str | None = None

    @property
    def first_line(self) -> str:
        """The first non-blank line of the block, to name it in messages."""
        return next((text.strip() for text in self.code.splitlines() if text.strip()), "")


@dataclass
class Section:
    """The text under a ``##`` or ``###`` heading (``"Parent > Sub"`` for the latter)."""

    heading: str
    line: int
    blocks: list[CodeBlock] = field(default_factory=list)


def parse_sections(text: str) -> list[Section]:
    """Split Markdown ``text`` into ``##`` / ``###`` sections and collect their Python blocks.

    Text before the first ``##`` heading belongs to a section named after the ``#`` title
    (or ``"(top)"``). Headings inside fences do not count. A skip marker applies to the block
    whose opening fence follows it, blank lines allowed in between.

    Parameters
    ----------
    text : str
        The Markdown source.

    Returns
    -------
    list of Section
        In file order, only those with at least one Python block.

    Raises
    ------
    ValueError
        A skip marker without a reason, or a fence left open at the end of the file.
    """
    sections = [Section("(top)", 1)]
    parent = "(top)"
    lines = text.splitlines()
    pending_skip: str | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = SKIP_MARKER.match(line.strip())
        fence = FENCE.match(line.strip())
        if marker:
            reason = marker.group("rest").strip().strip("()").strip()
            if not reason:
                raise ValueError(
                    f"README.md line {index + 1}: a readme-test skip marker needs a reason, "
                    "e.g. <!-- readme-test: skip (needs torchrun) -->"
                )
            pending_skip = reason
        elif fence:
            closing = fence.group("fence")
            language = fence.group("info").strip().split()[0].lower() if fence.group("info") else ""
            start = index + 1
            end = start
            while end < len(lines) and not lines[end].strip().startswith(closing):
                end += 1
            if end == len(lines):
                raise ValueError(f"README.md line {index + 1}: code fence is never closed")
            if language in ("python", "py"):
                code = "\n".join(lines[start:end]) + "\n"
                sections[-1].blocks.append(CodeBlock(start + 1, code, pending_skip))
            pending_skip = None
            index = end
        elif line.startswith("## "):
            parent = line[3:].strip()
            sections.append(Section(parent, index + 1))
            pending_skip = None
        elif line.startswith("### "):
            sections.append(Section(f"{parent} > {line[4:].strip()}", index + 1))
            pending_skip = None
        elif line.startswith("# ") and sections[-1].heading == "(top)":
            parent = sections[-1].heading = line[2:].strip()
        elif line.strip():
            pending_skip = None  # a marker only applies to the block right after it
        index += 1
    return [section for section in sections if section.blocks]


def run_section(section: Section) -> None:
    """Execute the section's blocks in order in one namespace; skipped blocks are left out.

    Parameters
    ----------
    section : Section
        The section to run.

    Raises
    ------
    AssertionError
        Naming the section, the README line and the first line of the failing block, with the
        snippet's traceback in README line numbers.
    """
    namespace: dict = {"__name__": "__readme__"}
    for block in section.blocks:
        if block.skip_reason is not None:
            continue
        # pad with newlines so that tracebacks show README line numbers
        source = "\n" * (block.line - 1) + block.code
        try:
            exec(compile(source, str(README), "exec"), namespace)  # noqa: S102
        except Exception as error:
            snippet_trace = "".join(
                entry
                for entry in traceback.format_exception(error)
                if "test_readme.py" not in entry
            )
            raise AssertionError(
                f"README.md section '{section.heading}': the block at line {block.line} "
                f"(first line `{block.first_line}`) failed with {type(error).__name__}: {error}\n"
                f"{snippet_trace}"
            ) from None


SECTIONS = parse_sections(README.read_text(encoding="utf-8"))


def _section_param(section: Section):
    marks = []
    if section.heading in KNOWN_BROKEN:
        marks.append(pytest.mark.xfail(reason=KNOWN_BROKEN[section.heading], strict=True))
    return pytest.param(section, id=section.heading, marks=marks)


@pytest.mark.parametrize("section", [_section_param(s) for s in SECTIONS])
def test_readme_section_runs(
    section: Section, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every unskipped Python block of the section runs, in order, in one namespace."""
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    if not any(block.skip_reason is None for block in section.blocks):
        pytest.skip(f"every block of '{section.heading}' is marked readme-test: skip")
    run_section(section)


def test_readme_has_runnable_snippets() -> None:
    """The extraction finds the README's blocks, and ``KNOWN_BROKEN`` names real sections."""
    runnable = [b for s in SECTIONS for b in s.blocks if b.skip_reason is None]
    assert len(runnable) >= 3, f"only {len(runnable)} runnable python blocks found in {README}"
    stale = sorted(set(KNOWN_BROKEN) - {section.heading for section in SECTIONS})
    assert not stale, f"KNOWN_BROKEN names sections that have no python block any more: {stale}"


def test_parser_sections_markers_and_line_numbers() -> None:
    """Sections, fences, skip markers (with reason, adjacent only) and line numbers."""
    text = "\n".join(
        [
            "# Title",  # 1
            "```python",  # 2
            "a = 1",  # 3
            "```",  # 4
            "## First",  # 5
            "<!-- readme-test: skip (needs torchrun) -->",  # 6
            "",  # 7
            "```python",  # 8
            "b = 2",  # 9
            "```",  # 10
            "```bash",  # 11
            "## not a heading inside a fence",  # 12
            "```",  # 13
            "### Sub",  # 14
            "<!-- readme-test: skip (orphan: text follows) -->",  # 15
            "some text",  # 16
            "```py",  # 17
            "c = 3",  # 18
            "```",  # 19
            "## Second",  # 20
        ]
    )
    sections = parse_sections(text)
    assert [s.heading for s in sections] == ["Title", "First", "First > Sub"]
    top, first, sub = sections
    assert [(b.line, b.code, b.skip_reason) for b in top.blocks] == [(3, "a = 1\n", None)]
    assert [(b.line, b.first_line, b.skip_reason) for b in first.blocks] == [
        (9, "b = 2", "needs torchrun")
    ]
    assert [(b.line, b.first_line, b.skip_reason) for b in sub.blocks] == [(18, "c = 3", None)]
    with pytest.raises(ValueError, match="needs a reason"):
        parse_sections("<!-- readme-test: skip -->\n```python\nx = 1\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        parse_sections("```python\nx = 1\n")


def test_failure_names_section_line_and_block() -> None:
    """A failing block is named by section, line and first line; skipped blocks do not run."""
    section = Section("Demo", 1, [CodeBlock(10, "x = 1\n"), CodeBlock(20, "\ny = x + undefined\n")])
    with pytest.raises(AssertionError) as info:
        run_section(section)
    message = str(info.value)
    assert "section 'Demo'" in message
    assert "block at line 20" in message
    assert "`y = x + undefined`" in message
    assert "NameError" in message
    assert 'README.md", line 21' in message  # the traceback is in README line numbers
    # a skipped block is not executed
    run_section(Section("Skip", 1, [CodeBlock(1, "raise RuntimeError\n", "demo")]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
