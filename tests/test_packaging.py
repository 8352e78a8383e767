"""pyproject.toml: what a plain `pip install` gets."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_matplotlib_is_a_dependency():
    """`fastbegan train` writes metrics.png on a default install (no extra needed)."""
    deps = [d.split(";")[0].split(">")[0].split("=")[0].strip() for d in PROJECT["project"]["dependencies"]]
    assert "matplotlib" in deps


def test_every_subpackage_is_installed():
    """setuptools installs the packages it is told of: every folder with an __init__.py."""
    listed = set(PROJECT["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastbegan").rglob("__init__.py")}
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
    assert "fastbegan.kernels" in listed and (ROOT / "kernels" / "__init__.py").is_file()
