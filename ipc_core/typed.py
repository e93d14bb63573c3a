"""Typed messages, as the reference's Crystal bindings define them.

A typed message is one LibIPC payload: the first byte is a u8 type number,
the rest is the object serialised as JSON (default) or CBOR (``cbor2``, the
``cbor`` extra). A :class:`TypeRegistry` maps type numbers to dataclasses so
both ends agree on what a number means::

    registry = TypeRegistry()

    @registry.register(1)
    @dataclass
    class Ping:
        seq: int

    payload = registry.encode(Ping(3))     # b'\\x01{"seq":3}'
    registry.decode(payload)               # Ping(seq=3)

Decoding accepts only what encoding produces: a JSON body is strict UTF-8
(no BOM, no UTF-16/32) without ``NaN``/``Infinity`` or duplicate keys; a
decoded body (JSON or CBOR) is a tree of plain values (None, bool, int,
float, str, bytes, lists, maps with string keys): CBOR ``undefined``, simple
values, tags that decode to anything else, and shared references (a cyclic
list) are refused. Each field is then checked against its declared type
(``int``, ``float``, ``str``, ``bytes``, ``bool``, ``list[T]``,
``dict[str, T]``, ``tuple[...]``, ``X | None``, ``Literal``, nested
dataclasses; ``Any`` or another annotation is not checked further). Anything
else is the library's :class:`ProtocolError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from .errors import ProtocolError, UsageError

T = TypeVar("T")
Format = Literal["json", "cbor"]

_PLAIN_SCALARS = (str, int, float, bool, bytes, type(None))
_NONE = type(None)


def _cbor() -> Any:
    try:
        import cbor2
    except ImportError:  # pragma: no cover - depends on the extra
        raise UsageError(
            "CBOR typed messages need the 'cbor' extra (pip install libipc[cbor])"
        ) from None
    return cbor2


class _Bad(Exception):
    """A decoded body that encode() would not have produced."""


class TypeRegistry:
    """Maps u8 type numbers to dataclasses and (de)serialises them."""

    def __init__(self, fmt: Format = "json") -> None:
        if fmt not in ("json", "cbor"):
            raise UsageError(f"unknown typed-message format {fmt!r}")
        if fmt == "cbor":
            _cbor()
        self.format: Format = fmt
        self._by_type: dict[int, type] = {}
        self._by_class: dict[type, int] = {}
        self._hints: dict[type, dict[str, Any]] = {}

    def register(self, type_id: int) -> Callable[[type[T]], type[T]]:
        """Class decorator: messages of ``type_id`` are instances of the class."""
        if not 0 <= type_id <= 255:
            raise UsageError("a message type is a u8 (0..255)")
        if type_id in self._by_type:
            raise UsageError(f"message type {type_id} is already registered")

        def decorate(cls: type[T]) -> type[T]:
            if not dataclasses.is_dataclass(cls):
                raise UsageError(f"{cls.__name__} must be a dataclass to be a typed message")
            self._by_type[type_id] = cls
            self._by_class[cls] = type_id
            return cls

        return decorate

    def encode(self, obj: Any) -> bytes:
        """Serialise a registered dataclass instance into one payload."""
        type_id = self._by_class.get(type(obj))
        if type_id is None:
            raise UsageError(f"{type(obj).__name__} is not a registered message type")
        try:
            body = self._dump(dataclasses.asdict(obj))
        except (TypeError, ValueError, RecursionError) as exc:
            raise UsageError(f"cannot serialise {type(obj).__name__}: {exc}") from None
        return bytes((type_id,)) + body

    def decode(self, payload: bytes) -> Any:
        """Build the object a payload carries; ProtocolError if it is not one."""
        if not payload:
            raise ProtocolError("typed message is empty (no type byte)")
        cls = self._by_type.get(payload[0])
        if cls is None:
            raise ProtocolError(f"unknown message type {payload[0]}")
        hints = self._type_hints(cls)
        try:
            data = self._load(bytes(payload[1:]))
            _check_tree(data)
            return _build(cls, data, hints, self)
        except (_Bad, ValueError, TypeError, RecursionError) as exc:
            raise ProtocolError(f"bad {cls.__name__} message: {exc}") from None
        except Exception as exc:  # cbor2 raises its own decode errors
            raise ProtocolError(f"bad {cls.__name__} message: {exc}") from None

    def _type_hints(self, cls: type) -> dict[str, Any]:
        hints = self._hints.get(cls)
        if hints is None:
            try:
                hints = typing.get_type_hints(cls)
            except Exception as exc:  # an annotation that names nothing: the app's bug
                raise UsageError(
                    f"cannot resolve the field types of {cls.__name__}: {exc}"
                ) from None
            self._hints[cls] = hints
        return hints

    def _dump(self, data: dict[str, Any]) -> bytes:
        if self.format == "json":
            return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
        return bytes(_cbor().dumps(data))

    def _load(self, body: bytes) -> dict[str, Any]:
        data = _load_json(body) if self.format == "json" else _cbor().loads(body)
        if not isinstance(data, dict):
            raise _Bad("body is not an object")
        return data


def _load_json(body: bytes) -> Any:
    # Strict UTF-8: json.loads(bytes) would also take UTF-16/32 and a BOM.
    text = body.decode("utf-8")
    if text.startswith("\ufeff"):
        raise _Bad("JSON body starts with a byte-order mark")
    return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def _no_constant(name: str) -> Any:
    raise _Bad(f"JSON {name} is not a number encode() produces")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Bad("duplicate key in a JSON object")
    return result


def _check_tree(data: Any) -> None:
    """Refuse what encode() could not serialise back: non-plain values (CBOR
    undefined, simple values, unknown or exotic tags), non-string keys, and
    any container reached twice (CBOR shared references: a cycle would make
    encode() recurse forever, a DAG blow up exponentially). Iterative, so a
    deep body cannot exhaust the stack here."""
    seen: set[int] = set()
    stack = [data]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is list or kind is dict:
            if id(value) in seen:
                raise _Bad("shared or cyclic reference")
            seen.add(id(value))
            if kind is dict:
                for key in value:
                    if type(key) is not str:
                        raise _Bad(f"map key of type {type(key).__name__}")
                stack.extend(value.values())
            else:
                stack.extend(value)
        elif kind not in _PLAIN_SCALARS:
            raise _Bad(f"value of type {kind.__name__} is not plain data")
        elif kind is float and not math.isfinite(value):
            raise _Bad(f"non-finite number {value}")


def _build(cls: type, data: dict[str, Any], hints: dict[str, Any], reg: TypeRegistry) -> Any:
    """The dataclass from a checked tree, each field checked against its type."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise _Bad(f"unknown field {sorted(unknown)[0]!r}")
    values = {
        name: _conform(value, hints.get(name, Any), name, reg) for name, value in data.items()
    }
    return cls(**values)


