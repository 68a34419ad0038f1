"""The LoraAdapter spec as the operator reads it (pydantic: the CRD is an edge)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

GROUP = "loraplane.io"
VERSION = "v1alpha1"
PLURAL = "loraadapters"
KIND = "LoraAdapter"


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


class SecretRef(_Model):
    name: str = Field(min_length=1, max_length=253)


class S3Source(_Model):
    uri: str = Field(pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$")
    endpoint: str | None = Field(default=None, pattern=r"^https?://")
    region: str | None = None
    credentials_secret_ref: SecretRef | None = Field(default=None, alias="credentialsSecretRef")


class Source(_Model):
    s3: S3Source


class Sharing(_Model):
    public: bool = False
    shared_with: tuple[str, ...] = Field(default=(), alias="sharedWith")


class Placement(_Model):
    nodes: int = Field(default=1, ge=1, le=1000)
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")


class LoraAdapterSpec(_Model):
    """spec of a LoraAdapter; see manifests/crd-loraadapter.yaml for the schema users see."""

    base_model: str = Field(alias="baseModel", min_length=1)
    source: Source
    sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$")
    sharing: Sharing = Sharing()
    placement: Placement = Placement()
