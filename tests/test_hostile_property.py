"""Hostile input, property-based: every request a client can send is answered, fast,
with a Matrix error or the endpoint's normal answer, and the server keeps serving.

Hypothesis builds requests for every endpoint the module and the reference host
serve: the JSON bodies from the Matrix spec's own request schemas (``spec/``),
each field filled with hostile values (lone surrogates written as JSON escapes
such as ``"\\ud800"``, NUL and other control characters, bidi marks,
10,000-character strings, huge and non-finite numbers as raw JSON text such as
``1e999`` and ``NaN``, wrong types, nested objects, duplicate keys, bytes that
are not JSON), with hostile query strings, ``Authorization`` headers, methods
and spellings of the path. Each request goes over real HTTP to a real listening
host (``login-token-module serve``, SQLite, UIA sessions in it too) and must be answered within 5 s with:

- a 4xx whose body holds a string ``errcode`` and a string ``error`` (a
  get_token UIA challenge instead matches the spec's 401 schema), or
- the endpoint's normal answer (a 2xx whose body matches the spec's response
  schema; empty for HEAD);

never a 5xx. After each request a plain ``GET /_matrix/client/versions`` must
still be answered, and a live login token sent to ``/login`` must still sign in
unless that request itself signed in (nothing a refused request sends is spent).

Two answers come from below the server's code, from Twisted's HTTP parser,
before any resource sees the request: a header value holding NUL, CR or LF, or a
request line and headers over 16 KB, get a bodiless 400 or the connection closed
at once. Both are accepted, for those requests only.

CI runs a fixed number of examples with a fixed seed (60 per endpoint, 240 for the
endpoints with a body: about 30 s). A longer, freshly random hunt (N per endpoint, 4N
for those with a body; 5000 takes about 20 minutes)::

    HOSTILE_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_hostile_property.py -q -x
"""

from __future__ import annotations

import http.client
import json
import math
import os
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from login_token_module.tokens import TOKEN_LENGTH
from tests.helpers import (
    LOGIN,
    PASSWORD,
    ChildServer,
    cli,
    homeserver_yaml,
    start_child,
    write_config,
)
from tests.test_spec_schemas import request_schema, response_schema, schema_errors

# -- how long, how many -----------------------------------------------------------------

ANSWER_WITHIN_S = 5.0
LONG_RUN = int(os.environ.get("HOSTILE_EXAMPLES", "0"))
# Per endpoint: the endpoints whose bodies the spec describes get four times as many.
EXAMPLES = LONG_RUN or 60
HOSTILE_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # CI: the same examples every run. A long run draws new ones each time (Hypothesis
    # prints the seed and a reproduction blob on failure).
    derandomize=not LONG_RUN,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
WITH_BODY_SETTINGS = settings(HOSTILE_SETTINGS, max_examples=4 * EXAMPLES)

SERVER_NAME = "test.local"
# Twisted's HTTP parser closes the connection on a request line or headers longer than this.
PARSER_LIMIT = 16_384
USER = "alice"


# -- the endpoints, from the spec -------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    # Every path it is served at (the host serves its endpoints under v3 and r0).
    paths: tuple[str, ...]
    needs_auth: bool
    # (spec file, spec path, spec method): where its body and answers are described.
    spec: tuple[str, str, str]

    @property
    def body_schema(self) -> dict[str, Any] | None:
        return request_schema(*self.spec)

    def answer_schema(self, status: int) -> dict[str, Any]:
        return response_schema(*self.spec, status)


def _client(*tails: str) -> tuple[str, ...]:
    return tuple(f"/_matrix/client/{version}{tail}" for tail in tails for version in ("v3", "r0"))


