"""Real responses checked against the Matrix spec's own OpenAPI schemas."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import yaml
from jsonschema import Draft202012Validator

from tests.helpers import GET_TOKEN, LOGIN, InProcessServer

# The spec's own OpenAPI files, kept unchanged in the repository (see spec/README.md).
SPEC_DIR = Path(__file__).resolve().parent.parent / "spec" / "client-server"


@cache
def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _pointer(document: Any, fragment: str) -> Any:
    node = document
    for part in fragment.strip("/").split("/"):
        if part:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _inline(node: Any, path: Path, document: Any) -> Any:
    """``node`` with every ``$ref`` replaced by what it points at (in this or another file)."""
    if isinstance(node, list):
        return [_inline(item, path, document) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = str(node["$ref"])
        file_part, _, fragment = ref.partition("#")
        target_path = (path.parent / file_part).resolve() if file_part else path
        target_document = _load_yaml(target_path) if file_part else document
        target = _inline(_pointer(target_document, fragment), target_path, target_document)
        siblings = {k: _inline(v, path, document) for k, v in node.items() if k != "$ref"}
        # OpenAPI 3.1 allows annotations (description, ...) beside a $ref.
        return {**target, **siblings} if isinstance(target, dict) else target
    return {key: _inline(value, path, document) for key, value in node.items()}


def response_schema(file_name: str, api_path: str, method: str, status: int) -> dict[str, Any]:
    path = SPEC_DIR / file_name
    document = _load_yaml(path)
    raw = document["paths"][api_path][method]["responses"][str(status)]["content"]["application/json"][
        "schema"
    ]
    schema = _inline(raw, path, document)
    assert isinstance(schema, dict)
    return schema


def request_schema(file_name: str, api_path: str, method: str) -> dict[str, Any] | None:
    """The JSON body schema of a request, ``$ref``s inlined; None when the spec gives it no body."""
    path = SPEC_DIR / file_name
    document = _load_yaml(path)
    body = document["paths"][api_path][method].get("requestBody")
    if body is None:
        return None
    schema = _inline(body["content"]["application/json"]["schema"], path, document)
    assert isinstance(schema, dict)
    return schema


def schema_errors(schema: dict[str, Any], instance: Any) -> list[str]:
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(instance)]


def assert_valid(schema: dict[str, Any], instance: Any) -> None:
    errors = schema_errors(schema, instance)
    assert not errors, (instance, errors)


def _contains_ref(node: Any) -> bool:
    if isinstance(node, dict):
        return "$ref" in node or any(_contains_ref(v) for v in node.values())
    if isinstance(node, list):
        return any(_contains_ref(v) for v in node)
    return False


GET_TOKEN_200 = ("login_token.yaml", "/login/get_token", "post", 200)
GET_TOKEN_401 = ("login_token.yaml", "/login/get_token", "post", 401)
GET_TOKEN_429 = ("login_token.yaml", "/login/get_token", "post", 429)
LOGIN_GET_200 = ("login.yaml", "/login", "get", 200)
LOGIN_POST_200 = ("login.yaml", "/login", "post", 200)
CAPABILITIES_200 = ("capabilities.yaml", "/capabilities", "get", 200)
VERSIONS_200 = ("versions.yaml", "/versions", "get", 200)
ALL = [
    GET_TOKEN_200,
    GET_TOKEN_401,
    GET_TOKEN_429,
    LOGIN_GET_200,
    LOGIN_POST_200,
    CAPABILITIES_200,
    VERSIONS_200,
]


# -- the loader and the validator themselves ----------------------------------


def test_spec_folder_is_inside_the_repository() -> None:
    assert (SPEC_DIR / "login_token.yaml").is_file(), SPEC_DIR
    assert SPEC_DIR.is_relative_to(Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize("where", ALL, ids=lambda w: f"{w[0]}:{w[2]}:{w[3]}")
def test_every_ref_is_inlined_and_the_schema_is_valid(where: tuple[str, str, str, int]) -> None:
    schema = response_schema(*where)
    assert not _contains_ref(schema)
    Draft202012Validator.check_schema(schema)


def test_refs_across_files_and_within_a_file_are_followed() -> None:
    # definitions/auth_response.yaml, one file away.
    assert response_schema(*GET_TOKEN_401)["required"] == ["flows"]
    # errors/rate_limited.yaml -> allOf [error.yaml, ...], two files away; allOf stays.
    limited = response_schema(*GET_TOKEN_429)
    assert limited["allOf"][0]["required"] == ["errcode"]
    # '#/components/schemas/booleanCapability' inside capabilities.yaml.
    capabilities = response_schema(*CAPABILITIES_200)["properties"]["capabilities"]
    assert capabilities["properties"]["m.get_login_token"]["required"] == ["enabled"]


@pytest.mark.parametrize(
    ("where", "document"),
    [
        (GET_TOKEN_200, {"login_token": "abc"}),
        (GET_TOKEN_200, {"login_token": 5, "expires_in_ms": 120000}),
        (GET_TOKEN_200, {"login_token": "abc", "expires_in_ms": "120000"}),
        (GET_TOKEN_401, {"session": "abc"}),
        (GET_TOKEN_401, {"flows": [{"stage": ["m.login.password"]}]}),
        (GET_TOKEN_429, {"error": "slow down", "retry_after_ms": 10}),
        (GET_TOKEN_429, {"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1.5}),
        (LOGIN_GET_200, {"flows": [{"get_login_token": True}]}),
        (LOGIN_GET_200, {"flows": [{"type": "m.login.token", "get_login_token": "yes"}]}),
        (LOGIN_POST_200, {"user_id": "@a:b", "access_token": "x"}),
        (LOGIN_POST_200, {"user_id": "alice", "access_token": "x", "device_id": "D"}),
        (CAPABILITIES_200, {"capabilities": {"m.get_login_token": {}}}),
        (CAPABILITIES_200, {"capabilities": {"m.get_login_token": {"enabled": "true"}}}),
        (CAPABILITIES_200, {}),
        (VERSIONS_200, {"versions": ["v1.7"], "unstable_features": {"org.matrix.msc3882": "yes"}}),
        (VERSIONS_200, {"unstable_features": {}}),
    ],
)
def test_wrong_documents_fail_validation(where: tuple[str, str, str, int], document: Any) -> None:
    assert schema_errors(response_schema(*where), document)


# -- real responses ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_token_responses_match_the_spec(server: InProcessServer) -> None:
    client = server.client
    access_token = await client.access_token("alice")

    challenge = await client.post(GET_TOKEN, {}, access_token)
    assert challenge.code == 401
    assert_valid(response_schema(*GET_TOKEN_401), challenge.json)
    assert challenge.json["flows"] == [{"stages": ["m.login.password"]}]

    session = challenge.json["session"]
    wrong = await client.post(
        GET_TOKEN,
        {"auth": {"type": "m.login.password", "password": "wrong", "session": session}},
        access_token,
    )
    assert (wrong.code, wrong.json["errcode"]) == (401, "M_FORBIDDEN")
    assert_valid(response_schema(*GET_TOKEN_401), wrong.json)

    issued = await client.get_login_token(access_token)
    assert issued.code == 200
    assert_valid(response_schema(*GET_TOKEN_200), issued.json)

    # The default rate limit is one token a minute: the next completed UIA gets 429.
    limited = await client.get_login_token(access_token)
    assert limited.code == 429
    assert_valid(response_schema(*GET_TOKEN_429), limited.json)
    assert limited.json["errcode"] == "M_LIMIT_EXCEEDED"
    assert isinstance(limited.json["retry_after_ms"], int)


@pytest_twisted.ensureDeferred
async def test_login_responses_match_the_spec(server: InProcessServer) -> None:
    flows = await server.client.get(LOGIN)
    assert flows.code == 200
    assert_valid(response_schema(*LOGIN_GET_200), flows.json)

    by_password = await server.client.password_login("alice", initial_device_display_name="Phone")
    assert by_password.code == 200
    assert_valid(response_schema(*LOGIN_POST_200), by_password.json)

    issued = await server.client.get_login_token(by_password.json["access_token"])
    by_token = await server.client.token_login(issued.json["login_token"])
    assert by_token.code == 200
    assert_valid(response_schema(*LOGIN_POST_200), by_token.json)


@pytest_twisted.ensureDeferred
async def test_capabilities_and_versions_match_the_spec(server: InProcessServer) -> None:
    access_token = await server.client.access_token("alice")
    capabilities = await server.client.get("/_matrix/client/v3/capabilities", access_token)
    assert capabilities.code == 200
    assert_valid(response_schema(*CAPABILITIES_200), capabilities.json)

    versions = await server.client.get("/_matrix/client/versions")
    assert versions.code == 200
    assert_valid(response_schema(*VERSIONS_200), versions.json)
