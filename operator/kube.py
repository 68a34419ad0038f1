"""A tiny Kubernetes client for what Kopf does not do for us: reading S3 credential Secrets and
writing a LoraAdapter's status while a handler still runs (Kopf applies its patch only after)."""

from __future__ import annotations

import base64
import logging
import ssl
from typing import Any

import aiohttp

from loraplane.operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("loraplane.operator.kube")


class SecretError(Exception):
    """A referenced Secret is missing or lacks the keys; transient says whether to retry."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def _ssl_context(conn: Any) -> ssl.SSLContext | bool:
    if conn.insecure:
        return False
    ctx = ssl.create_default_context(cafile=conn.ca_path or None,
                                     cadata=(conn.ca_data.decode() if isinstance(conn.ca_data,
                                                                                 bytes)
                                             else conn.ca_data))
    if conn.certificate_path and conn.private_key_path:
        ctx.load_cert_chain(conn.certificate_path, conn.private_key_path)
    return ctx


class KubeClient:
    """Secrets and LoraAdapter status over the API, with the operator's own credentials."""

    def __init__(self, conn: Any) -> None:  # a kopf.ConnectionInfo
        self._conn = conn
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {}
            if self._conn.token:
                headers["Authorization"] = f"{self._conn.scheme or 'Bearer'} {self._conn.token}"
            auth = (aiohttp.BasicAuth(self._conn.username, self._conn.password or "")
                    if self._conn.username else None)
            ssl_arg = _ssl_context(self._conn) if self._conn.server.startswith("https") else None
            self._session = aiohttp.ClientSession(
                base_url=self._conn.server.rstrip("/") + "/", headers=headers, auth=auth,
                connector=aiohttp.TCPConnector(ssl=ssl_arg if ssl_arg is not None else True),
                timeout=aiohttp.ClientTimeout(total=10))
        return self._session

    async def s3_credentials(self, namespace: str, name: str) -> tuple[str, str]:
        """(access key id, secret access key) from keys accessKeyId/secretAccessKey (or the
        AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY names)."""
        try:
            async with self._open().get(f"api/v1/namespaces/{namespace}/secrets/{name}") as r:
                if r.status == 404:
                    raise SecretError(f"secret {namespace}/{name} not found", transient=True)
                if r.status != 200:
                    raise SecretError(f"reading secret {namespace}/{name}: HTTP {r.status}",
                                      transient=True)
                data = (await r.json()).get("data") or {}
        except aiohttp.ClientError as e:
            raise SecretError(f"reading secret {namespace}/{name}: {e}", transient=True) from None

        def pick(*keys: str) -> str | None:
            for k in keys:
                if k in data:
                    return base64.b64decode(data[k]).decode()
            return None

        key_id = pick("accessKeyId", "AWS_ACCESS_KEY_ID")
        secret = pick("secretAccessKey", "AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            raise SecretError(f"secret {namespace}/{name} lacks accessKeyId/secretAccessKey",
                              transient=False)
        return key_id, secret

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge-patch a LoraAdapter's status now; False (logged) when the API refused it.

        For progress a person should see during a long handler: Kopf's own patch, applied when
        the handler returns, still writes the outcome.
        """
        path = f"apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status"
        try:
            async with self._open().patch(
                    path, json={"status": status},
                    headers={"Content-Type": "application/merge-patch+json"}) as r:
                if r.status == 200:
                    return True
                log.warning("status of %s/%s not written: HTTP %d %s", namespace, name,
                            r.status, (await r.text())[:200])
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("status of %s/%s not written: %r", namespace, name, e)
        return False
