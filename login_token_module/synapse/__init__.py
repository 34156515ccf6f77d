"""Running the module inside Synapse.

Synapse builds every module as ``Module(config, api)`` with its own
``synapse.module_api.ModuleApi``, which is not this project's
:class:`~login_token_module.api.ModuleApi` Protocol. :func:`as_module_api`
recognises Synapse's object and wraps it in :class:`SynapseModuleApi`
(``adapter.py``), which is imported only then: the module installs, imports
and runs without Synapse.

Recognising it needs no import of Synapse: a Synapse ModuleApi can only exist
in a process that has already imported ``synapse.module_api``, so the class is
looked up in ``sys.modules`` and the object checked with ``isinstance``.
"""

from __future__ import annotations

import sys
from typing import Any, cast

from login_token_module.api import ModuleApi

SYNAPSE_MODULE_API = "synapse.module_api"

# Synapse never lets a module serve under /_matrix/client (its client resource is
# a leaf that answers 404 M_UNRECOGNIZED), but serves module resources under
# /_synapse/client. The module's paths move there, keeping the rest of the spec
# path, and the operator's reverse proxy rewrites the spec paths to them.
SPEC_PREFIX = "/_matrix/client/"
SYNAPSE_PREFIX = "/_synapse/client/login_token/"


def synapse_path(spec_path: str) -> str:
    """Where Synapse serves a spec path: ``/_matrix/client/X`` -> ``/_synapse/client/login_token/X``."""
    if not spec_path.startswith(SPEC_PREFIX) or spec_path == SPEC_PREFIX:
        raise ValueError(f"{spec_path!r} is not a client-server API path")
    return SYNAPSE_PREFIX + spec_path[len(SPEC_PREFIX) :]


def served_path(path: str) -> str:
    """Where Synapse serves one of the module's paths: a spec path moves under
    ``/_synapse/client/login_token/`` (:func:`synapse_path`); one already there (the
    pairing paths, which both hosts serve at the same place) stays as it is."""
    if path.startswith(SYNAPSE_PREFIX) and path.isascii() and ".." not in path:
        return path
    return synapse_path(path)


def is_synapse_module_api(api: object) -> bool:
    module = sys.modules.get(SYNAPSE_MODULE_API)
    synapse_class = getattr(module, "ModuleApi", None)
    return isinstance(synapse_class, type) and isinstance(api, synapse_class)


def as_module_api(api: object) -> ModuleApi:
    """``api`` as this project's ModuleApi: Synapse's wrapped in the adapter, any other as it is."""
    if is_synapse_module_api(api):
        from login_token_module.synapse.adapter import SynapseModuleApi

        return SynapseModuleApi(cast(Any, api))
    return cast(ModuleApi, api)