LOGIN_SPEC = ("login.yaml", "/login", "post")
GET_TOKEN_SPEC = ("login_token.yaml", "/login/get_token", "post")
ENDPOINTS = [
    Endpoint("get_token", "POST", ("/_matrix/client/v1/login/get_token",), True, GET_TOKEN_SPEC),
    Endpoint(
        "get_token_unstable_r1",
        "POST",
        ("/_matrix/client/unstable/org.matrix.msc3882/login/get_token",),
        True,
        GET_TOKEN_SPEC,
    ),
    Endpoint(
        "get_token_unstable_r0",
        "POST",
        ("/_matrix/client/unstable/org.matrix.msc3882/login/token",),
        True,
        GET_TOKEN_SPEC,
    ),
    Endpoint("login_post", "POST", _client("/login"), False, LOGIN_SPEC),
    Endpoint("login_get", "GET", _client("/login"), False, ("login.yaml", "/login", "get")),
    Endpoint("logout", "POST", _client("/logout"), True, ("logout.yaml", "/logout", "post")),
    Endpoint("logout_all", "POST", _client("/logout/all"), True, ("logout.yaml", "/logout/all", "post")),
    Endpoint(
        "capabilities", "GET", _client("/capabilities"), True, ("capabilities.yaml", "/capabilities", "get")
    ),
    Endpoint("whoami", "GET", _client("/account/whoami"), True, ("whoami.yaml", "/account/whoami", "get")),
    Endpoint("versions", "GET", ("/_matrix/client/versions",), False, ("versions.yaml", "/versions", "get")),
]


# -- hostile values ---------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text written as it is: numbers Python's json module would not write (1e999, NaN)."""

    text: str


class Live:
    """Stands for a value the server made, fetched just before the request is sent."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"<live {self.kind}>"


LIVE_TOKEN = Live("login token")
LIVE_SESSION = Live("UIA session")

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "a\ud800b", "\udc00\ud800", "\ud83d"]
CONTROLS = [
    "\x00",
    "a\x00b",
    "\x01",
    "\x07",
    "\x08",
    "\t",
    "\n",
    "\r\n",
    "\x1b[31m",
    "\x7f",
    "\x85",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\ufffe",
    "\uffff",
    "\U0010ffff",
]
BIDI = [
    "\u202e",
    "\u202d",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
    "\u200e",
    "\u200f",
    "\u061c",
    "ab\u202ecd",
]
INJECTION = [
    "",
    " ",
    '"',
    "\\",
    "=",
    "a b=c",
    "%s%s%n",
    "{0}{__class__}",
    "' OR 1=1 --",
    "\n2026-01-01 00:00:00,000 INFO login_token_module.audit: login token event=spend outcome=spent"
    f" user_id=@admin:{SERVER_NAME}",
    "../../etc/passwd",
    "<script>",
]
SPECIAL_STRINGS = SURROGATES + CONTROLS + BIDI + INJECTION
LONG_UNITS = ["A", "\u00e9", "\ud800", "\x00", "\u202e", "\U0001f600", "\\"]


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn ``weight`` times as often (``st.one_of`` weighs its
    distinct strategies alike, repeated ones included)."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(
        lambda strategy: strategy
    )


SPECIAL_CHARS = sorted({c for text in SURROGATES + CONTROLS + BIDI for c in text})
hostile_chars = st.one_of(
    st.sampled_from(SPECIAL_CHARS),
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(exclude_categories=()),  # anything, surrogates included
)
hostile_strings = weighted(
    # What the boundary must refuse, most often: lone surrogates and NUL.
    (3, st.sampled_from([*SURROGATES, "\x00", "a\x00b"])),
    (2, st.sampled_from(SPECIAL_STRINGS)),
    (2, st.text(hostile_chars, min_size=1, max_size=24)),
    (
        1,
        st.builds(
            lambda a, b, c: a + b + c,
            st.text(hostile_chars, max_size=8),
            st.sampled_from(SPECIAL_STRINGS),
            st.text(hostile_chars, max_size=8),
        ),
    ),
    # 10,000 characters (a lone surrogate's escape is 6 bytes: 60 KB).
    (
        1,
        st.builds(
            lambda unit, n: unit * n, st.sampled_from(LONG_UNITS), st.sampled_from([10_000, 9_999, 256])
        ),
    ),
)
RAW_NUMBERS = [
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    "-0",
    "1e-999",
    "1" + "0" * 5000,
    "-" + "9" * 400,
    "1.7976931348623157e309",
    "123456789012345678901234567890.5",
    "1E+2",
    "0.0000000000000000000000000001",
]
hostile_numbers = st.one_of(
    st.sampled_from(RAW_NUMBERS).map(Raw),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.none() | st.booleans() | hostile_numbers | hostile_strings
hostile_json = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_strings, children, max_size=4),
    max_leaves=10,
)
deeply_nested = st.integers(min_value=2, max_value=3000).flatmap(
    lambda depth: st.sampled_from([Raw("[" * depth + "]" * depth), Raw('{"a":' * depth + "1" + "}" * depth)])
)
# A token of the right shape whose last part is not the checksum alphabet's.
CHECKSUM_LENGTH = 6
BODY_LENGTH = TOKEN_LENGTH - len("mlt_") - 1 - CHECKSUM_LENGTH
token_shaped = st.builds(
    lambda body, checksum: "mlt_" + body + "_" + checksum,
    st.text(string.digits + string.ascii_letters, min_size=BODY_LENGTH, max_size=BODY_LENGTH),
    st.text(hostile_chars, min_size=CHECKSUM_LENGTH, max_size=CHECKSUM_LENGTH),
)

# Values that let a request get past the first checks, field by field.
ANCHORS: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["m.login.password", "m.login.token", "m.login.dummy", "m.id.user"]),
    "user": st.sampled_from([USER, f"@{USER}:{SERVER_NAME}", f"@{USER.upper()}:{SERVER_NAME}"]),
    "password": st.just(PASSWORD),
    "token": st.just(LIVE_TOKEN) | token_shaped,
    "session": st.just(LIVE_SESSION),
}

# Fields the spec describes in prose rather than in the schema's properties: the
# m.login.password UIA stage's (auth_data allows any further keys for them).
AUTH_STAGE_FIELDS: dict[str, Any] = {
    "password": {"type": "string"},
    "user": {"type": "string"},
    "identifier": {"type": "object", "properties": {"type": {"type": "string"}, "user": {"type": "string"}}},
}


def _merged(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``allOf`` parts folded in (enough for the spec's request bodies)."""
    merged = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema.get("allOf", []):
        part = _merged(part)
        merged.setdefault("type", part.get("type"))
        merged["properties"] = {**part.get("properties", {}), **merged.get("properties", {})}
        if "additionalProperties" in part:
            merged.setdefault("additionalProperties", part["additionalProperties"])
    return merged


