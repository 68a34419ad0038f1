"""Check an adapter in S3 before any node downloads it: config, safetensors header, checksum.

Only adapter_config.json and the header at the start of adapter_model.safetensors are read
(two ranged GETs), so a bad adapter fails in milliseconds whatever its size.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplane.engine.adapter_format import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    PICKLE_SUFFIXES,
    SAFETENSORS_DTYPES,
    WEIGHTS_FILE,
    check_config,
    check_layout,
    header_length,
    parse_config,
    parse_header,
)
from loraplane.engine.config import ModelConfig
from loraplane.engine.errors import InvalidAdapterError
from loraplane.operator import s3
from loraplane.operator.errors import ConditionError

__all__ = ["AdapterFacts", "AdapterRejected", "check_header", "header_length", "verify"]


class AdapterRejected(ConditionError):
    """The adapter can never load as it is."""


@dataclass(frozen=True)
class AdapterFacts:
    """What verification learnt: rank, modules, weights size and (if S3 stored one) sha256."""

    rank: int
    alpha: float
    modules: tuple[str, ...]
    size_bytes: int
    stored_sha256: str | None


def check_header(config_bytes: bytes, header_bytes: bytes, model: ModelConfig, *, name: str,
                 max_rank: int) -> tuple[int, float, tuple[str, ...]]:
    """(rank, alpha, modules) from the config file and the safetensors header JSON; pure."""
    rank, alpha, _ = check_config(parse_config(config_bytes, name), name, max_rank)
    index = parse_header(header_bytes, name, model)
    return rank, alpha, check_layout(index, rank, model, name, SAFETENSORS_DTYPES)


def verify(loc: s3.S3Location, model: ModelConfig, *, name: str, max_rank: int,
           max_bytes: int, sha256: str | None) -> AdapterFacts:
    """Verify a PEFT folder in S3 against the base model (blocking: run it in a thread)."""
    try:
        try:
            weights = s3.head(loc, WEIGHTS_FILE)
        except s3.SourceError as e:
            if e.reason != "ObjectNotFound":
                raise
            names = s3.list_names(loc)
            pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise AdapterRejected("PickleRefused", (
                    f"only pickled weights found ({', '.join(pickles[:5])}); pickle files are "
                    f"refused because loading them can run code. Convert the adapter to "
                    f"{WEIGHTS_FILE}")) from None
            raise AdapterRejected("ObjectNotFound", f"{WEIGHTS_FILE} not found under "
                                                    f"s3://{loc.bucket}/{loc.prefix}/") from None
        if weights["size"] > max_bytes:
            raise AdapterRejected("TooLarge", f"{WEIGHTS_FILE} is {weights['size']} bytes, "
                                              f"over the limit of {max_bytes}")
        if sha256 and weights["sha256"] and weights["sha256"] != sha256:
            raise AdapterRejected("ChecksumMismatch", (
                f"S3 stores sha256 {weights['sha256']} for {WEIGHTS_FILE}, the spec asks for "
                f"{sha256}"))
        try:
            config_bytes = s3.read_small(loc, CONFIG_FILE, MAX_CONFIG_BYTES)
        except s3.SourceError as e:
            if e.reason == "ObjectNotFound":
                where = f"s3://{loc.bucket}/{loc.prefix}/"
                raise AdapterRejected("ObjectNotFound",
                                      f"{CONFIG_FILE} not found under {where}") from None
            raise
        first = s3.read_range(loc, WEIGHTS_FILE, 0, 8)
        n = header_length(first, weights["size"], name)
        header = s3.read_range(loc, WEIGHTS_FILE, 8, n)
        rank, alpha, modules = check_header(config_bytes, header, model, name=name,
                                            max_rank=max_rank)
    except s3.SourceError as e:
        if e.transient:
            raise
        raise AdapterRejected(e.reason, e.message) from None
    except InvalidAdapterError as e:
        reason = "ShapeMismatch" if "expected" in e.message or "layer" in e.message else \
            "InvalidAdapter"
        raise AdapterRejected(reason, e.message) from None
    return AdapterFacts(rank=rank, alpha=alpha, modules=modules, size_bytes=weights["size"],
                        stored_sha256=weights["sha256"])
