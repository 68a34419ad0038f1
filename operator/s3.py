"""Reading adapter folders from S3: small bounded reads, ranged header reads and streamed copies.

boto3 is synchronous; async callers run these functions in a thread. Errors come out as
`SourceError` with a reason a person can act on, and `transient` telling retry from give-up.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import boto3
import botocore.config
import botocore.exceptions

from loraplane.operator.errors import ConditionError

_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?$")
CHUNK = 1 << 20


class SourceError(ConditionError):
    """S3 refused or failed; transient failures are retried."""

    def __init__(self, reason: str, message: str, *, transient: bool) -> None:
        super().__init__(reason, message)
        self.transient = transient


@dataclass(frozen=True)
class S3Location:
    """Where a PEFT folder lives: bucket, key prefix (no trailing slash) and how to reach it."""

    bucket: str
    prefix: str
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None

    def key(self, file: str) -> str:
        return f"{self.prefix}/{file}" if self.prefix else file


def parse_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> (bucket, "some/prefix"); raise ValueError on other shapes."""
    m = _URI.match(uri)
    if m is None:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    prefix = (m.group(2) or "").strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"{uri!r} has an empty, '.' or '..' path segment")
    return m.group(1), prefix


_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()


def _client(loc: S3Location) -> Any:
    key = (loc.endpoint, loc.region, loc.access_key_id, loc.secret_access_key)
    with _clients_lock:
        if key not in _clients:
            cfg = botocore.config.Config(connect_timeout=3, read_timeout=20,
                                         retries={"max_attempts": 2, "mode": "standard"},
                                         max_pool_connections=32)
            _clients[key] = boto3.session.Session().client(
                "s3", endpoint_url=loc.endpoint, region_name=loc.region or "us-east-1",
                aws_access_key_id=loc.access_key_id,
                aws_secret_access_key=loc.secret_access_key, config=cfg)
        return _clients[key]


def _translate(e: Exception, what: str) -> SourceError:
    if isinstance(e, SourceError):
        return e
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound") or status == 404:
            return SourceError("ObjectNotFound", f"{what} does not exist", transient=False)
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return SourceError("AccessDenied", f"access to {what} denied ({code})",
                               transient=False)
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return SourceError("SourceUnavailable", f"S3 answered {status} {code} for {what}",
                               transient=True)
        return SourceError("SourceError", f"S3 error {code} for {what}", transient=False)
    if isinstance(e, (botocore.exceptions.BotoCoreError, OSError)):
        return SourceError("SourceUnavailable", f"cannot reach S3 for {what}: {e}",
                           transient=True)
    return SourceError("SourceError", f"reading {what}: {e}", transient=False)


def head(loc: S3Location, file: str) -> dict[str, Any]:
    """HEAD of one file: size (bytes), etag and sha256 (hex, when S3 stored one)."""
    what = f"s3://{loc.bucket}/{loc.key(file)}"
    try:
        r = _client(loc).head_object(Bucket=loc.bucket, Key=loc.key(file), ChecksumMode="ENABLED")
    except Exception as e:
        raise _translate(e, what) from None
    stored = r.get("ChecksumSHA256")
    sha = None
    if stored and "-" not in stored:  # a multipart upload's checksum is of the parts: unusable
        sha = base64.b64decode(stored).hex()
    return {"size": int(r["ContentLength"]), "etag": r.get("ETag"), "sha256": sha}


def read_range(loc: S3Location, file: str, start: int, length: int) -> bytes:
    """Bytes [start, start+length) of one file (fewer at its end); never more than length."""
    what = f"s3://{loc.bucket}/{loc.key(file)}"
    try:
        r = _client(loc).get_object(Bucket=loc.bucket, Key=loc.key(file),
                                    Range=f"bytes={start}-{start + length - 1}")
        return bytes(r["Body"].read(length))
    except Exception as e:
        raise _translate(e, what) from None


def read_small(loc: S3Location, file: str, max_bytes: int) -> bytes:
    """A whole small file, refused when larger than max_bytes."""
    what = f"s3://{loc.bucket}/{loc.key(file)}"
    try:
        r = _client(loc).get_object(Bucket=loc.bucket, Key=loc.key(file))
        if int(r["ContentLength"]) > max_bytes:
            r["Body"].close()
            raise SourceError("TooLarge", f"{what} is over {max_bytes} bytes", transient=False)
        return bytes(r["Body"].read(max_bytes + 1)[:max_bytes])
    except Exception as e:
        raise _translate(e, what) from None


def list_names(loc: S3Location, limit: int = 1000) -> list[str]:
    """File names directly under the prefix (at most limit), to explain what is missing."""
    what = f"s3://{loc.bucket}/{loc.prefix}/"
    try:
        r = _client(loc).list_objects_v2(Bucket=loc.bucket, Prefix=loc.key(""), MaxKeys=limit)
    except Exception as e:
        raise _translate(e, what) from None
    return [o["Key"].rsplit("/", 1)[-1] for o in r.get("Contents", [])]


def copy_to(loc: S3Location, file: str, out: BinaryIO, max_bytes: int,
            progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Stream one file into out, hashing as it reads; (bytes, sha256 hex). Bounded by max_bytes."""
    what = f"s3://{loc.bucket}/{loc.key(file)}"
    digest = hashlib.sha256()
    total = 0
    try:
        r = _client(loc).get_object(Bucket=loc.bucket, Key=loc.key(file))
        if int(r["ContentLength"]) > max_bytes:
            r["Body"].close()
            raise SourceError("TooLarge", f"{what} is {r['ContentLength']} bytes, over the "
                                          f"limit of {max_bytes}", transient=False)
        for chunk in r["Body"].iter_chunks(CHUNK):
            total += len(chunk)
            if total > max_bytes:  # the server lied about the length
                raise SourceError("TooLarge", f"{what} is over {max_bytes} bytes",
                                  transient=False)
            digest.update(chunk)
            out.write(chunk)
            if progress is not None:
                progress(total)
    except Exception as e:
        raise _translate(e, what) from None
    return total, digest.hexdigest()
