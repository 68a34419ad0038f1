"""JSON bodies of the admin API, and the records stores keep."""

from __future__ import annotations

from pydantic import BaseModel, Field

# A tenant is a Kubernetes namespace: a DNS label.
TENANT_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,251}[A-Za-z0-9])?$"


class Limits(BaseModel):
    """Per-tenant limits; None means unlimited."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_concurrent_requests: int | None = Field(default=None, ge=1)


class TenantCreate(BaseModel):
    name: str = Field(pattern=TENANT_PATTERN)
    limits: Limits = Field(default_factory=Limits)


class Tenant(BaseModel):
    name: str
    created: int
    limits: Limits


class KeyCreate(BaseModel):
    name: str = Field(default="", max_length=200)  # a label for people, e.g. "ci"


class KeyInfo(BaseModel):
    id: str
    name: str
    created: int


class KeyCreated(KeyInfo):
    key: str  # shown once, never stored


class AdapterAccess(BaseModel):
    """Who may use an adapter besides its owner (the tenant before the "/" of its id)."""

    public: bool = False
    shared_with: list[str] = Field(default_factory=list)


class AdapterRecord(AdapterAccess):
    """What the registry keeps per adapter: its sharing and the name engines serve it under.

    ``engine_name`` is set by the operator (``<tenant>/<adapter>@<version>``, so a new version
    is a new name and engine caches never mix versions); absent, engines serve the adapter
    under its id (the admin API, `loraplane serve --tenants`).
    """

    engine_name: str | None = Field(default=None, max_length=512)


class Adapter(AdapterRecord):
    id: str

    @property
    def served_as(self) -> str:
        """The model name engines know this adapter by."""
        return self.engine_name or self.id


class Usage(BaseModel):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TenantUsage(BaseModel):
    tenant: str
    total: Usage
    models: dict[str, Usage]


def adapter_owner(model_id: str) -> str | None:
    """The tenant of ``<tenant>/<adapter>``; None if the id has no tenant part."""
    tenant, sep, name = model_id.partition("/")
    return tenant if sep and tenant and name else None
