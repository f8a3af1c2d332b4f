"""The wire protocol between the frontend and the ranks: length-prefixed msgpack frames.

A frame is a 4-byte big-endian payload length, then a msgpack payload `[tag, {field: value}]`. The tag
names one of the message dataclasses below; fields are plain msgpack types (int, float, str, bool, None,
lists, str-keyed maps) and nested message-free dataclasses listed in this file. Nothing else crosses:
no pickle, no msgpack extension types, no tensors (those move only through torch.distributed).

Decoding is strict: the length is checked against the limit before a single payload byte is read or
decoded, and an unknown tag, a missing or unknown field, or a value of the wrong type raises WireError
naming the message, the field and what was expected. A peer that sends a bad frame loses its connection;
nobody else notices.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Union

import msgpack

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 16 * 2**20  # default limit on one frame's payload


class WireError(ValueError):
    """A frame that is not a valid message (bad length, bad msgpack, unknown tag, wrong field types)."""


# ======================= messages =======================
@dataclass
class TokenLogprob:
    """One sampled token's logprob and the top alternatives (ids and logprobs, best first)."""

    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class AddRequest:
    """Start generating for `prompt_token_ids`. Sampling fields as in scheduler.sampling.SamplingParams
    (stop strings stay in the frontend). Lower `priority` is served first (0 = interactive)."""

    req_id: str
    prompt_token_ids: list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    priority: int = 0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias_ids: list[int] = field(default_factory=list)  # logit_bias as two parallel lists
    logit_bias_values: list[float] = field(default_factory=list)


@dataclass
class Abort:
    req_id: str


@dataclass
class Output:
    """Tokens appended to one request since its last Output; `finished` ends the stream."""

    req_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


@dataclass
class Outputs:
    """Everything one engine step produced for one connection."""

    outputs: list[Output]


@dataclass
class Error:
    """A request the rank refused (req_id set; the request is over) or a connection-level problem."""

    message: str
    req_id: str | None = None


@dataclass
class StatsRequest:
    pass


@dataclass
class Stats:
    """The rank's engine stats (flat numbers, plus e.g. `expert_balancedness`: a list of str-keyed maps)."""

    rank: int
    stats: dict[str, Any]


@dataclass
class Ping:
    nonce: int


@dataclass
class Pong:
    nonce: int
    steps: int = 0  # engine steps so far (a stuck step loop shows as a counter that stops moving)


@dataclass
class Shutdown:
    pass


MESSAGES: tuple[type, ...] = (AddRequest, Abort, Output, Outputs, Error, StatsRequest, Stats, Ping, Pong, Shutdown)
_BY_TAG: dict[str, type] = {cls.__name__: cls for cls in MESSAGES}
_NESTED: tuple[type, ...] = (TokenLogprob, Output)
_HINTS: dict[type, dict[str, Any]] = {cls: typing.get_type_hints(cls) for cls in (*MESSAGES, *_NESTED)}


# ======================= encoding =======================
def encode(msg: Any) -> bytes:
    """One frame (header + payload) for a message dataclass."""
    cls = type(msg)
    if _BY_TAG.get(cls.__name__) is not cls:
        raise WireError(f"not a wire message: {cls.__name__}")
    try:
        payload = msgpack.packb([cls.__name__, asdict(msg)], use_bin_type=True)  # tuples pack as arrays
    except (OverflowError, ValueError, TypeError) as e:  # e.g. an int outside msgpack's 64-bit range
        raise WireError(f"{cls.__name__} cannot be encoded: {e}") from None
    if len(payload) > MAX_FRAME_BYTES:
        raise WireError(f"{cls.__name__} frame of {len(payload)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    return HEADER.pack(len(payload)) + payload


# ======================= decoding =======================
def _no_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed")


def _check(value: Any, hint: Any, where: str) -> Any:
    """`value` converted to `hint` (dataclasses from maps), or WireError naming `where`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return _check_plain(value, where)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise WireError(f"{where}: expected a map with str keys, got {type(value).__name__}")
        return {k: _check_plain(v, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise WireError(f"{where}: expected bool, got {type(value).__name__}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise WireError(f"{where}: expected int, got {type(value).__name__}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise WireError(f"{where}: expected float, got {type(value).__name__}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise WireError(f"{where}: expected str, got {type(value).__name__}")
        return value
    if hint in _HINTS:
        return _build(hint, value, where)
    raise WireError(f"{where}: unsupported field type {hint!r}")  # a bug in this file, not in the peer


def _check_plain(value: Any, where: str) -> Any:
    """Free-form values (Stats): only msgpack's plain types, maps keyed by str."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_check_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise WireError(f"{where}: map keys must be str")
        return {k: _check_plain(v, f"{where}.{k}") for k, v in value.items()}
    raise WireError(f"{where}: value of type {type(value).__name__} is not allowed")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise WireError(f"{where}: expected a map of fields, got {type(data).__name__}")
    hints = _HINTS[cls]
    unknown = sorted(str(k) for k in data if k not in hints)
    if unknown:
        raise WireError(f"{where}: unknown field(s) {unknown}")
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _check(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise WireError(f"{where}: missing field {f.name!r}")
    return cls(**kwargs)


def decode_payload(payload: bytes) -> Any:
    """The message in one frame payload (without the header)."""
    if len(payload) > MAX_FRAME_BYTES:
        raise WireError(f"frame of {len(payload)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_no_ext, use_list=True)
    except WireError:
        raise
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, UnicodeDecodeError, ...)
        raise WireError(f"undecodable frame: {type(e).__name__}: {e}") from None
    if not isinstance(obj, list) or len(obj) != 2:
        raise WireError(f"frame must be [tag, fields], got {type(obj).__name__}")
    tag, data = obj
    if not isinstance(tag, str) or tag not in _BY_TAG:
        raise WireError(f"unknown message tag {tag!r}")
    return _build(_BY_TAG[tag], data, tag)


def frame_length(header: bytes, max_bytes: int = MAX_FRAME_BYTES) -> int:
    """The payload length a 4-byte header announces, checked against `max_bytes`."""
    (n,) = HEADER.unpack(header)
    if n > max_bytes:
        raise WireError(f"frame of {n} bytes exceeds the limit of {max_bytes}")
    return n


# ======================= transports =======================
async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_FRAME_BYTES) -> Any:
    """The next message; raises asyncio.IncompleteReadError at a clean end of stream, WireError on bad data."""
    n = frame_length(await reader.readexactly(HEADER.size), max_bytes)
    return decode_payload(await reader.readexactly(n))


def recv_frame(sock: socket.socket, max_bytes: int = MAX_FRAME_BYTES) -> Any:
    """Blocking variant of read_frame; raises ConnectionError when the peer closed."""
    n = frame_length(recv_exact(sock, HEADER.size), max_bytes)
    return decode_payload(recv_exact(sock, n))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes from a blocking socket (ConnectionError if the peer closes first)."""
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += part
    return bytes(buf)
