"""A decoder of the pgoutput logical replication protocol (version 1), the bytes PostgreSQL's
built-in ``pgoutput`` plugin sends.

Each replication message carries one protocol message; :func:`decode` turns its bytes into one
of the small frozen dataclasses below. The formats follow PostgreSQL's "Logical Replication
Message Formats" (protocol-logicalrep-message-formats): big-endian integers, NUL-terminated
strings, LSNs as unsigned 64-bit integers. Only protocol version 1 is decoded; the streaming
messages of version 2 (``S``/``E``/``c``/``A``) are never requested and are rejected.

Tuple data keeps PostgreSQL's four column kinds: ``'n'`` null (``None``), ``'u'`` an unchanged
TOASTed value that was not sent (:data:`UNCHANGED`), ``'t'`` text (``str``), ``'b'`` binary
(``bytes``). :func:`convert` turns text values of a few common types into Python values.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from ..errors import ReplicationError

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)


class DecodeError(ReplicationError):
    """A pgoutput message could not be decoded (truncated, unknown type, or malformed)."""


class _Unchanged:
    """The value of a TOASTed column that an UPDATE did not change, so PostgreSQL did not send."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()
"""Sentinel for an unchanged TOASTed column value (tuple kind ``'u'``)."""


def lsn_to_str(lsn: int) -> str:
    """Format an LSN the way PostgreSQL prints it: ``'16/B374D848'``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def lsn_from_str(text: str) -> int:
    """Parse PostgreSQL's ``'16/B374D848'`` LSN notation."""
    high, _, low = text.partition("/")
    try:
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise DecodeError(f"not an LSN: {text!r}") from None


