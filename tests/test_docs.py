"""The API reference: it builds (Sphinx, warnings as errors), it documents every public name, and
every argument of every public callable is described in its docstring.

A new public name, or a new argument, without documentation fails here.
"""

from __future__ import annotations

import html
import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optirs
import optirs.torch
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
MODULES = (optirs, optirs.torch)


@pytest.fixture(scope="module")
def built_html(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The HTML pages `make docs` builds, by page name."""
    out = tmp_path_factory.mktemp("docs") / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", DOCS, out],
        capture_output=True,
        text=True,
        cwd=out.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return {p.stem: p.read_text(encoding="utf-8") for p in out.glob("*.html")}


@pytest.mark.parametrize(
    ("module", "page"), [(optirs, "numpy"), (optirs.torch, "torch")], ids=["optirs", "torch"]
)
def test_every_public_name_has_an_entry(built_html: dict[str, str], module: Any, page: str):
    """Each name of ``__all__`` is documented on its module's page (an autodoc entry, whose
    anchor is the full name), not merely mentioned."""
    text = built_html[page]
    missing = [n for n in module.__all__ if f'id="{module.__name__}.{n}"' not in text]
    assert not missing, f"{page}.rst documents none of {missing}"


def test_the_cli_page_shows_each_command(built_html: dict[str, str]):
    text = html.unescape(re.sub(r"<[^>]+>", "", built_html["cli"]))
    for usage in ("usage: optirs [-h]", "usage: optirs bench", "--optimizers"):
        assert usage in text
    assert "usage: optirs info" in text


def _public_callables() -> Iterator[tuple[str, Any, str]]:
    """(name, callable, its docstring) for every public function, class constructor and
    method that optirs defines (methods inherited from torch.optim are torch's to document)."""
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            where = f"{module.__name__}.{name}"
            if isinstance(obj, type):
                # autodoc shows the class's docstring followed by its constructor's.
                doc = (obj.__doc__ or "") + "\n" + (obj.__init__.__doc__ or "")
                yield where, obj, doc
                for attr in dir(obj):
                    method = getattr(obj, attr)
                    owner = getattr(method, "__module__", None) or ""
                    if attr.startswith("_") or not callable(method):
                        continue
                    if owner.startswith("optirs"):
                        yield f"{where}.{attr}", method, method.__doc__ or ""
            elif callable(obj):
                yield where, obj, obj.__doc__ or ""


def _documented(doc: str, arg: str) -> bool:
    """Whether ``doc`` has an entry for ``arg`` (Google style: ``name:`` or ``name (type):``
    at the start of an indented line of an Args/Attributes section)."""
    return any(
        line.strip().startswith((f"{arg}:", f"{arg} ("))
        for line in doc.splitlines()
        if line.startswith(" ")
    )


def test_every_argument_of_every_public_callable_is_documented():
    undocumented = []
    for where, obj, doc in _public_callables():
        if not doc.strip():
            undocumented.append(f"{where}: no docstring")
            continue
        for arg in inspect.signature(obj).parameters:
            if arg not in ("self", "cls") and not _documented(doc, arg):
                undocumented.append(f"{where}({arg})")
    assert not undocumented, "undocumented: " + ", ".join(undocumented)
