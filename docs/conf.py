"""Sphinx configuration of optirs's API reference (``make docs``; tests/test_docs.py).

The reference is rendered from the docstrings of the installed package (autodoc imports
``optirs`` and ``optirs.torch``): build the extension first (``make develop``). Docstrings are
written in reStructuredText with Google-style ``Args:`` sections, which napoleon renders.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import optirs
from docutils import nodes
from docutils.parsers.rst import Directive

project = "optirs"
author = "The optirs developers"
copyright = "the optirs developers"
release = version = optirs.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

# The class's docstring (what it is, its state), then its constructor's (each argument).
autoclass_content = "both"
autodoc_member_order = "bysource"
# Signatures show names and defaults; each argument's type and meaning are in its Args entry.
autodoc_typehints = "none"
# "Bases: torch.optim.adam.Adam", not a bare "Adam" that reads like optirs's own.
autodoc_typehints_format = "fully-qualified"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False


@contextlib.contextmanager
def _argv0(name: str) -> Iterator[None]:
    """Makes the parser name itself as the ``optirs`` console script does."""
    saved = sys.argv[:]
    sys.argv[:] = [name]
    try:
        yield
    finally:
        sys.argv[:] = saved


class CliHelp(Directive):
    """``.. optirs-cli-help:: [COMMAND]``: the ``--help`` output of ``optirs`` (or of one of its
    commands), taken from the parser itself so that the page cannot fall behind it."""

    optional_arguments = 1

    def run(self) -> list[Any]:
        from optirs.__main__ import build_parser

        # argparse wraps to the terminal's width, which it reads from COLUMNS.
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"
        try:
            with _argv0("optirs"):
                parser = build_parser()
            if self.arguments:
                sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
                parser = sub.choices[self.arguments[0]]
            text = parser.format_help()
        finally:
            if old is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = old
        return [nodes.literal_block(text, text, language="text")]


def _public_bases(app: Any, name: str, obj: Any, options: Any, bases: list[Any]) -> None:
    """Leaves private mixins (the torch bridge's ``_Bridge``) out of "Bases:"."""
    bases[:] = [b for b in bases if not getattr(b, "__name__", "").startswith("_")]


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("optirs-cli-help", CliHelp)
    app.connect("autodoc-process-bases", _public_bases)
    return {"parallel_read_safe": True}
