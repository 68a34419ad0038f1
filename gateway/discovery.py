"""Kubernetes discovery of engine pods by label selector, over the API's plain HTTP interface.

In a pod, the service account's token and CA (mounted by Kubernetes) authorise a list of pods
in a namespace; the gateway needs RBAC ``get, list`` on ``pods`` there. Outside a pod (tests,
a local run) ``api_url`` and ``token_file`` (``--k8s-api``, ``--k8s-token-file``) name the API.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def ready_endpoints(pod_list: dict[str, Any], default_port: int,
                    port_name: str = "http") -> list[str]:
    """Base URLs of the Running, Ready, not-terminating pods of a PodList, sorted."""
    urls = []
    for pod in pod_list.get("items") or []:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") != "Running":
            continue
        conditions = status.get("conditions") or []
        if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            continue
        ip = status.get("podIP")
        if not ip:
            continue
        port = default_port
        for container in (pod.get("spec") or {}).get("containers") or []:
            for p in container.get("ports") or []:
                if p.get("name") == port_name and p.get("containerPort"):
                    port = int(p["containerPort"])
        host = f"[{ip}]" if ":" in ip else ip
        urls.append(f"http://{host}:{port}")
    return sorted(urls)


class KubernetesDiscovery:
    """Lists the engine pods matching a label selector in one namespace."""

    def __init__(self, selector: str, namespace: str | None, default_port: int,
                 api_url: str | None = None, token_file: Path | None = None,
                 ca_file: Path | None = None) -> None:
        self.selector = selector
        self.namespace = namespace or _read(SERVICE_ACCOUNT / "namespace") or "default"
        self.default_port = default_port
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get(
            "KUBERNETES_SERVICE_PORT", "443")
        self.api_url = (api_url or (f"https://{host}:{port}" if host else "")).rstrip("/")
        self.token_file = token_file or SERVICE_ACCOUNT / "token"
        ca = ca_file or SERVICE_ACCOUNT / "ca.crt"
        self.ssl: ssl.SSLContext | bool = ssl.create_default_context(
            cafile=str(ca)) if ca.exists() else True
        if not self.api_url:
            raise ValueError("Kubernetes discovery needs KUBERNETES_SERVICE_HOST (run in a "
                             "pod) or an API URL (--k8s-api)")

    async def endpoints(self, session: aiohttp.ClientSession) -> list[str]:
        """Base URLs of the ready engine pods now."""
        url = (f"{self.api_url}/api/v1/namespaces/{quote(self.namespace)}/pods"
               f"?labelSelector={quote(self.selector)}")
        headers = {}
        token = _read(self.token_file)  # re-read: projected tokens rotate
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with session.get(url, headers=headers, ssl=self.ssl) as r:
            r.raise_for_status()
            return ready_endpoints(await r.json(), self.default_port)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
