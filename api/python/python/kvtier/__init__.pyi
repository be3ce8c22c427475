"""Typed stubs of the kvtier package."""

from typing import Any, Optional, Sequence

from ._kvtier import (
    DEFAULT_CHUNK_TOKENS as DEFAULT_CHUNK_TOKENS,
    DEFAULT_TENANT as DEFAULT_TENANT,
    BadFrameError as BadFrameError,
    BusyError as BusyError,
    ClosedError as ClosedError,
    ConnectError as ConnectError,
    CorruptError as CorruptError,
    InternalError as InternalError,
    InvalidArgumentError as InvalidArgumentError,
    KvtierError as KvtierError,
    Layout as Layout,
    Lookup as Lookup,
    Model as Model,
    NotFoundError as NotFoundError,
    ProtocolError as ProtocolError,
    TierFullError as TierFullError,
    TooLargeError as TooLargeError,
    UnauthorizedError as UnauthorizedError,
    UnsupportedError as UnsupportedError,
    chunk_keys as chunk_keys,
)
from . import _kvtier

__version__: str
ERROR_CLASSES: dict[int, type[KvtierError]]

def as_buffer(obj: Any) -> Any: ...

class Client(_kvtier.Client):
    def stats(self) -> dict[str, Any]: ...