def field_values(name: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values for one field: of its type but hostile, of the wrong type, or an anchor."""
    schema = _merged(schema)
    kind = schema.get("type")
    right: st.SearchStrategy[Any]
    if kind == "object" or "properties" in schema:
        right = objects(schema, stage_fields=AUTH_STAGE_FIELDS if name == "auth" else None)
    elif kind == "string":
        right = hostile_strings
    elif kind in ("integer", "number"):
        right = hostile_numbers
    elif kind == "boolean":
        right = st.booleans()
    else:
        right = hostile_json
    choices = [(2, right), (1, hostile_json), (1, deeply_nested)]
    if name in ANCHORS:
        choices.append((2, ANCHORS[name]))
    return weighted(*choices)


def objects(schema: dict[str, Any], stage_fields: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """JSON objects shaped like ``schema``: some of its fields, hostile, and maybe extra keys."""
    schema = _merged(schema)
    properties = dict(schema.get("properties", {}))
    properties.update(stage_fields or {})
    shaped = st.fixed_dictionaries(
        {}, optional={name: field_values(name, sub) for name, sub in properties.items()}
    )
    extra = st.dictionaries(hostile_strings, hostile_json, max_size=2)
    return st.builds(lambda base, more: {**more, **base}, shaped, extra)


# -- requests -----------------------------------------------------------------------------


def render(value: Any, live: Callable[[Live], str]) -> str:
    """JSON text for ``value``: strings as ``json.dumps`` writes them (ASCII, so a lone
    surrogate is ``\\ud800``), Raw as written, Live replaced by what ``live`` fetches."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Live):
        return json.dumps(live(value))
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{render(v, live)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v, live) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        raise AssertionError("non-finite floats are drawn as Raw")
    return json.dumps(value)


@dataclass(frozen=True)
class Duplicate:
    """A JSON object holding one key twice: the first value is plain, the second hostile."""

    key: str
    first: Any
    second: Any
    rest: dict[str, Any] = field(default_factory=dict)


def body_text(body: Any, live: Callable[[Live], str]) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, Duplicate):
        rest = render(body.rest, live)[1:-1]
        pair = f"{json.dumps(body.key)}:{render(body.first, live)},{json.dumps(body.key)}:"
        text = "{" + pair + render(body.second, live) + ("," + rest if rest else "") + "}"
    else:
        text = render(body, live)
    return text.encode("ascii")  # json.dumps escapes everything else


