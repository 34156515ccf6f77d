"""Pieces from outside Python that some tests need (Node.js and matrix-js-sdk).

Outside CI a test whose piece is missing skips, saying what to run; with the
environment variable ``CI`` set it fails instead, so CI never passes by skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import NoReturn

import pytest

from tests.helpers import ROOT

JS_DIR = ROOT / "tests" / "js"
NODE_MAJOR = 20
LOCAL_NODE = ROOT / ".venv" / "node" / "bin"  # where scripts/_node.sh's install_node puts Node.js


def missing(what: str) -> NoReturn:
    """Skip the test (fail it when ``CI`` is set), saying what is missing and what to run."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(what)


def locked_version(package: str) -> str:
    """The version of ``package`` that tests/js/package-lock.json pins."""
    lock = json.loads((JS_DIR / "package-lock.json").read_text())
    return str(lock["packages"][f"node_modules/{package}"]["version"])


def node_with(package: str) -> str:
    """The path of a Node.js (20 or newer) that can import the pinned ``package`` from tests/js."""
    install = "run `npm ci --prefix tests/js` (`bash scripts/test` does it when it finds Node.js)"
    node = shutil.which("node", path=os.pathsep.join([str(LOCAL_NODE), os.environ.get("PATH", "")]))
    if node is None:
        missing(
            f"Node.js {NODE_MAJOR}+ is not on PATH nor in .venv/node/bin: install it (your distribution's"
            " nodejs if it is recent enough, or Node.js from PyPI into .venv/node/ as CI does:"
            f" `bash -c 'source scripts/_node.sh && install_node'`), then {install}"
        )
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=False)
    match = re.match(r"v(\d+)\.", version.stdout)
    if match is None or int(match.group(1)) < NODE_MAJOR:
        missing(f"{node} is Node.js {version.stdout.strip() or '(unknown)'}; {NODE_MAJOR}+ is needed")
    wanted = locked_version(package)
    manifest = JS_DIR / "node_modules" / package / "package.json"
    found = json.loads(manifest.read_text())["version"] if manifest.exists() else None
    if found != wanted:
        have = "is not installed" if found is None else f"is {found}"
        missing(f"{package} {wanted} is pinned but {have} in tests/js/node_modules: {install}")
    return node
