"""The README's two set-up commands are the ones the project supports (CI runs the test one)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_exactly_two_setup_commands():
    cmds = commands()
    assert len(cmds) == 2
    assert "fastbegan train" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = commands()[1]
    pattern = re.search(r"grep -m1 '(.+?)' README.md", ci).group(1).replace("\\[", "[").replace("\\]", "]")
    assert test_cmd.startswith(pattern.lstrip("^"))


def test_readme_is_an_entry_point():
    """The README stays short; the long text lives in docs/ (its links: tests/test_docs.py)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)
    assert any("docs/design.md" in line for line in lines)