# Valid requests, as a client would send them: the starting points hostile fields go into.
BASELINES: dict[tuple[str, str, str], list[dict[str, Any]]] = {
    LOGIN_SPEC: [
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": USER},
            "password": PASSWORD,
            "device_id": "PHONE",
            "initial_device_display_name": "Phone",
        },
        {"type": "m.login.token", "token": LIVE_TOKEN, "device_id": "NEWPHONE"},
        {"type": "m.login.token", "token": LIVE_TOKEN, "initial_device_display_name": "New phone"},
    ],
    GET_TOKEN_SPEC: [
        {"auth": {"type": "m.login.password", "session": LIVE_SESSION, "password": PASSWORD}},
        {
            "auth": {
                "type": "m.login.password",
                "session": LIVE_SESSION,
                "identifier": {"type": "m.id.user", "user": USER},
                "password": PASSWORD,
            }
        },
        {"auth": {"type": "m.login.password", "password": PASSWORD}},
        {},
    ],
}


def field_schemas(schema: dict[str, Any], stage_fields: bool = True) -> dict[tuple[str, ...], dict[str, Any]]:
    """Every field a body of ``schema`` can hold, by its path (objects' fields one level down)."""
    found: dict[tuple[str, ...], dict[str, Any]] = {}
    properties = dict(_merged(schema).get("properties", {}))
    for name, sub in properties.items():
        found[(name,)] = sub
        inner = dict(_merged(sub).get("properties", {}))
        if name == "auth" and stage_fields:
            inner.update(AUTH_STAGE_FIELDS)
        for inner_name, inner_sub in inner.items():
            found[(name, inner_name)] = inner_sub
            for deepest, deepest_sub in _merged(inner_sub).get("properties", {}).items():
                found[(name, inner_name, deepest)] = deepest_sub
    return found


