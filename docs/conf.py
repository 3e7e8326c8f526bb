"""Sphinx configuration of the pyro_vi_ext reference documentation.

Build from the repository root (warnings are errors)::

    python -m sphinx -W -b html docs docs/_build

The notebooks are copied from ``notebooks/`` into ``docs/notebooks/`` (ignored by git) and
rendered by myst-nb. They are stored without outputs, so the build executes them at their small
size (``CI=true``, as the tests do: about 50 s of CPU, two minutes on a busy two-core machine);
``DOCS_EXECUTE_NOTEBOOKS=0`` renders them as stored, without outputs, in a few seconds.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy

import pyro_vi_ext  # noqa: E402 - after the path is set

project = "pyro_vi_ext"
author = "pyro_vi_ext developers"
copyright = "2026, pyro_vi_ext developers"  # noqa: A001 - Sphinx's name
release = pyro_vi_ext.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "Importance-weighted and decomposed ELBOs for Pyro"}

# autodoc + numpydoc: numpydoc renders the sections and renames each docstring's numbered
# references, so [1] in two docstrings of one page do not collide
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the signature shows them; numpydoc's Parameters say the rest
autodoc_default_options = {"members": False}
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

# MyST: $...$ and $$...$$ math in the guides, ::: fences for directives
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# notebooks: rendered from copies, executed at their small size unless turned off
nb_execution_mode = "off" if os.environ.get("DOCS_EXECUTE_NOTEBOOKS") == "0" else "force"
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_in_temp = False


def _copy_notebooks() -> None:
    target = DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        destination = target / path.name
        if not destination.exists() or destination.read_bytes() != path.read_bytes():
            shutil.copyfile(path, destination)


_copy_notebooks()
if nb_execution_mode != "off":
    os.environ.setdefault("CI", "true")  # the notebooks' small size, as in the tests
    # figures as inline PNG outputs, even where MPLBACKEND=Agg is exported (as .ci/run does)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # the kernels run in docs/notebooks: let them import this checkout's models and package
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
