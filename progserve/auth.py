"""API keys -> tenants.

The keys file (`--api-keys FILE`) is JSON mapping the SHA-256 hex digest of each key to
its tenant, so no key is ever stored in the clear:

    {"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08": "acme"}

Hash a key with `python -m progserve.auth KEY`. A client sends its key as
`Authorization: Bearer KEY` (what the openai client does) or `X-API-Key: KEY`.
Without a keys file, authentication is off and every caller is the tenant `default`.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from .errors import AuthenticationError

DEFAULT_TENANT = "default"
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyFileError(ValueError):
    """The keys file is unreadable or holds something other than digests -> tenants."""


class Authenticator:
    """Resolves a request's credentials to a tenant name."""

    __slots__ = ("_tenant_by_digest",)

    def __init__(self, tenant_by_digest: Mapping[str, str] | None = None):
        self._tenant_by_digest = dict(tenant_by_digest or {})

    @classmethod
    def from_file(cls, path: Path | None) -> Authenticator:
        if path is None:
            return cls()
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise KeyFileError(f"cannot read API keys file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise KeyFileError(f"{path}: expected a JSON object of sha256 digest -> tenant")
        mapping: dict[str, str] = {}
        for digest, tenant in data.items():
            digest = str(digest).lower()
            if not _HEX_DIGEST.match(digest):
                raise KeyFileError(
                    f"{path}: {digest[:8]}... is not a sha256 hex digest; store hashed keys "
                    "(python -m progserve.auth KEY), never raw keys"
                )
            if not isinstance(tenant, str) or not _TENANT.match(tenant):
                raise KeyFileError(f"{path}: tenant {tenant!r} must match {_TENANT.pattern}")
            mapping[digest] = tenant
        return cls(mapping)

    @property
    def enabled(self) -> bool:
        return bool(self._tenant_by_digest)

    def tenant_for(self, headers: Mapping[str, str]) -> str:
        """The caller's tenant; raises `AuthenticationError` (401) when keys are required
        and the request has none or an unknown one."""
        if not self._tenant_by_digest:
            return DEFAULT_TENANT
        key = _presented_key(headers)
        if key is None:
            raise AuthenticationError(
                "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
                code="missing_api_key",
            )
        tenant = self._tenant_by_digest.get(hash_key(key))
        if tenant is None:
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        return tenant


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