def hostile_value(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A value for a field of ``schema``: its type but hostile (most often), or another type."""
    kind = _merged(schema).get("type")
    right = {"string": hostile_strings, "integer": hostile_numbers, "number": hostile_numbers}.get(
        str(kind), hostile_json
    )
    return weighted((3, right), (1, hostile_json), (1, deeply_nested))


def with_field(body: Any, path: tuple[str, ...], value: Any) -> Any:
    """``body`` (a copy) with the field at ``path`` set to ``value`` (objects made on the way)."""
    if not path:
        return value
    copy = dict(body) if isinstance(body, dict) else {}
    copy[path[0]] = with_field(copy.get(path[0]), path[1:], value)
    return copy


@st.composite
def mutated(draw: st.DrawFn, baselines: list[dict[str, Any]], schema: dict[str, Any]) -> Any:
    """A valid request with one to three of its fields (of those the spec gives) made hostile."""
    body = draw(st.sampled_from(baselines))
    fields = field_schemas(schema)
    # Mostly one field: a request with one bad field shows which check lets it through.
    count = draw(st.sampled_from([1, 1, 1, 2, 3]))
    paths = draw(st.lists(st.sampled_from(sorted(fields)), min_size=count, max_size=count, unique=True))
    for path in paths:
        body = with_field(body, path, draw(hostile_value(fields[path]), label="/".join(path)))
    return body


def bodies(endpoint: Endpoint) -> st.SearchStrategy[Any]:
    """Request bodies: valid ones with hostile fields, others shaped by the spec's schema
    (when it has one), or any hostile JSON or bytes."""
    schema = endpoint.body_schema
    not_json = st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"\xff\xfe{}", b"\xef\xbb\xbf{}", b'{"type":"m.login.password"} trailing', b"{"]),
        st.sampled_from([b'{"type":"\xed\xa0\x80"}', b'{"type":"\xc0\x80"}', b'{"a":"\x00"}']),
    )
    if schema is None:
        # No body in the spec (GET, logout): most requests send none.
        return weighted((3, st.none()), (1, st.just(b"{}")), (1, hostile_json), (1, not_json))
    shaped = objects(schema)
    hostile_fields = mutated(BASELINES[endpoint.spec], schema)
    duplicates = st.builds(
        Duplicate,
        st.sampled_from(sorted(_merged(schema).get("properties", {})) or ["type"]),
        st.just("m.login.password"),
        hostile_json,
        hostile_fields,
    )
    return weighted(
        (10, hostile_fields),
        (2, shaped),
        (1, hostile_json),
        (1, deeply_nested),
        (1, duplicates),
        (1, not_json),
    )


def _encode_query_part(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


queries = weighted(
    (3, st.just("")),
    (
        1,
        st.lists(
            st.tuples(st.sampled_from(["access_token", "user_id", "x"]) | hostile_strings, hostile_strings),
            min_size=1,
            max_size=3,
        ).map(lambda pairs: "&".join(f"{_encode_query_part(k)}={_encode_query_part(v)}" for k, v in pairs)),
    ),
    (1, st.sampled_from(["%zz", "%", "access_token=%00", "access_token=%ED%A0%80", "a=" + "b" * 10_000])),
)

HEADER_SAFE = [
    b"Bearer mat_x",
    b"Basic YWxpY2U6eA==",
    b"Bearer",
    b"Bearer ",
    b"bearer  spaced  ",
    b"\xff\xfe",
]
hostile_header_values = st.one_of(
    st.sampled_from(HEADER_SAFE),
    # Any bytes but CR and LF, which the client library refuses to send.
    st.binary(max_size=40).map(lambda b: b"Bearer " + b.replace(b"\r", b"").replace(b"\n", b"")),
    hostile_strings.map(lambda s: b"Bearer " + s.encode("utf-8", "surrogatepass")[:20_000]),
).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def method_spellings(method: str) -> st.SearchStrategy[str]:
    mixed = "".join(c.lower() if i % 2 else c for i, c in enumerate(method))
    others = ["OPTIONS", "PUT", "DELETE", "PATCH", "PROPFIND", "FOO", mixed, method.lower()]
    if method == "GET":
        others.append("HEAD")
    return weighted((4, st.just(method)), (1, st.sampled_from(others)))


def path_spellings(paths: tuple[str, ...]) -> st.SearchStrategy[str]:
    def respell(path: str, index: int, how: int) -> str:
        index %= len(path)
        char = path[index]
        if how == 0 and char != "/":  # one character percent-encoded: %76ersions
            return path[:index] + f"%{ord(char):02x}" + path[index + 1 :]
        if how == 1:
            return path + "/"
        if how == 2:
            return path.replace("/", "//", 1)
        if how == 3:
            return path + "%00"
        if how == 4:
            return path + "/%2e%2e"
        return path[:index] + "%ED%A0%80" + path[index:]

    plain = st.sampled_from(paths)
    respelled = st.builds(respell, plain, st.integers(0, 200), st.integers(0, 5))
    return weighted((4, plain), (1, respelled))


@dataclass
class HostileRequest:
    method: str
    path: str
    query: str
    # None: a valid access token of the user's (for endpoints that need one); b"": none.
    authorization: bytes | None
    body: Any

    @property
    def refused_by_parser(self) -> bool:
        """Whether Twisted's HTTP parser refuses this request before any resource sees it:
        a header holding NUL, CR or LF, or a request line and headers over its 16 KB
        (give or take the headers the client adds)."""
        authorization = self.authorization or b""
        if any(b in authorization for b in b"\x00\r\n"):
            return True
        size = len(self.method) + len(self.path) + len(self.query) + len(authorization)
        return size + 512 > PARSER_LIMIT


def requests(endpoint: Endpoint) -> st.SearchStrategy[HostileRequest]:
    authorization: st.SearchStrategy[bytes | None] = weighted(
        (8 if endpoint.needs_auth else 1, st.none()), (1, st.just(b"")), (1, hostile_header_values)
    )
    return st.builds(
        HostileRequest,
        method_spellings(endpoint.method),
        path_spellings(endpoint.paths),
        queries,
        authorization,
        bodies(endpoint),
    )


# -- the server -----------------------------------------------------------------------------


CLOSED = 0  # Answer.status when the connection was closed without an answer


@dataclass
class Answer:
    status: int
    body: Any
    raw: bytes
    seconds: float


def send(
    port: int,
    method: str,
    target: str,
    body: bytes | None = None,
    headers: dict[str, bytes] | None = None,
    within: float = ANSWER_WITHIN_S,
) -> Answer:
    """One request on a new connection; the answer must come ``within`` seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=within)
    started = time.monotonic()
    try:
        conn.putrequest(method, target, skip_host=False, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        reply = conn.getresponse()
        status, raw = reply.status, reply.read()
    except TimeoutError:
        raise AssertionError(f"no answer within {within} s to {method} {target[:200]!r}") from None
    except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
        status, raw = CLOSED, b""  # closed without an answer
    finally:
        conn.close()
    seconds = time.monotonic() - started
    parsed: Any = raw
    if raw:
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw
    return Answer(status, parsed, raw, seconds)


@dataclass
class Host:
    """The listening host, its user, and the live values requests can carry."""

    server: ChildServer

    def __post_init__(self) -> None:
        self.access = self.login()

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, method: str, path: str, body: Any = None, access: str | None = None) -> Answer:
        headers = {"Authorization": f"Bearer {access}".encode()} if access else {}
        data = None if body is None else json.dumps(body).encode()
        return send(self.port, method, path, data, headers)

    def login(self) -> str:
        body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": USER}}
        answer = self.call("POST", LOGIN, {**body, "password": PASSWORD})
        assert answer.status == 200, answer
        return str(answer.body["access_token"])

    def session(self, path: str) -> str:
        answer = self.call("POST", path, {}, self.access)
        assert answer.status == 401, answer
        return str(answer.body["session"])

    def mint(self) -> str:
        path = ENDPOINTS[0].paths[0]
        auth = {"type": "m.login.password", "password": PASSWORD, "session": self.session(path)}
        answer = self.call("POST", path, {"auth": auth}, self.access)
        assert answer.status == 200, answer
        return str(answer.body["login_token"])

    def token_login(self, token: str) -> Answer:
        return self.call("POST", LOGIN, {"type": "m.login.token", "token": token})

    def still_serving(self) -> None:
        answer = self.call("GET", "/_matrix/client/versions")
        assert answer.status == 200 and isinstance(answer.body, dict), answer
        assert "versions" in answer.body, answer

    def access_still_valid(self) -> None:
        if self.call("GET", "/_matrix/client/v3/account/whoami", access=self.access).status != 200:
            self.access = self.login()


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    folder = tmp_path_factory.mktemp("hostile")
    generous = {"per_second": 100_000, "burst_count": 100_000}
    raw = homeserver_yaml(
        Path(folder),
        {
            # UIA sessions and rate limits in the SQLite file too, as under several workers.
            "store": {"type": "sqlite", "path": "tokens.db", "shared_state": True},
            "ratelimit": generous,
            "failed_auth_ratelimit": generous,
        },
    )
    config = write_config(Path(folder), raw)
    assert cli("register-user", "-c", str(config), USER, stdin=PASSWORD).returncode == 0
    server = start_child(config)
    try:
        yield Host(server)
        assert server.terminate() == 0
    finally:
        server.kill_all()
    assert "Traceback" not in server.log(), server.log()[-5000:]


