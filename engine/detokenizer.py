"""Incremental detokenization, stop conditions, and the deltas a request streams."""

from __future__ import annotations

from typing import Protocol

from loraplane.engine.outputs import RequestOutput
from loraplane.engine.sequence import Sequence


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


def append_token(dec: Decoder, seq: Sequence, token: int, eos_ids: tuple[int, ...],
                 max_model_len: int) -> None:
    """Add a sampled token, extend the text, and finish the sequence if a stop condition holds."""
    p = seq.params
    seq.output_ids.append(token)
    if (not p.ignore_eos and token in eos_ids) or token in p.stop_token_ids:
        seq.output_ids.pop()  # a stop token is not part of the completion
        seq.finish_reason = "stop"
        return
    # Decode a small window: the text of ids[prefix:] minus that of ids[prefix:read].
    ids = seq.output_ids
    before = dec.decode(ids[seq.prefix_offset:seq.read_offset])
    after = dec.decode(ids[seq.prefix_offset:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
        start = len(seq.text)
        seq.text += after[len(before):]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        if p.stop:
            longest = max(len(s) for s in p.stop)
            window_start = max(0, start - longest + 1)
            hits = [(i, s) for s in p.stop if (i := seq.text.find(s, window_start)) >= 0]
            if hits:
                seq.text = seq.text[:min(hits)[0]]
                seq.finish_reason = "stop"
                return
    if len(ids) >= p.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"


def take_output(seq: Sequence, finished: bool) -> RequestOutput:
    """The delta not yet sent; holds back a possible stop-string prefix until it resolves."""
    upto = len(seq.text)
    if not finished and seq.params.stop:
        upto = max(seq.sent_chars, upto - max(len(s) for s in seq.params.stop) + 1)
    out = RequestOutput(
        request_id=seq.request_id,
        text_delta=seq.text[seq.sent_chars:upto],
        token_ids_delta=seq.output_ids[seq.sent_tokens:],
        finished=finished,
        finish_reason=seq.finish_reason if finished else None,
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=len(seq.output_ids),
        error=seq.error if finished else None,
    )
    seq.sent_chars = upto
    seq.sent_tokens = len(seq.output_ids)
    return out