def _conform(value: Any, hint: Any, where: str, reg: TypeRegistry) -> Any:
    """``value`` as field type ``hint`` wants it, or _Bad."""
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        for option in args:
            try:
                return _conform(value, option, where, reg)
            except _Bad:
                continue
        raise _Bad(f"{where}: {_kind(value)} does not match {_name(hint)}")
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Bad(f"{where}: {value!r} is not one of {list(args)!r}")
    if hint is None or hint is _NONE:
        return _expect(value, hint, where, ok=value is None)
    if hint is bool:
        return _expect(value, hint, where, ok=type(value) is bool)
    if hint is int:
        return _expect(value, hint, where, ok=type(value) is int)
    if hint is float:
        if type(value) is int:
            return float(value)
        return _expect(value, hint, where, ok=type(value) is float)
    if hint in (str, bytes):
        return _expect(value, hint, where, ok=type(value) is hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        _expect(value, hint, where, ok=type(value) is dict)
        return _build(hint, value, reg._type_hints(hint), reg)
    container = origin or hint
    if container is list:
        _expect(value, hint, where, ok=type(value) is list)
        if not args:
            return value
        return [_conform(v, args[0], f"{where}[{i}]", reg) for i, v in enumerate(value)]
    if container is tuple:
        _expect(value, hint, where, ok=type(value) is list)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_conform(v, args[0], f"{where}[{i}]", reg) for i, v in enumerate(value))
        if len(args) != len(value):
            raise _Bad(f"{where}: {len(value)} items, {_name(hint)} wants {len(args)}")
        return tuple(
            _conform(v, a, f"{where}[{i}]", reg)
            for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if container is dict:
        _expect(value, hint, where, ok=type(value) is dict)
        if len(args) != 2:
            return value
        return {k: _conform(v, args[1], f"{where}[{k!r}]", reg) for k, v in value.items()}
    return value  # an annotation we do not check further (the tree is plain already)


def _expect(value: Any, hint: Any, where: str, *, ok: bool) -> Any:
    if not ok:
        raise _Bad(f"{where}: {_kind(value)} where {_name(hint)} is declared")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)
