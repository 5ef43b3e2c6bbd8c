"""Declarative invalidation rules: which cache entries a change to a table row makes stale.

A :class:`Rule` names a table and says, as a function of a row, what to invalidate: ``tags``
(``cache.invalidate_tags``), ``keys`` (entry ids for ``cache.delete``) or ``namespace``
(``cache.bump``). The consumer evaluates it on the rows each change carries and batches the
results per transaction into one :class:`Invalidation`.

Rows are :class:`Row` mappings from column name to value (see :func:`pgoutput.convert` for the
types). A column the change did not carry (the non-key columns of a DELETE's old row under
``REPLICA IDENTITY DEFAULT``, or an unchanged TOASTed value) is *missing*: reading it raises
``KeyError``, which the consumer reports as a :class:`~semcache.errors.ReplicationError` naming
the column and the fix, instead of silently computing a wrong tag.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ..errors import InvalidInputError
from .pgoutput import UNCHANGED

Op = Literal["insert", "update", "delete", "truncate"]
ALL_OPS: Final[frozenset[str]] = frozenset({"insert", "update", "delete", "truncate"})

Names = str | Iterable[str] | None
RowFunction = Callable[["Row"], Names]


class Row(dict[str, Any]):
    """A changed row: column name -> value. Columns PostgreSQL did not send raise ``KeyError``.

    ``row.missing`` lists the columns of the table that this row lacks (not sent, or an
    unchanged TOASTed value); ``row.get(name)`` returns ``None`` for them like any dict.
    """

    def __init__(self, values: Mapping[str, Any], missing: Iterable[str] = ()) -> None:
        super().__init__((k, v) for k, v in values.items() if v is not UNCHANGED)
        self.missing: tuple[str, ...] = tuple(missing) + tuple(
            k for k, v in values.items() if v is UNCHANGED
        )


@dataclass(frozen=True)
class Invalidation:
    """What one change (or one transaction's changes, merged) invalidates.

    ``tags`` go to ``cache.invalidate_tags``, ``keys`` (entry ids) to ``cache.delete`` and
    ``namespaces`` to ``cache.bump``. All three are idempotent in effect, so applying an
    Invalidation twice leaves the cache as applying it once would (a bump just retires the
    namespace's entries again).
    """

    tags: frozenset[str] = field(default_factory=frozenset)
    keys: frozenset[str] = field(default_factory=frozenset)
    namespaces: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, tags: Names = None, keys: Names = None, namespaces: Names = None) -> Invalidation:
        """Build one from loose arguments (a string, an iterable of strings, or None)."""
        return cls(_names(tags, "tags"), _names(keys, "keys"), _names(namespaces, "namespaces"))

    def __or__(self, other: Invalidation) -> Invalidation:
        return Invalidation(
            self.tags | other.tags, self.keys | other.keys, self.namespaces | other.namespaces
        )

    def __bool__(self) -> bool:
        return bool(self.tags or self.keys or self.namespaces)

    def apply(self, cache: Any) -> int:
        """Apply to a cache; returns how many entries were removed by tags and keys.

        Order: tags, then keys, then namespace bumps. Each cache call commits before it
        returns, so when this returns every part is durable.
        """
        removed = 0
        if self.tags:
            removed += int(cache.invalidate_tags(*sorted(self.tags)))
        for key in sorted(self.keys):
            removed += int(bool(cache.delete(key)))
        for namespace in sorted(self.namespaces):
            cache.bump(namespace)
        return removed


EMPTY: Final = Invalidation()


def _names(value: Names, what: str) -> frozenset[str]:
    """Normalise a rule's output: None -> empty, "x" -> {"x"}, iterable of str -> set."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset((value,))
    try:
        items = list(value)
    except TypeError:
        raise TypeError(
            f"{what} must be a string, an iterable of strings or None, not {type(value).__name__}"
        ) from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{what} must be strings, got {item!r} ({type(item).__name__})")
    return frozenset(items)


class Rule:
    """Invalidate cache entries when rows of one table change.

    Args:
        table: the table's name (``"users"``), or ``"schema.table"``.
        tags: ``row -> tag or tags`` to pass to ``cache.invalidate_tags``.
        keys: ``row -> entry id or ids`` to pass to ``cache.delete``.
        namespace: ``row -> namespace(s)`` to ``cache.bump``, or a constant string (or list of
            strings) bumped on every change of the table.
        schema: the table's schema (default ``"public"``).
        ops: the operations that trigger the rule, a subset of ``insert``, ``update``,
            ``delete``, ``truncate`` (default: all).
        on_truncate: what a TRUNCATE invalidates, since it names no rows: an
            :class:`Invalidation`, or a string / list of strings taken as tags. Default: the
            table tag (:attr:`table_tag`, ``"table:users"``, or ``"table:schema.users"``
            outside ``public``) plus the rule's constant namespace(s), if any. So tag entries
            that derive from a table with its table tag too, or use a constant namespace, or
            pass ``on_truncate``, for a TRUNCATE to reach them.

    For an UPDATE the rule is applied to the new row and, when PostgreSQL sends it, the old
    row; for a DELETE to the old row; for an INSERT to the new row. What the old row holds
    depends on the table's replica identity (see ``docs/cdc.md``).
    """

    def __init__(
        self,
        table: str,
        *,
        tags: RowFunction | None = None,
        keys: RowFunction | None = None,
        namespace: RowFunction | str | Iterable[str] | None = None,
        schema: str = "public",
        ops: Iterable[Op] | None = None,
        on_truncate: Invalidation | str | Iterable[str] | None = None,
    ) -> None:
        if not isinstance(table, str) or not table:
            raise InvalidInputError("Rule: table must be a non-empty string")
        if "." in table:
            schema, _, table = table.partition(".")
        if not schema or not table:
            raise InvalidInputError("Rule: table must be 'name' or 'schema.name'")
        if tags is None and keys is None and namespace is None:
            raise InvalidInputError(f"Rule({table!r}) needs tags=, keys= or namespace=")
        for name, fn in (("tags", tags), ("keys", keys)):
            if fn is not None and not callable(fn):
                raise InvalidInputError(f"Rule({table!r}): {name}= must be a function of the row")
        chosen = ALL_OPS if ops is None else frozenset(ops)
        if not chosen or not chosen <= ALL_OPS:
            raise InvalidInputError(
                f"Rule({table!r}): ops must be a non-empty subset of {sorted(ALL_OPS)}, "
                f"got {sorted(chosen)}"
            )
        self.table = table
        self.schema = schema
        self.tags = tags
        self.keys = keys
        self.namespace = namespace
        self.ops: frozenset[str] = chosen
        constant_ns = (
            frozenset()
            if namespace is None or callable(namespace)
            else _names(namespace, "namespace")
        )
        self._constant_namespaces = constant_ns
        if on_truncate is None:
            self.truncate_invalidation = Invalidation(
                tags=frozenset((self.table_tag,)), namespaces=constant_ns
            )
        elif isinstance(on_truncate, Invalidation):
            self.truncate_invalidation = on_truncate
        else:
            self.truncate_invalidation = Invalidation(tags=_names(on_truncate, "on_truncate"))

    @property
    def qualified_name(self) -> str:
        """``schema.table``."""
        return f"{self.schema}.{self.table}"

    @property
    def table_tag(self) -> str:
        """The table-wide tag a TRUNCATE invalidates by default: ``table:<table>``."""
        return f"table:{self.table}" if self.schema == "public" else f"table:{self.qualified_name}"

    def applies_to(self, op: str) -> bool:
        return op in self.ops

    def for_row(self, row: Row) -> Invalidation:
        """What a change to ``row`` invalidates. A missing column raises ``KeyError``."""
        namespaces: Names
        if self.namespace is None:
            namespaces = None
        elif callable(self.namespace):
            namespaces = self.namespace(row)
        else:
            namespaces = self._constant_namespaces
        return Invalidation.of(
            tags=self.tags(row) if self.tags is not None else None,
            keys=self.keys(row) if self.keys is not None else None,
            namespaces=namespaces,
        )

    def for_truncate(self) -> Invalidation:
        """What a TRUNCATE of the table invalidates (see ``on_truncate``)."""
        return self.truncate_invalidation

    def __repr__(self) -> str:
        parts = [repr(self.qualified_name)]
        for name in ("tags", "keys", "namespace"):
            if getattr(self, name) is not None:
                parts.append(f"{name}=...")
        if self.ops != ALL_OPS:
            parts.append(f"ops={sorted(self.ops)}")
        return f"Rule({', '.join(parts)})"