# -- judging an answer ------------------------------------------------------------------------


def _is_challenge(endpoint: Endpoint, answer: Answer) -> bool:
    return endpoint.spec == GET_TOKEN_SPEC and answer.status == 401 and "errcode" not in answer.body


def judge(endpoint: Endpoint, request: HostileRequest, answer: Answer) -> None:
    """An error a client can read, or the endpoint's normal answer; never a 5xx."""
    status, body = answer.status, answer.body
    assert answer.seconds < ANSWER_WITHIN_S, f"answered after {answer.seconds:.1f} s"
    if request.refused_by_parser and (status == CLOSED or (status == 400 and not answer.raw)):
        return  # see the module docstring
    assert status != CLOSED, "the connection was closed without an answer"
    assert status < 500, f"server error {status}: {answer.raw[:300]!r}"
    assert 200 <= status < 500, f"unexpected status {status}: {answer.raw[:300]!r}"
    method = request.method.upper()
    if method == "HEAD":  # the status alone, whatever it is
        assert answer.raw == b"", answer.raw[:300]
        return
    if status >= 400:
        assert isinstance(body, dict), f"a {status} without a JSON object: {answer.raw[:300]!r}"
        assert "login_token" not in body and "access_token" not in body, body
        if _is_challenge(endpoint, answer):
            assert not schema_errors(endpoint.answer_schema(401), body), body
            assert isinstance(body.get("session"), str), body
            return
        assert isinstance(body.get("errcode"), str), f"a {status} without a string errcode: {body!r}"
        assert isinstance(body.get("error"), str), f"a {status} without a string error: {body!r}"
        return
    assert isinstance(body, dict), f"a {status} without a JSON object: {answer.raw[:300]!r}"
    if method == "OPTIONS":
        assert body == {}, body
        return
    assert status == 200, (status, body)
    assert method == endpoint.method, f"{request.method} answered as {endpoint.method}: {body!r}"
    errors = schema_errors(endpoint.answer_schema(200), body)
    assert not errors, (body, errors)


# -- the property -----------------------------------------------------------------------------


