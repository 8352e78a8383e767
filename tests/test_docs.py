"""The documentation: every relative link in the Markdown files resolves (files and
#anchors), and every ``docs/design.md §N`` cited in the code names a section that exists."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN = ["README.md", "benchmarks/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


def relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("name", MARKDOWN)
def test_links_resolve(name):
    md = ROOT / name
    assert md.is_file(), name
    broken = []
    for target in relative_links(md):
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists() or ROOT not in dest.parents and dest != ROOT:
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{name}: links that do not resolve: {broken}"


def test_link_checker_catches_a_broken_link(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("# Title\n\n[ok](#title) [gone](nothing.md) [web](https://example.com)\n")
    assert relative_links(md) == ["#title", "nothing.md"] and anchors(md) == {"title"}


def cited_sections() -> dict[str, list[str]]:
    """``docs/design.md §3.2, §4`` in any tracked source file -> {"3.2": [file, ...], ...}."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    found: dict[str, list[str]] = {}
    for f in files:
        for cite in re.findall(r"docs/design\.md ((?:§\d+(?:\.\d+)?(?:, )?)+)", (ROOT / f).read_text()):
            for sec in re.findall(r"§(\d+(?:\.\d+)?)", cite):
                found.setdefault(sec, []).append(f)
    return found


def test_design_citations_name_existing_sections():
    headings = re.findall(r"^#+ (\d+(?:\.\d+)?)\.? ", (ROOT / "docs" / "design.md").read_text(), re.M)
    cited = cited_sections()
    assert {"1", "3.2", "8"} <= set(cited)  # the reader sees the citations it should
    missing = {sec: files for sec, files in cited.items() if sec not in headings}
    assert not missing, f"cited sections that docs/design.md lacks: {missing}"


def test_no_citation_of_the_old_out_of_repo_design_file():
    files = subprocess.run(["git", "grep", "-lE", r"DESIGN(\.md)? (section |sections )?[0-9]"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    assert not files, f"cite docs/design.md §N instead of DESIGN N in: {files}"
