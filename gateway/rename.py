"""Engine answers with the tenant's model id put back: JSON bodies and SSE events.

Engines know an adapter by its engine name (``acme/poet@<version>``); tenants only ever see their
own id (``acme/poet``). Answers are parsed, not searched, so any JSON spacing or escaping works:
the top-level ``model`` field is set, text the model generated is left as it is, and in error
objects (whose messages may quote the name anywhere) every string loses the engine name.
"""

from __future__ import annotations

import json
from typing import Any


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _replace_strings(obj: Any, old: str, new: str) -> Any:
    if isinstance(obj, str):
        return obj.replace(old, new)
    if isinstance(obj, dict):
        return {k: _replace_strings(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_strings(v, old, new) for v in obj]
    return obj


def rename_json(payload: bytes, served_as: str, model: str,
                error: bool = False) -> tuple[bytes, Any]:
    """(``payload`` naming ``model`` where the engine named ``served_as``, its parsed JSON).

    ``error``: the payload is an error answer (an object with an ``error`` member is one anyway).
    The parsed JSON is None when the payload is not JSON; an error that is not JSON still loses
    the engine name (a plain replace).
    """
    try:
        obj = json.loads(payload)
    except ValueError:
        if error and served_as != model:
            return payload.replace(served_as.encode(), model.encode()), None
        return payload, None
    if served_as == model or not isinstance(obj, dict):
        return payload, obj
    if error or "error" in obj:
        obj = _replace_strings(obj, served_as, model)
        return _dumps(obj), obj
    if obj.get("model") == served_as:
        obj["model"] = model
        return _dumps(obj), obj
    return payload, obj


def rename_event(event: bytes, served_as: str, model: str) -> tuple[bytes, Any]:
    """(one SSE event renamed as ``rename_json`` does, its data).

    The data is the parsed JSON of the event's ``data:`` lines, their raw bytes when they are
    not JSON (``[DONE]``), or None for an event without data. Other fields stay as they were.
    """
    one_line = event.endswith(b"\n\n") and event.find(b"\n") == len(event) - 2
    if one_line and event.startswith(b"data: "):  # the usual event: one "data: " line
        payload = event[6:-2]
        renamed, obj = rename_json(payload, served_as, model)
        if obj is None:
            return event, payload
        return (event if renamed is payload else b"data: " + renamed + b"\n\n"), obj
    lines = event.splitlines()
    data_at = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
    if not data_at:
        return event, None
    # The SSE format: one space after "data:" is not part of the value; data lines join by "\n".
    payload = b"\n".join(lines[i][5:].removeprefix(b" ") for i in data_at)
    renamed, obj = rename_json(payload, served_as, model)
    if obj is None:
        return event, payload
    if renamed is payload:
        return event, obj
    kept = [line for i, line in enumerate(lines) if i not in data_at[1:]]
    kept[data_at[0]] = b"data: " + renamed
    return b"\n".join(kept) + b"\n\n", obj