ENDPOINT = {endpoint.name: endpoint for endpoint in ENDPOINTS}


def check(host: Host, name: str, data: st.DataObject) -> None:
    """Send one hostile request to endpoint ``name`` and judge what comes back."""
    endpoint = ENDPOINT[name]
    request = data.draw(requests(endpoint), label="request")
    # Logging out ends the session the next requests use: those get one of their own.
    logs_out = endpoint.name.startswith("logout")
    access = host.login() if logs_out else host.access
    minted: list[str] = []

    def live(value: Live) -> str:
        if value is LIVE_TOKEN:
            minted.append(host.mint())
            return minted[-1]
        return host.session(endpoint.paths[0])

    body = None if request.body is None else body_text(request.body, live)
    headers: dict[str, bytes] = {}
    if request.authorization is None:
        if endpoint.needs_auth:
            headers["Authorization"] = f"Bearer {access}".encode()
    elif request.authorization:
        headers["Authorization"] = request.authorization
    target = request.path + (f"?{request.query}" if request.query else "")

    answer = send(host.port, request.method, target, body, headers)
    judge(endpoint, request, answer)

    host.still_serving()
    signed_in = answer.status == 200 and isinstance(answer.body, dict) and "access_token" in answer.body
    if not signed_in:
        for token in minted:
            again = host.token_login(token)
            assert again.status == 200, f"a refused request spent its login token: {again.body!r}"
    if logs_out:
        host.access_still_valid()


# One test per endpoint (pytest-twisted wraps a Hypothesis test once per function object,
# so the endpoints cannot be pytest parameters of one test).


@WITH_BODY_SETTINGS
@given(data=st.data())
def test_get_token(host: Host, data: st.DataObject) -> None:
    check(host, "get_token", data)


@WITH_BODY_SETTINGS
@given(data=st.data())
def test_get_token_unstable_r1(host: Host, data: st.DataObject) -> None:
    check(host, "get_token_unstable_r1", data)


@WITH_BODY_SETTINGS
@given(data=st.data())
def test_get_token_unstable_r0(host: Host, data: st.DataObject) -> None:
    check(host, "get_token_unstable_r0", data)


@WITH_BODY_SETTINGS
@given(data=st.data())
def test_login_post(host: Host, data: st.DataObject) -> None:
    check(host, "login_post", data)


@HOSTILE_SETTINGS
@given(data=st.data())
def test_login_get(host: Host, data: st.DataObject) -> None:
    check(host, "login_get", data)


@HOSTILE_SETTINGS
@given(data=st.data())
def test_logout(host: Host, data: st.DataObject) -> None:
    check(host, "logout", data)


@HOSTILE_SETTINGS
@given(data=st.data())
def test_logout_all(host: Host, data: st.DataObject) -> None:
    check(host, "logout_all", data)


@HOSTILE_SETTINGS
@given(data=st.data())
def test_capabilities(host: Host, data: st.DataObject) -> None:
    check(host, "capabilities", data)


@HOSTILE_SETTINGS
@given(data=st.data())
def test_whoami(host: Host, data: st.DataObject) -> None:
    check(host, "whoami", data)


@HOSTILE_SETTINGS
@given(data=st.data())
def test_versions(host: Host, data: st.DataObject) -> None:
    check(host, "versions", data)


def test_the_strategies_reach_every_endpoint_and_hostile_kind() -> None:
    """The spec gives bodies to login and get_token; the strategies draw from it."""
    login = request_schema(*LOGIN_SPEC)
    get_token = request_schema(*GET_TOKEN_SPEC)
    assert login is not None and {"type", "device_id", "initial_device_display_name", "token"} <= set(
        login["properties"]
    )
    assert get_token is not None and "auth" in get_token["properties"]
    auth = _merged(get_token["properties"]["auth"])
    assert {"type", "session"} <= set(auth["properties"])
    # Every endpoint has its test here, and its normal answer is described in the spec.
    tests = {name[len("test_") :] for name in globals() if name.startswith("test_")}
    assert set(ENDPOINT) <= tests
    for endpoint in ENDPOINTS:
        assert endpoint.answer_schema(200)
    # A lone surrogate goes out as an escape, exactly as a client's json.dumps writes it.
    assert body_text({"type": "\ud800"}, str) == b'{"type":"\\ud800"}'
    assert body_text({"n": Raw("1e999")}, str) == b'{"n":1e999}'
