"""The engines on this node, over their HTTP API: register and unregister adapters."""

from __future__ import annotations

import aiohttp


class EngineRefused(Exception):
    """An engine refused an adapter as invalid (HTTP 400): retrying will not help."""


class EngineUnavailable(Exception):
    """An engine did not answer or failed (connection error, 5xx): retry later."""


class EngineClient:
    """One engine at base_url (http://host:port)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.url = base_url.rstrip("/")
        self._session = session

    async def _post(self, path: str, body: dict[str, str]) -> tuple[int, dict]:
        try:
            async with self._session.post(self.url + path, json=body) as r:
                data = await r.json(content_type=None)
                return r.status, data if isinstance(data, dict) else {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise EngineUnavailable(f"engine {self.url}: {e!r}") from None

    async def models(self) -> tuple[list[str], list[str]]:
        """(base model names, adapter names) the engine serves now."""
        try:
            async with self._session.get(self.url + "/v1/models") as r:
                if r.status != 200:
                    raise EngineUnavailable(f"engine {self.url}: /v1/models answered {r.status}")
                data = (await r.json())["data"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            raise EngineUnavailable(f"engine {self.url}: {e!r}") from None
        base = [m["id"] for m in data if not m.get("parent")]
        adapters = [m["id"] for m in data if m.get("parent")]
        return base, adapters

    async def load(self, name: str, path: str) -> None:
        """Register an adapter folder under name; already registered counts as done."""
        status, data = await self._post("/v1/load_lora_adapter",
                                        {"lora_name": name, "lora_path": path})
        if status == 200 or status == 409:
            return
        message = str(data.get("error", {}).get("message", data))
        if status == 400:
            raise EngineRefused(message)
        raise EngineUnavailable(f"engine {self.url} answered {status}: {message}")

    async def unload(self, name: str) -> None:
        """Unregister an adapter; not registered counts as done."""
        status, data = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):
            raise EngineUnavailable(f"engine {self.url} answered {status} to unload: {data}")
