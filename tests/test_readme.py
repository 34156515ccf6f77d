"""The README as a newcomer uses it, and the links between the docs.

The README's walkthrough is run as pasted, twice in a row, into bash in a
folder laid out as the project root after ``scripts/serve`` (``sample_config.yaml``,
``.demo-password``, ``.venv``), against a real ``serve`` child process. Only the
two ports differ: the server's are free ones. The first run must print exactly
the counters the README shows; the second must stop with the one plain line
the README shows, never a traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import Launcher, register, write_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
STOPPED = re.compile(r"stopped: M_LIMIT_EXCEEDED Too many requests; try again in \d+ s")


def readme_section(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def fenced(section: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", section, re.MULTILINE | re.DOTALL)


def test_the_readme_is_the_front_door_not_the_manual() -> None:
    assert len(README.read_text().splitlines()) <= 200


def test_the_walkthrough_pasted_twice_prints_what_the_readme_shows(tmp_path: Path, launch: Launcher) -> None:
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "login-token-module").exists():
        pytest.skip("the package is not installed as a console script beside this Python")
    section = readme_section("Walkthrough with curl")
    (walkthrough,) = fenced(section, "sh")
    first_output, second_output = fenced(section, "text")[:2]

    # The project root after scripts/serve, with the server on free ports.
    sample = yaml.safe_load((ROOT / "sample_config.yaml").read_text())
    for listener in sample["listeners"]:
        listener["port"] = 0
    sample["bcrypt_rounds"] = 4  # fast; changes nothing the walkthrough prints
    config = write_config(tmp_path, sample, "sample_config.yaml")
    password = "a demo password"
    (tmp_path / ".demo-password").write_text(password)
    register(config, "alice", password)
    (tmp_path / ".venv").symlink_to(venv)
    server = launch(config)
    metrics_url = f"http://127.0.0.1:{server.metrics_port()}"
    assert "http://127.0.0.1:8008" in walkthrough and "http://127.0.0.1:9000" in walkthrough
    pasted = walkthrough.replace("http://127.0.0.1:8008", server.base_url).replace(
        "http://127.0.0.1:9000", metrics_url
    )

    def paste() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash"],
            input=pasted,
            cwd=tmp_path,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    first = paste()
    assert first.returncode == 0 and not first.stderr, first.stderr
    printed = first.stdout.splitlines()
    shown = first_output.splitlines()
    counters = [line for line in shown if line.startswith("login_token_module_")]
    assert [line for line in printed if line.startswith("login_token_module_")] == counters
    assert printed[-3:-1] == shown[-3:-1]  # the history's two heading lines
    last = printed[-1]
    assert re.fullmatch(r"\S+Z +[A-Z]{10} +[0-9a-f]{8} +spent +\S+Z +get_token +[A-Z]{10}", last), last
    assert '"M_FORBIDDEN"' in printed[2] and '"retry_after_ms"' in printed[3], printed

    # Pasted again at once: the login throttle stops it at step 2, with one line.
    second = paste()
    assert second.returncode != 0
    assert STOPPED.fullmatch(second.stderr.rstrip("\n")) and second.stderr.count("\n") == 1, second.stderr
    shown_again = second_output.splitlines()
    assert second.stdout.splitlines() == shown_again[:1] == printed[:1]
    assert STOPPED.fullmatch(shown_again[1]), shown_again


LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def without_code_blocks(page: Path) -> str:
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def prose(page: Path) -> str:
    """The page without its code (blocks and inline): text there is not a link."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(page))


def anchors(page: Path) -> set[str]:
    text = without_code_blocks(page)
    return {slug(heading) for heading in re.findall(r"^#+ (.*)$", text, re.MULTILINE)}


def leads_nowhere(page: Path, target: str) -> bool:
    file_part, _, anchor = target.partition("#")
    destination = (page.parent / file_part).resolve() if file_part else page
    if not destination.exists():
        return True
    return bool(anchor) and destination.suffix == ".md" and anchor not in anchors(destination)


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda page: page.name)
def test_every_link_between_the_docs_leads_somewhere(page: Path) -> None:
    # Web addresses (https:, mailto:) are not followed.
    broken = [
        target
        for target in LINK.findall(prose(page))
        if not re.match(r"[a-z]+:", target) and leads_nowhere(page, target)
    ]
    assert not broken, f"{page.relative_to(ROOT)}: links that lead nowhere: {broken}"
