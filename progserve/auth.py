"""API keys -> callers (a tenant, and whether the key is an operator's).

The keys file (`--api-keys FILE`) is JSON mapping the SHA-256 hex digest of each key to
its tenant, so no key is ever stored in the clear. An entry is the tenant's name, or an
object that also gives the key a role (`"user"`, the default, or `"admin"`):

    {"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08": "acme",
     "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752":
         {"tenant": "ops", "role": "admin"}}

An admin key (or any key of a tenant in `observability.admin_tenants`, `admin` by
default: files written before roles existed keep working) may use the operator routes
(`POST /flush_cache`), sees the server's load and every tenant's metrics and traces.
Hash a key with `python -m progserve.auth KEY`. A client sends its key as
`Authorization: Bearer KEY` (what the openai client does) or `X-API-Key: KEY`.
Without a keys file, authentication is off: every caller is the tenant `default` and
an admin (one owner).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AuthenticationError, PermissionDeniedError

DEFAULT_TENANT = "default"
ROLES = ("user", "admin")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(slots=True, frozen=True)
class Caller:
    tenant: str
    admin: bool = False


OWNER = Caller(DEFAULT_TENANT, admin=True)  # every caller when authentication is off
# The ASGI scope key under which the admission middleware leaves the request's `Caller`,
# so that the route does not authenticate the same request a second time.
SCOPE_CALLER = "progserve.caller"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyFileError(ValueError):
    """The keys file is unreadable or holds something other than digests -> tenants."""


class Authenticator:
    """Resolves a request's credentials to a `Caller`."""

    __slots__ = ("_caller_by_digest",)

    def __init__(self, caller_by_digest: Mapping[str, Caller] | None = None):
        self._caller_by_digest = dict(caller_by_digest or {})

    @classmethod
    def from_file(cls, path: Path | None, admin_tenants: Iterable[str] = ()) -> Authenticator:
        """Read a keys file; keys of `admin_tenants` are admins whatever their role."""
        if path is None:
            return cls()
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"cannot read API keys file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise KeyFileError(f"{path}: expected a JSON object of sha256 digest -> tenant")
        admins = set(admin_tenants)
        mapping: dict[str, Caller] = {}
        for digest, entry in data.items():
            digest = str(digest).lower()
            if not _HEX_DIGEST.match(digest):
                raise KeyFileError(
                    f"{path}: {digest[:8]}... is not a sha256 hex digest; store hashed keys "
                    "(python -m progserve.auth KEY), never raw keys"
                )
            tenant, role = _tenant_and_role(path, entry)
            mapping[digest] = Caller(tenant, admin=role == "admin" or tenant in admins)
        return cls(mapping)

    @property
    def enabled(self) -> bool:
        return bool(self._caller_by_digest)

    def caller_for(self, headers: Mapping[str, str]) -> Caller:
        """Who sends the request; raises `AuthenticationError` (401) when keys are
        required and the request has none or an unknown one."""
        if not self._caller_by_digest:
            return OWNER
        key = _presented_key(headers)
        if key is None:
            raise AuthenticationError(
                "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                code="missing_api_key",
            )
        caller = self._caller_by_digest.get(hash_key(key))
        if caller is None:
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        return caller

    def tenant_for(self, headers: Mapping[str, str]) -> str:
        """The caller's tenant (401 as `caller_for`)."""
        return self.caller_for(headers).tenant

    def admin_for(self, headers: Mapping[str, str]) -> Caller:
        """The caller, who must be an admin: 401 as `caller_for`, 403 for a tenant's key."""
        caller = self.caller_for(headers)
        if not caller.admin:
            raise PermissionDeniedError("this route needs an admin key", code="admin_only")
        return caller


def _tenant_and_role(path: Path, entry: Any) -> tuple[str, str]:
    """A keys-file entry: `"tenant"` or `{"tenant": ..., "role": "user" | "admin"}`."""
    if isinstance(entry, dict):
        unknown = set(entry) - {"tenant", "role"}
        if unknown:
            raise KeyFileError(f"{path}: unknown fields {sorted(unknown)} in a key entry")
        tenant, role = entry.get("tenant"), entry.get("role", "user")
    else:
        tenant, role = entry, "user"
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise KeyFileError(f"{path}: tenant {tenant!r} must match {_TENANT.pattern}")
    if role not in ROLES:
        raise KeyFileError(f"{path}: role {role!r} must be one of {', '.join(ROLES)}")
    return tenant, role


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m progserve.auth KEY   (prints the digest for the keys file)")
        return 2
    print(hash_key(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
