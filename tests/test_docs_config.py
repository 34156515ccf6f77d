"""docs/configuration.md names exactly the keys the config parsers accept.

The accepted keys are not listed here: they are read from the parsers
themselves. Each section is fed an unknown key, and the parser's refusal
("unknown option (expected one of: ...)") names the keys it knows there; a key
whose value can be a section of its own (a mapping, or a list of mappings) is
explored the same way, and a key the parser refuses with "must be 'a', 'b' or
'c'" (``store.type``, ``database.name``, ``listeners[].type``) has its section
explored once per choice, since each may accept other keys. A key added to a
parser is thus found without touching this file, and must be documented.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from login_token_module import LoginTokenModule
from login_token_module.config import ConfigError
from login_token_module.host.config import parse_homeserver_config

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
MODULE_HEADING = "## The module's keys"
HOST_HEADING = "## The reference homeserver's keys"
UNKNOWN = "__not_a_key__"
UNKNOWN_OPTION = re.compile(r"unknown option \(expected one of: (.*)\)")
CHOICES = re.compile(r"must be ((?:'[^']+'(?:, | or ))+'[^']+'), got")

# What the host's parser needs before it reaches the other keys (it checks server_name and
# listeners first); every probe of the host is laid over this.
HOST_BASE: dict[str, Any] = {"server_name": "localhost", "listeners": [{"port": 0}]}

Parse = Callable[[Any], object]
KeyPath = list[str | int]


def parse_module(raw: Any) -> object:
    return LoginTokenModule.parse_config(raw)


def parse_host(raw: Any) -> object:
    return parse_homeserver_config(raw, "/nonexistent-config-folder")


def refusal(parse: Parse, raw: Any) -> ConfigError | None:
    try:
        parse(raw)
    except ConfigError as error:
        return error
    return None


def put(raw: Any, path: KeyPath, value: Any) -> Any:
    """A copy of ``raw`` with ``value`` at ``path``; a list step (0) is the list's first entry."""
    if not path:
        return value
    step, rest = path[0], path[1:]
    if isinstance(step, int):
        entry = raw[0] if isinstance(raw, list) and raw else {}
        return [put(entry, rest, value)]
    section = dict(raw) if isinstance(raw, Mapping) else {}
    section[step] = put(section.get(step), rest, value)
    return section


def get(raw: Any, path: KeyPath) -> Any:
    for step in path:
        if isinstance(step, int):
            raw = raw[0] if isinstance(raw, list) and raw else None
        else:
            raw = raw.get(step) if isinstance(raw, Mapping) else None
    return raw


def dotted(path: KeyPath) -> str:
    text = ""
    for step in path:
        text += "[]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def refused_as_unknown_at(parse: Parse, raw: Any, path: KeyPath) -> ConfigError | None:
    error = refusal(parse, raw)
    return (
        error if error is not None and error.path == path and UNKNOWN_OPTION.fullmatch(error.reason) else None
    )


def accepted(parse: Parse, raw: Any, path: KeyPath) -> set[str]:
    """Every key the parser accepts in the section at ``path`` of ``raw``, and under it, dotted."""
    error = refused_as_unknown_at(parse, put(raw, [*path, UNKNOWN], 1), [*path, UNKNOWN])
    assert error is not None, (
        f"an unknown key at {dotted(path) or 'the top level'} was not refused as unknown: "
        f"{refusal(parse, put(raw, [*path, UNKNOWN], 1))} (update this test's probes)"
    )
    match = UNKNOWN_OPTION.fullmatch(error.reason)
    assert match
    found: set[str] = set()
    for key in match.group(1).split(", "):
        here: KeyPath = [*path, key]
        found.add(dotted(here))
        # A section of its own: a mapping...
        if refused_as_unknown_at(parse, put(raw, [*here, UNKNOWN], 1), [*here, UNKNOWN]):
            found |= accepted(parse, put(raw, here, get(raw, here) or {}), here)
        # ... or a list of mappings.
        elif refused_as_unknown_at(parse, put(raw, here, [{UNKNOWN: 1}]), [*here, 0, UNKNOWN]):
            entries = get(raw, here)
            found |= accepted(
                parse, raw if isinstance(entries, list) and entries else put(raw, here, [{}]), [*here, 0]
            )
        # A choice (store.type, database.name, listeners[].type) may change which keys its
        # section and those under it accept: explore the section once per choice.
        if get(raw, here) is None:
            chosen = refusal(parse, put(raw, here, UNKNOWN))
            if chosen is not None and chosen.path == here and (options := CHOICES.search(chosen.reason)):
                for choice in re.findall(r"'([^']+)'", options.group(1)):
                    found |= accepted(parse, put(raw, here, choice), path)
    return found


def documented(heading: str) -> list[str]:
    """The keys in the first column of the tables under ``heading`` in docs/configuration.md."""
    text = PAGE.read_text()
    start = text.find(f"\n{heading}")
    assert start >= 0, f"docs/configuration.md has no {heading!r} section"
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    return re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE)


def compare(parser: str, accepted_keys: set[str], documented_keys: list[str]) -> None:
    duplicates = sorted({key for key in documented_keys if documented_keys.count(key) > 1})
    undocumented = sorted(accepted_keys - set(documented_keys))
    unknown = sorted(set(documented_keys) - accepted_keys)
    problems = []
    if undocumented:
        problems.append(f"accepted by {parser} but not in docs/configuration.md: {', '.join(undocumented)}")
    if unknown:
        problems.append(f"in docs/configuration.md but not accepted by {parser}: {', '.join(unknown)}")
    if duplicates:
        problems.append(f"documented twice in docs/configuration.md: {', '.join(duplicates)}")
    assert not problems, "\n".join(problems)


def test_the_probes_find_keys_of_every_kind() -> None:
    """Top-level keys, sections, lists of sections and keys that only one choice accepts."""
    module = accepted(parse_module, {}, [])
    assert {"token_lifetime_ms", "ratelimit.per_second", "store.path", "store.dsn", "store.cp_max"} <= module
    host = accepted(parse_host, HOST_BASE, [])
    assert {
        "bcrypt_rounds",
        "listeners[].x_forwarded",
        "rc_login.failed_attempts.burst_count",
        "database.args.database",
        "database.args.sslmode",
        "modules[].config",
    } <= host


def test_every_module_key_is_documented_and_every_documented_one_accepted() -> None:
    compare("the module's parse_config", accepted(parse_module, {}, []), documented(MODULE_HEADING))


def test_every_host_key_is_documented_and_every_documented_one_accepted() -> None:
    compare(
        "the reference host's config parser", accepted(parse_host, HOST_BASE, []), documented(HOST_HEADING)
    )
