"""The gateway's one ``Settings`` class: flags of `loraplane gateway` or LORAPLANE_GATEWAY_* env."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where state lives, where engines are, and how requests are routed to them."""

    model_config = SettingsConfigDict(env_prefix="LORAPLANE_GATEWAY_")

    redis_url: str = "redis://127.0.0.1:6379/0"
    engines: list[str] = Field(default_factory=list)  # static engine base URLs
    k8s_selector: str | None = None  # label selector of engine pods, e.g. app=loraplane-engine
    k8s_namespace: str | None = None  # default: the namespace of the gateway's own pod
    k8s_port: int = 8000  # engine port when the pod names no container port "http"
    k8s_api: str | None = None  # default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
    k8s_token_file: Path | None = None  # default: the pod's service-account token
    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: SecretStr | None = None
    admin_token_file: Path | None = None
    poll_interval_s: float = 1.0  # how often each engine's /residency is read
    discovery_interval_s: float = 5.0  # how often the Kubernetes API is listed
    connect_timeout_s: float = 2.0
    load_epsilon: float = 0.25  # no replica above (1 + epsilon) x the mean load
    concurrency_lease_s: float = 600.0  # a request's concurrency slot expires after this
    max_body_bytes: int = 8 << 20
    log_level: str = "info"

    def admin_secret(self) -> str | None:
        """The admin bearer token, from the file if one is set (its first line), else the env."""
        if self.admin_token_file is not None:
            token = self.admin_token_file.read_text().strip()
            return token or None
        return self.admin_token.get_secret_value() if self.admin_token else None
