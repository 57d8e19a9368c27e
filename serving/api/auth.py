"""Who is calling: `--api-keys FILE` (lines `KEY TENANT [admin]`) and `Authorization: Bearer KEY`.

Without the file the server is open and single-tenant: every caller is the tenant `default`, with admin rights.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from switchboard.serving.api.errors import ApiError

OPEN_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    admin: bool = False


def read_api_keys(path: Path) -> dict[str, Tenant]:
    """KEY -> Tenant from a keys file; blank lines and `#` comments are skipped."""
    keys: dict[str, Tenant] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != "admin"):
            raise ValueError(f"{path}:{lineno}: expected `KEY TENANT [admin]`")
        key, tenant = fields[0], fields[1]
        if key in keys:
            raise ValueError(f"{path}:{lineno}: key given twice")
        keys[key] = Tenant(tenant, admin=len(fields) == 3)
    if not keys:
        raise ValueError(f"{path}: no keys")
    return keys


class Authenticator:
    """A FastAPI dependency answering the caller's Tenant, or 401."""

    def __init__(self, keys: dict[str, Tenant] | None) -> None:
        self._keys = keys

    @property
    def multi_tenant(self) -> bool:
        return self._keys is not None

    def __call__(self, request: Request) -> Tenant:
        if self._keys is None:
            return Tenant(OPEN_TENANT, admin=True)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            for key, tenant in self._keys.items():  # compare every key in constant time
                if hmac.compare_digest(key.encode(), token.encode()):
                    return tenant
        raise ApiError(
            401,
            "Missing or invalid API key: send `Authorization: Bearer KEY`.",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
