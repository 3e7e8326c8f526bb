"""Every public name has an autodoc entry in the Sphinx sources (parsed, no build needed)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PUBLIC_MODULES = (
    "pyro_vi_ext",
    "pyro_vi_ext.diagnostics",
    "pyro_vi_ext.training",
    "pyro_vi_ext.datasets",
    "pyro_vi_ext.metrics",
)
OBJECT_DIRECTIVES = "function|class|data|exception|decorator|attribute|method"
# reST: ".. autofunction:: pkg.name"; MyST: "```{autofunction} pkg.name" or ":::{autoclass} ..."
RST_DIRECTIVE = re.compile(rf"^\.\. auto(?:{OBJECT_DIRECTIVES}|module)::\s+(\S+)", re.M)
MYST_DIRECTIVE = re.compile(
    rf"^(?:`{{3,}}|:{{3,}})\{{auto(?:{OBJECT_DIRECTIVES}|module)\}}\s+(\S+)", re.M
)


def documented_names() -> list[str]:
    """Dotted names of every autodoc directive in the .rst and .md sources of ``docs/``."""
    names = []
    for path in sorted(DOCS.rglob("*")):
        if path.suffix not in (".rst", ".md") or "_build" in path.parts:
            continue
        text = path.read_text()
        names += RST_DIRECTIVE.findall(text) + MYST_DIRECTIVE.findall(text)
    return names


def resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"no module in {dotted!r}")


def test_docs_sources_have_directives():
    """The parser finds the reference pages' directives (guards against a silent regex)."""
    names = documented_names()
    assert len(names) > 30
    assert "pyro_vi_ext.ImportanceWeightedELBO" in names


def test_every_directive_names_an_existing_object():
    """No stale entry: each documented name imports."""
    missing = []
    for name in documented_names():
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"docs/ documents names that do not exist: {missing}"


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_page_entry(module_name):
    """Each name in ``__all__`` is documented, under this module's path or another public one."""
    module = importlib.import_module(module_name)
    documented = [resolve(name) for name in documented_names()]
    undocumented = [
        name
        for name in module.__all__
        if not any(getattr(module, name) is obj for obj in documented)
    ]
    assert not undocumented, (
        f"{module_name}.__all__ names without an autodoc entry in docs/: {undocumented}; add "
        "an autofunction/autoclass/autodata directive to the matching page under docs/api/"
    )
