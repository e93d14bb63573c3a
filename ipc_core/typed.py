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
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from .errors import ProtocolError, UsageError

T = TypeVar("T")
Format = Literal["json", "cbor"]


def _cbor() -> Any:
    try:
        import cbor2
    except ImportError:  # pragma: no cover - depends on the extra
        raise UsageError(
            "CBOR typed messages need the 'cbor' extra (pip install libipc[cbor])"
        ) from None
    return cbor2


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
        return bytes((type_id,)) + self._dump(dataclasses.asdict(obj))

    def decode(self, payload: bytes) -> Any:
        """Build the object a payload carries; ProtocolError if it is not one."""
        if not payload:
            raise ProtocolError("typed message is empty (no type byte)")
        cls = self._by_type.get(payload[0])
        if cls is None:
            raise ProtocolError(f"unknown message type {payload[0]}")
        try:
            data = self._load(payload[1:])
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"bad {cls.__name__} message: {exc}") from None
        except Exception as exc:  # cbor2 raises its own decode errors
            raise ProtocolError(f"bad {cls.__name__} message: {exc}") from None

    def _dump(self, data: dict[str, Any]) -> bytes:
        if self.format == "json":
            return json.dumps(data, separators=(",", ":")).encode()
        return bytes(_cbor().dumps(data))

    def _load(self, body: bytes) -> dict[str, Any]:
        data = json.loads(body) if self.format == "json" else _cbor().loads(body)
        if not isinstance(data, dict):
            raise ValueError("body is not an object")
        return data
