"""kvtier: the Python client of kvtier, the KV-cache sidecar for LLM serving.

The protocol and the key hashing exist once, in Rust: this package is kvtier-client's
BlockingClient and kvtier-cache's key chain compiled into ``kvtier._kvtier`` (PyO3), plus
torch tensor handling here and the vLLM connector in :mod:`kvtier.vllm`.

>>> import kvtier, numpy as np
>>> c = kvtier.Client("127.0.0.1:7070", tenant="team-a")
>>> layout = kvtier.Layout.builtin("smollm2-135m")
>>> keys = c.chunk_keys(token_ids, model=layout)
>>> c.put_chunk(keys, 0, np.zeros(layout.chunk_bytes(256), np.uint8), model=layout)
>>> c.lookup(token_ids, model=layout).hit_chunks
1

Every request releases the GIL. Buffers (bytes, bytearray, memoryview, numpy arrays, CPU torch
tensors) are read and written in place; do not modify them from another thread during a call.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from . import _kvtier
from ._kvtier import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_TENANT,
    BadFrameError,
    BusyError,
    ClosedError,
    ConnectError,
    CorruptError,
    InternalError,
    InvalidArgumentError,
    KvtierError,
    Layout,
    Lookup,
    NotFoundError,
    ProtocolError,
    TierFullError,
    TooLargeError,
    UnauthorizedError,
    UnsupportedError,
    chunk_keys,
)

__version__ = _kvtier.__version__

#: The exception class for each kvtier wire error code.
ERROR_CLASSES = {
    1: BadFrameError,
    2: UnauthorizedError,
    3: NotFoundError,
    4: TierFullError,
    5: TooLargeError,
    6: CorruptError,
    7: UnsupportedError,
    8: BusyError,
    9: InternalError,
    10: InvalidArgumentError,
}


def as_buffer(obj: Any) -> Any:
    """A buffer-protocol view of ``obj`` without copying it.

    torch tensors do not export the buffer protocol themselves: a contiguous CPU tensor is
    viewed as bytes through ``Tensor.numpy()`` (which shares its memory; bfloat16 goes through a
    uint8 view, as numpy has no bfloat16). A non-contiguous or non-CPU tensor raises
    ``ValueError`` instead of being copied behind the caller's back. Other objects are returned
    as they are.
    """
    if type(obj).__module__.startswith("torch") and hasattr(obj, "is_contiguous"):
        import torch

        if obj.device.type != "cpu":
            raise ValueError(f"tensor is on {obj.device}; move it to the CPU first")
        if not obj.is_contiguous():
            raise ValueError("tensor must be contiguous (call .contiguous())")
        return obj.detach().reshape(-1).view(torch.uint8).numpy()
    return obj


class Client(_kvtier.Client):
    """A connection to a kvtier server.

    ``Client(address, token=None, tenant=None)``: ``address`` is ``host:port`` (TCP) or
    ``unix:/path`` (same host; reads then use the server's shared memory). ``token`` is the
    server's bearer token, ``tenant`` the key space (the server's ``"default"`` when omitted).
    Errors raise subclasses of :class:`KvtierError`.
    """

    def put(
        self,
        key: str,
        data: Any,
        model: Any,
        tokens: int = DEFAULT_CHUNK_TOKENS,
        depth: int = 0,
        parent: Optional[str] = None,
    ) -> None:
        super().put(key, as_buffer(data), model, tokens, depth, parent)

    def put_chunk(
        self,
        keys: Sequence[str],
        i: int,
        data: Any,
        model: Any,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ) -> None:
        super().put_chunk(list(keys), i, as_buffer(data), model, chunk_tokens)

    def get_into(
        self, keys: Sequence[str], out: Any, accept_lossy: bool = False
    ) -> list[Optional[tuple[int, int]]]:
        return super().get_into(list(keys), as_buffer(out), accept_lossy)

    def stats(self) -> dict:
        """The server's statistics (tiers, counters) as a dict."""
        return json.loads(self.stats_json())


__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_TENANT",
    "ERROR_CLASSES",
    "BadFrameError",
    "BusyError",
    "Client",
    "ClosedError",
    "ConnectError",
    "CorruptError",
    "InternalError",
    "InvalidArgumentError",
    "KvtierError",
    "Layout",
    "Lookup",
    "NotFoundError",
    "ProtocolError",
    "TierFullError",
    "TooLargeError",
    "UnauthorizedError",
    "UnsupportedError",
    "as_buffer",
    "chunk_keys",
]
