"""kmock 0.8's Kubernetes emulator, fixed enough to host a real Kopf operator; also a process.

kmock serves discovery, parses Kubernetes URLs and renders errors; this subclass keeps the
objects itself because kmock 0.8 (see /work/shared/KUBERNETES-TESTING.md):
- crashes (500) on GET /api/v1/namespaces, which Kopf needs discoverable;
- never sets resourceVersion, uid, creationTimestamp or generation, so Kopf's JSON-patch `test`
  on resourceVersion fails forever (and a failed `test` must answer 422, not 500);
- ignores generateName (every Kopf event after the first would get 409);
- answers lists without kind/apiVersion (kubectl refuses them);
- ignores labelSelector on lists (the gateway discovers engine pods by one);
- matches each request against every recorded request, so its cost grows with history: here
  Kubernetes requests never reach kmock's reaction matching and the history is trimmed.
It validates nothing against the CRD schema: tests do that with jsonschema.

Run as a process: python tests/kube_emulator.py --crd manifests/crd-loraadapter.yaml
--port-file F (writes the port when it listens; kubeconfig in --kubeconfig if given).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import json
import random
import re
import string
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import dicts, rendering

ObjKey = tuple[str, str | None, str]  # ("group/version/plural", namespace, name)

_NAMESPACES = re.compile(r"^/api/v1/namespaces/?$")
_NAMESPACE = re.compile(r"^/api/v1/namespaces/([^/]+)/?$")
CORE: dict[str, tuple[str, bool]] = {  # resource -> (kind, namespaced)
    "v1/namespaces": ("Namespace", False),
    "v1/events": ("Event", True),
    "v1/secrets": ("Secret", True),
    "v1/pods": ("Pod", True),
    "events.k8s.io/v1/events": ("Event", True),
}
VERBS = ["get", "list", "watch", "create", "patch", "update", "delete"]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _res(r: kmock.resource) -> str:
    return f"{r.group}/{r.version}/{r.plural}" if r.group else f"{r.version}/{r.plural}"


_REQUIREMENT = re.compile(r"\s*(!?)\s*([\w./-]+)(?:\s*(==|=|!=)\s*([\w.-]*)|"
                          r"\s+(in|notin)\s*\(([^)]*)\))?\s*(?:,|$)")


def label_filter(selector: str | None) -> Callable[[dict[str, Any]], bool]:
    """A predicate over objects for a label selector: k=v, k==v, k!=v, k, !k, k in (a,b),
    k notin (a,b), comma-joined (all must hold). None or empty: everything."""
    checks: list[Callable[[dict[str, str]], bool]] = []
    pos, selector = 0, (selector or "").strip()
    while pos < len(selector):
        m = _REQUIREMENT.match(selector, pos)
        if m is None or m.end() == pos:
            raise kmock.KubernetesError(400, "BadRequest", f"bad labelSelector {selector!r}")
        pos = m.end()
        neg, key, op, value, set_op, values = m.groups()
        if op:
            checks.append(lambda labels, k=key, v=value, eq=op != "!=":
                          (labels.get(k) == v) == eq)
        elif set_op:
            options = {v.strip() for v in values.split(",")}
            checks.append(lambda labels, k=key, o=options, inside=set_op == "in":
                          (labels.get(k) in o) == inside)
        else:
            checks.append(lambda labels, k=key, present=not neg: (k in labels) == present)
    return lambda obj: all(c(obj.get("metadata", {}).get("labels") or {}) for c in checks)


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """A Kubernetes API in memory: CRUD, merge and JSON patches, watches, finalizers."""

    history_limit: int = 64
    store: dict[ObjKey, dict[str, Any]] = attrs.field(factory=dict)
    kinds: dict[str, str] = attrs.field(factory=dict)
    status_subresource: set[str] = attrs.field(factory=set)
    watchers: list[tuple[str, str | None, asyncio.Queue[dict[str, Any]]]] = attrs.field(
        factory=list)
    rv: int = 1
    k8s_seconds: float = 0.0  # time spent serving Kubernetes requests (for benchmarks)
    k8s_requests: int = 0

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, (kind, namespaced) in CORE.items():
            self.add_resource(key, kind, namespaced=namespaced)

    def add_resource(self, key: str, kind: str, *, namespaced: bool, singular: str = "",
                     shortnames: tuple[str, ...] = (), status: bool = False) -> None:
        self.resources[key] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=set(VERBS), singular=singular or kind.lower(),
            shortnames=set(shortnames), subresources={"status"} if status else set())
        self.kinds[key] = kind
        if status:
            self.status_subresource.add(key)

    def add_crd(self, crd: dict[str, Any]) -> None:
        """Serve every version of a CustomResourceDefinition."""
        spec = crd["spec"]
        for v in spec["versions"]:
            self.add_resource(f"{spec['group']}/{v['name']}/{spec['names']['plural']}",
                              spec["names"]["kind"], namespaced=spec["scope"] == "Namespaced",
                              singular=spec["names"].get("singular", ""),
                              shortnames=tuple(spec["names"].get("shortNames", [])),
                              status="status" in v.get("subresources", {}))

    # ---- entry points ----------------------------------------------------------------------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if len(self._requests) > self.history_limit:
            del self._requests[:-self.history_limit // 2]
        if raw.method == "GET" and _NAMESPACES.match(raw.path):
            return await self._namespaces(raw)
        if raw.method == "GET" and (m := _NAMESPACE.match(raw.path)):
            return self._json({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": m.group(1)}, "status": {"phase": "Active"}})
        return await super().__call__(raw)

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action is None:
            return await super()._handle(request)
        key = _res(request.resource)
        if key not in self.kinds:
            return await super()._handle(request)
        started = time.perf_counter()
        self.k8s_requests += 1
        try:
            if request.action == kmock.action.WATCH:
                return await self._watch(request, key)
            return self._serve(request, key)
        except kmock.KubernetesError as e:
            return await self._render_error(e)
        finally:
            self.k8s_seconds += time.perf_counter() - started

    async def _namespaces(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw.query.get("watch") == "true":
            resp = aiohttp.web.StreamResponse()
            await resp.prepare(raw)
            await asyncio.sleep(float(raw.query.get("timeoutSeconds", "60")))
            return resp
        return self._json({"apiVersion": "v1", "kind": "NamespaceList",
                           "metadata": {"resourceVersion": str(self.rv)}, "items": []})

    # ---- state -----------------------------------------------------------------------------

    @staticmethod
    def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
        return aiohttp.web.json_response(data, status=status)

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _publish(self, key: str, kind: str, obj: dict[str, Any]) -> None:
        ns = obj["metadata"].get("namespace")
        for res, want_ns, queue in self.watchers:
            if res == key and want_ns in (None, ns):
                queue.put_nowait({"type": kind, "object": obj})

    def _serve(self, request: rendering.Request, key: str) -> aiohttp.web.Response:
        ns, name, action = request.namespace, request.name, request.action
        api_version = key.rsplit("/", 1)[0]
        if action == kmock.action.LIST:
            wanted = label_filter(request.params.get("labelSelector"))
            items = [o for (k, n, _), o in self.store.items()
                     if k == key and (ns is None or n == ns) and wanted(o)]
            return self._json({"apiVersion": api_version, "kind": f"{self.kinds[key]}List",
                               "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        if action == kmock.action.CREATE:
            return self._create(request, key, api_version)
        assert name is not None
        obj = self.store.get((key, ns, name))
        if obj is None:
            raise kmock.KubernetesObjectNotFoundError()
        if action == kmock.action.FETCH:
            return self._json(obj)
        if action == kmock.action.UPDATE:
            return self._patch(request, key, obj)
        if action == kmock.action.DELETE:
            meta = obj["metadata"]
            if meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    obj = copy.deepcopy(obj)
                    obj["metadata"]["deletionTimestamp"] = _now()
                    obj["metadata"]["resourceVersion"] = self._next_rv()
                    self.store[(key, ns, name)] = obj
                    self._publish(key, "MODIFIED", obj)
                return self._json(obj)
            del self.store[(key, ns, name)]
            self._publish(key, "DELETED", obj)
            return self._json(obj)
        raise kmock.KubernetesError(405, "MethodNotAllowed", f"{action} is not supported")

    def _create(self, request: rendering.Request, key: str, api_version: str
                ) -> aiohttp.web.Response:
        obj = copy.deepcopy(request.data) if isinstance(request.data, dict) else None
        if obj is None:
            raise kmock.KubernetesError(400, "BadRequest", "body must be a JSON object")
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        if not meta.get("name"):
            raise kmock.KubernetesError(422, "Invalid", "metadata.name is required")
        ns = request.namespace or meta.get("namespace")
        if ns is not None:
            meta["namespace"] = ns
        if (key, ns, meta["name"]) in self.store:
            raise kmock.KubernetesError(409, "AlreadyExists",
                                        f"{self.kinds[key]} {meta['name']!r} already exists")
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", self.kinds[key])
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(),
                    creationTimestamp=_now(), generation=1)
        self.store[(key, ns, meta["name"])] = obj
        self._publish(key, "ADDED", obj)
        return self._json(obj, 201)

    def _patch(self, request: rendering.Request, key: str, old: dict[str, Any]
               ) -> aiohttp.web.Response:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        body = request.data
        try:
            if ctype == "application/json-patch+json" or isinstance(body, list):
                new = jsonpatch.apply_patch(old, body, in_place=False)
            else:
                new = dict(dicts.merge_patch_dict(copy.deepcopy(old), body or {}))
        except jsonpatch.JsonPatchTestFailed as e:
            raise kmock.KubernetesError(422, "Invalid", f"the test operation failed: {e}") \
                from None
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, ValueError,
                TypeError) as e:
            raise kmock.KubernetesError(422, "Invalid", f"cannot apply the patch: {e}") from None
        new = copy.deepcopy(new)
        # The status subresource changes only status; the main resource never changes status.
        if request.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif key in self.status_subresource:
            new["status"] = old.get("status")
            if new["status"] is None:
                del new["status"]
        # Server-owned metadata.
        for field in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
            if field in old["metadata"]:
                new["metadata"][field] = old["metadata"][field]
        essence = [{k: v for k, v in o.items() if k not in ("metadata", "status")}
                   for o in (old, new)]
        generation = int(old["metadata"].get("generation", 1))
        new["metadata"]["generation"] = generation + (essence[0] != essence[1])
        if new == old:
            return self._json(old)
        new["metadata"]["resourceVersion"] = self._next_rv()
        ident = (key, old["metadata"].get("namespace"), old["metadata"]["name"])
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            del self.store[ident]
            self._publish(key, "DELETED", new)
        else:
            self.store[ident] = new
            self._publish(key, "MODIFIED", new)
        return self._json(new)

    async def _watch(self, request: rendering.Request, key: str) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        assert raw is not None
        timeout = float(request.params.get("timeoutSeconds", "300"))
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        since = int(request.params.get("resourceVersion") or 0)
        for (k, n, _), obj in self.store.items():
            if k == key and request.namespace in (None, n) \
                    and int(obj["metadata"]["resourceVersion"]) > since:
                queue.put_nowait({"type": "ADDED", "object": obj})
        watcher = (key, request.namespace, queue)
        self.watchers.append(watcher)
        resp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(raw)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                await resp.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.remove(watcher)
        return resp


def kubeconfig(port: int) -> str:
    """A kubeconfig that points kubectl and Kopf at the emulator over plain HTTP."""
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "tester", "user": {"token": "test"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester",
                                                      "namespace": "default"}}]})


async def _serve(args: argparse.Namespace) -> None:
    emulator = KubeEmulator()
    for crd in args.crd:
        for doc in yaml.safe_load_all(Path(crd).read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                emulator.add_crd(doc)
    async with emulator, kmock.Server(emulator, port=args.port) as server:
        if args.kubeconfig:
            Path(args.kubeconfig).write_text(kubeconfig(server.port))
        emulator.fallback["get /emulator/stats"] << (lambda _: {
            "k8sSeconds": emulator.k8s_seconds, "k8sRequests": emulator.k8s_requests,
            "objects": len(emulator.store), "watchers": len(emulator.watchers)})
        Path(args.port_file).write_text(str(server.port))
        await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crd", action="append", default=[], help="YAML file with CRDs to serve")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file", required=True)
    p.add_argument("--kubeconfig", default=None)
    args = p.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
