"""Per-tenant cache salts: a cache hit must never cross tenants.

A prefix-cache hit is information: a tenant whose prompt comes back with
`cached_tokens` close to its length (or answers sooner) learns that someone sent that
text. So every engine request carries its tenant's `cache_salt` and engines share cached
prefixes only within a salt: the embedded engines keep a radix namespace per salt, HTTP
engines pass it upstream (vLLM's `cache_salt`), and the router's approximate trees are
namespaced the same way. `cache.share_across_tenants` turns this off (no salt: one
shared namespace) for deployments with a single owner.

A salt is a keyed hash of the tenant name, not the name itself, so upstream engines and
their logs never see tenant names, and with `cache.salt_secret` set nobody who reaches
an upstream directly can compute a tenant's salt.
"""

from __future__ import annotations

import hashlib
import hmac

from .config import CacheConfig

SALT_HEX_DIGITS = 32


def tenant_cache_salt(config: CacheConfig, tenant: str) -> str | None:
    """The salt of `tenant`'s requests; None when every tenant shares the cache."""
    if config.share_across_tenants:
        return None
    secret = config.salt_secret.get_secret_value().encode()
    digest = hmac.new(secret, b"progserve-cache-salt\0" + tenant.encode(), hashlib.sha256)
    return digest.hexdigest()[:SALT_HEX_DIGITS]