def pg_timestamp(micros: int) -> datetime:
    """A pgoutput timestamp (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a :class:`Relation`; ``key`` marks a replica identity column."""

    name: str
    type_oid: int
    type_modifier: int
    key: bool


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int  # the LSN of the transaction's commit record
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int  # where the commit record starts
    end_lsn: int  # where it ends: the position to confirm once the transaction is applied
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str  # empty for pg_catalog
    name: str
    replica_identity: str  # 'd' default (primary key), 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """pgoutput's Type message ('Y'): names a non-built-in data type."""

    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_id: int
    new: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Update:
    relation_id: int
    old: tuple[Any, ...] | None  # present when key columns changed ('K') or identity is FULL
    old_kind: str | None  # 'K' (key columns only; others None) or 'O' (the full old row)
    new: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    relation_id: int
    old: tuple[Any, ...]
    old_kind: str  # 'K' or 'O', as for Update


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_ids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """pg_logical_emit_message() output ('M'); only sent with the ``messages`` option."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Message = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeInfo
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
)


class _Reader:
    """Cursor over one message's bytes; every read checks bounds."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise DecodeError(
                f"pgoutput message truncated: wanted {n} bytes at offset {self.pos}, "
                f"message has {len(self.data)}"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> str:
        return chr(self._take(1)[0])

    def int8(self) -> int:
        return self._take(1)[0]

    def int16(self) -> int:
        return int(struct.unpack(">h", self._take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self._take(4))[0])

    def uint32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def int64(self) -> int:
        return int(struct.unpack(">q", self._take(8))[0])

    def uint64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise DecodeError(f"unterminated string at offset {self.pos}")
        text = self.data[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return text

    def tuple_data(self) -> tuple[Any, ...]:
        values: list[Any] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED)
            elif kind == "t":
                values.append(self._take(self.int32()).decode("utf-8"))
            elif kind == "b":
                values.append(self._take(self.int32()))
            else:
                raise DecodeError(f"unknown tuple column kind {kind!r} at offset {self.pos - 1}")
        return tuple(values)

    def done(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(
                f"{len(self.data) - self.pos} unexpected trailing bytes in a pgoutput message"
            )


def decode(payload: bytes | bytearray | memoryview) -> Message:
    """Decode one pgoutput (protocol version 1) message.

    Raises :class:`DecodeError` (a ``ReplicationError``) for anything malformed or unknown, so a
    consumer never confirms a position it could not read.
    """
    data = bytes(payload)
    if not data:
        raise DecodeError("empty pgoutput message")
    r = _Reader(data)
    tag = r.byte()
    msg: Message
    if tag == "B":
        msg = Begin(final_lsn=r.uint64(), commit_time=pg_timestamp(r.int64()), xid=r.uint32())
    elif tag == "C":
        msg = Commit(
            flags=r.int8(),
            commit_lsn=r.uint64(),
            end_lsn=r.uint64(),
            commit_time=pg_timestamp(r.int64()),
        )
    elif tag == "O":
        msg = Origin(commit_lsn=r.uint64(), name=r.string())
    elif tag == "R":
        relation_id = r.uint32()
        namespace = r.string()
        name = r.string()
        replica_identity = r.byte()
        columns = []
        for _ in range(r.int16()):
            flags = r.int8()
            columns.append(
                Column(
                    name=r.string(),
                    type_oid=r.uint32(),
                    type_modifier=r.int32(),
                    key=bool(flags & 1),
                )
            )
        msg = Relation(relation_id, namespace, name, replica_identity, tuple(columns))
    elif tag == "Y":
        msg = TypeInfo(type_oid=r.uint32(), namespace=r.string(), name=r.string())
    elif tag == "I":
        relation_id = r.uint32()
        marker = r.byte()
        if marker != "N":
            raise DecodeError(f"Insert: expected 'N', got {marker!r}")
        msg = Insert(relation_id, r.tuple_data())
    elif tag == "U":
        relation_id = r.uint32()
        marker = r.byte()
        old: tuple[Any, ...] | None = None
        old_kind: str | None = None
        if marker in ("K", "O"):
            old_kind = marker
            old = r.tuple_data()
            marker = r.byte()
        if marker != "N":
            raise DecodeError(f"Update: expected 'N', got {marker!r}")
        msg = Update(relation_id, old, old_kind, r.tuple_data())
    elif tag == "D":
        relation_id = r.uint32()
        marker = r.byte()
        if marker not in ("K", "O"):
            raise DecodeError(f"Delete: expected 'K' or 'O', got {marker!r}")
        msg = Delete(relation_id, r.tuple_data(), marker)
    elif tag == "T":
        count = r.int32()
        options = r.int8()
        ids = tuple(r.uint32() for _ in range(count))
        msg = Truncate(ids, cascade=bool(options & 1), restart_identity=bool(options & 2))
    elif tag == "M":
        flags = r.int8()
        lsn = r.uint64()
        prefix = r.string()
        content = r._take(r.int32())
        msg = LogicalMessage(bool(flags & 1), lsn, prefix, content)
    else:
        raise DecodeError(
            f"unknown pgoutput message type {tag!r} (only protocol version 1 is supported)"
        )
    r.done()
    return msg


# Built-in type OIDs whose text form has an obvious Python value (pg_type.dat).
_BOOL, _INT8, _INT2, _INT4, _OID = 16, 20, 21, 23, 26
_FLOAT4, _FLOAT8, _NUMERIC = 700, 701, 1700
_INTS: Final = frozenset({_INT8, _INT2, _INT4, _OID})
_FLOATS: Final = frozenset({_FLOAT4, _FLOAT8})


def convert(value: Any, type_oid: int) -> Any:
    """Turn a text column value into a Python value for a few built-in types.

    smallint/integer/bigint/oid -> int, real/double -> float, numeric -> Decimal,
    boolean -> bool. Everything else (text, uuid, timestamps, json, ...) stays the text
    PostgreSQL sent, so ``f"user:{row['id']}"`` gives the same string either way. ``None``,
    :data:`UNCHANGED` and binary values pass through.
    """
    if not isinstance(value, str):
        return value
    if type_oid in _INTS:
        return int(value)
    if type_oid == _BOOL:
        return value == "t"
    if type_oid in _FLOATS:
        return float(value)
    if type_oid == _NUMERIC:
        return Decimal(value)
    return value
