"""kvtier as a vLLM KV connector (vLLM 0.32, ``KVConnectorBase_V1``).

Use it with::

    --kv-transfer-config '{"kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"address": "127.0.0.1:7070", "tenant": "team-a"}}'

Extra config keys: ``address`` (``host:port`` or ``unix:/path``), ``token``, ``tenant``,
``salt``, ``model_id`` (the model name folded into the layout fingerprint; default vLLM's model
name), ``chunk_tokens`` (a multiple of vLLM's block size; default the block size).

Mapping (ARCHITECTURE.md, "Python package and vLLM connector"): one kvtier chunk is
``chunk_tokens / block_size`` whole vLLM blocks; only full chunks are looked up, loaded and
stored, and a hit leaves at least the prompt's last token to compute. A chunk's payload is
kvtier's layout ``[layer][K|V][token][kv_head][head_dim]`` in the cache's dtype, gathered from
vLLM's CPU cache blocks ``[block, kv_head, K rows | V rows, head_dim]``.

Failures never produce wrong output: a failed lookup is a miss, a failed or short load reports
its blocks through ``get_block_ids_with_load_errors`` (vLLM recomputes them), a failed save is
dropped. Each incident is logged once, and the connector reconnects at most every
``RECONNECT_S`` seconds.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

import kvtier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# Under vLLM's logger namespace, so it is printed with vLLM's handler and format.
logger = logging.getLogger("vllm.kvtier")

RECONNECT_S = 5.0
_DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}


class _Link:
    """The connection to kvtier, shared by the connector's calls: connects lazily, reconnects at
    most every RECONNECT_S, and logs an outage once (when it starts) and its end once."""

    def __init__(self, cfg: dict[str, Any]):
        self.address = str(cfg.get("address", "127.0.0.1:7070"))
        self.token = cfg.get("token")
        self.tenant = cfg.get("tenant")
        self._client: Optional[kvtier.Client] = None
        self._next_try = 0.0
        self._down = False
        self._lock = threading.Lock()

    def client(self) -> Optional[kvtier.Client]:
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._next_try:
                return None
            try:
                self._client = kvtier.Client(self.address, token=self.token, tenant=self.tenant,
                                             client_name="kvtier-vllm")
            except kvtier.KvtierError as e:
                self._next_try = time.monotonic() + RECONNECT_S
                self._fail_locked(e)
                return None
            return self._client

    def ok(self) -> None:
        with self._lock:
            if self._down:
                self._down = False
                logger.warning("kvtier at %s is reachable again", self.address)

    def fail(self, e: BaseException) -> None:
        with self._lock:
            if isinstance(e, (kvtier.ClosedError, kvtier.ConnectError, kvtier.ProtocolError)):
                self._client = None
                self._next_try = time.monotonic() + RECONNECT_S
            self._fail_locked(e)

    def _fail_locked(self, e: BaseException) -> None:
        if not self._down:
            self._down = True
            logger.warning("kvtier at %s failed (%s: %s); recomputing until it is back",
                           self.address, type(e).__name__, e)

    @property
    def down(self) -> bool:
        return self._down


@dataclass
class _Transfer:
    """Chunks of one request to load or store this step."""

    req_id: str
    keys: list[str]  # the prompt's chunk keys
    first: int  # first chunk to move
    count: int  # chunks to move
    block_ids: list[int]  # vLLM blocks of those chunks, in order


@dataclass
class KvtierConnectorMetadata(KVConnectorMetadata):
    loads: list[_Transfer] = field(default_factory=list)
    stores: list[_Transfer] = field(default_factory=list)


def _layer_index(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


class KvtierConnector(KVConnectorBase_V1):
    """vLLM KV connector backed by kvtier (one instance in the scheduler, one per worker)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: Any = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        cfg = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._block_size = int(vllm_config.cache_config.block_size)
        self._chunk_tokens = int(cfg.get("chunk_tokens", self._block_size))
        if self._chunk_tokens % self._block_size != 0:
            raise ValueError(f"chunk_tokens {self._chunk_tokens} must be a multiple of vLLM's "
                             f"block size {self._block_size}")
        self._bpc = self._chunk_tokens // self._block_size
        self._salt = cfg.get("salt")
        mc = vllm_config.model_config
        self._layout = kvtier.Layout(
            str(cfg.get("model_id", mc.served_model_name or mc.model)),
            int(mc.get_num_layers(vllm_config.parallel_config)),
            int(mc.get_num_kv_heads(vllm_config.parallel_config)),
            int(mc.get_head_size()),
            _DTYPES.get(vllm_config.cache_config.cache_dtype, None)
            or _DTYPES.get(mc.dtype, "f32"),
        )
        self._link = _Link(cfg)
        logger.info("kvtier connector (%s): %r, fingerprint %#x, %d-token chunks at %s",
                    role.name, self._layout, self._layout.fingerprint, self._chunk_tokens,
                    self._link.address)
        # Scheduler side.
        self._hits: dict[str, tuple[list[str], int]] = {}  # req -> (keys, chunks in kvtier)
        self._need_load: dict[str, int] = {}  # req -> chunks to load
        # Worker side.
        self._caches: dict[str, torch.Tensor] = {}
        self._layer_of: dict[str, int] = {}
        self._staging: dict[str, torch.Tensor] = {}  # req -> [chunks, layers, 2, ct, H, D]
        self._load_errors: set[int] = set()
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-save")
        self._pending_saves: list[Any] = []
        self.loaded_tokens = 0  # observable by tests and the bench (worker side)
        self.stored_chunks = 0

    # ---------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = list(request.prompt_token_ids or [])
        # At least the last prompt token is computed by vLLM (it yields the first logits).
        usable = (len(tokens) - 1) // self._chunk_tokens * self._chunk_tokens
        if usable <= 0 or num_computed_tokens % self._chunk_tokens != 0:
            return 0, False
        client = self._link.client()
        if client is None:
            return 0, False
        try:
            hit = client.lookup(tokens[:usable], model=self._layout, salt=self._salt,
                                chunk_tokens=self._chunk_tokens)
            self._link.ok()
        except kvtier.KvtierError as e:
            self._link.fail(e)
            return 0, False
        all_keys = client.chunk_keys(tokens, model=self._layout, salt=self._salt,
                                     chunk_tokens=self._chunk_tokens)
        self._hits[request.request_id] = (all_keys, hit.hit_chunks)
        hit_tokens = hit.hit_chunks * self._chunk_tokens
        return max(0, hit_tokens - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int):
        if num_external_tokens > 0:
            self._need_load[request.request_id] = num_external_tokens // self._chunk_tokens

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvtierConnectorMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            hit = self._hits.pop(new.req_id, None)
            if hit is None:
                continue
            keys, held = hit
            block_ids = list(new.block_ids[0])
            local = new.num_computed_tokens  # vLLM's own prefix cache plus what we load
            n_load = self._need_load.pop(new.req_id, 0)
            if n_load > 0:
                # External tokens start where vLLM's own (chunk-aligned) hit ends.
                first_load = held - n_load
                meta.loads.append(self._transfer(new.req_id, keys, first_load, n_load,
                                                 block_ids))
            # Store the chunks kvtier lacks once their tokens are all computed this step.
            scheduled = scheduler_output.num_scheduled_tokens.get(new.req_id, 0)
            done_chunks = min(len(keys), (local + scheduled) // self._chunk_tokens)
            if done_chunks > held:
                meta.stores.append(self._transfer(new.req_id, keys, held, done_chunks - held,
                                                  block_ids))
        self._need_load.clear()
        return meta

    def _transfer(self, req_id: str, keys: list[str], first: int, count: int,
                  block_ids: list[int]) -> _Transfer:
        blocks = block_ids[first * self._bpc:(first + count) * self._bpc]
        return _Transfer(req_id, keys, first, count, blocks)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._hits.pop(request.request_id, None)
        self._need_load.pop(request.request_id, None)
        # Saves copy the blocks out during the forward pass: vLLM may free them at once.
        return False, None

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self._caches = dict(kv_caches)
        self._layer_of = {n: i for i, n in enumerate(sorted(kv_caches, key=_layer_index))}
        for name, t in kv_caches.items():
            l = self._layout
            if _DTYPES.get(t.dtype) != l.dtype:
                raise ValueError(f"kvtier connector: layer {name} cache is {t.dtype}, the "
                                 f"layout says {l.dtype}")
            want = (l.kv_heads, self._block_size, 2 * l.head_dim)
            if tuple(t.shape[1:]) != want:
                raise ValueError(f"kvtier connector: layer {name} cache has shape "
                                 f"{tuple(t.shape)}, expected [blocks, {want}] (CPU backend)")

    def _blocks_view(self, t: torch.Tensor) -> torch.Tensor:
        """[blocks, H, bs, 2D] (the CPU backend's cache) viewed [blocks, H, 2, bs, D]."""
        l = self._layout
        return t.view(t.shape[0], l.kv_heads, 2, self._block_size, l.head_dim)

    def _chunk_shape(self) -> tuple[int, ...]:
        l = self._layout
        return (l.num_layers, 2, self._chunk_tokens, l.kv_heads, l.head_dim)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierConnectorMetadata)
        for tr in meta.loads:
            self._load(tr)

    def _load(self, tr: _Transfer) -> None:
        keys = tr.keys[tr.first:tr.first + tr.count]
        some = next(iter(self._caches.values()))
        buf = torch.empty((tr.count, *self._chunk_shape()), dtype=some.dtype)
        loaded = 0
        t0 = time.perf_counter()
        client = self._link.client()
        if client is not None:
            try:
                placed = client.get_into(keys, buf)
                self._link.ok()
                size = buf[0].numel() * buf.element_size()
                for i, p in enumerate(placed):
                    if p != (i * size, size):
                        break
                    loaded += 1
            except (kvtier.KvtierError, ValueError) as e:
                self._link.fail(e)
        if loaded < tr.count:
            self._load_errors.update(tr.block_ids[loaded * self._bpc:])
        if loaded == 0:
            return
        ids = torch.tensor(tr.block_ids[:loaded * self._bpc], dtype=torch.long)
        src = buf[:loaded]  # [chunks, L, 2, ct, H, D]
        c, L, _, ct, H, D = src.shape
        # -> [chunks * bpc blocks, H, 2, bs, D] per layer.
        for name, cache in self._caches.items():
            layer = src[:, self._layer_of[name]]  # [c, 2, ct, H, D]
            blocks = (layer.reshape(c, 2, self._bpc, self._block_size, H, D)
                      .permute(0, 2, 4, 1, 3, 5)
                      .reshape(c * self._bpc, H, 2, self._block_size, D))
            self._blocks_view(cache)[ids] = blocks
        self.loaded_tokens += loaded * self._chunk_tokens
        ms = (time.perf_counter() - t0) * 1e3
        logger.info("kvtier: loaded %d tokens (%d bytes) in %.1f ms", loaded * self._chunk_tokens,
                    src.numel() * src.element_size(), ms)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # start_load_kv fills every layer before the forward pass starts.
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvtierConnectorMetadata) or not meta.stores:
            return
        if self._link.down and self._link.client() is None:
            return
        li = self._layer_of.get(layer_name)
        if li is None:
            return
        for tr in meta.stores:
            st = self._staging.get(tr.req_id)
            if st is None:
                st = torch.empty((tr.count, *self._chunk_shape()), dtype=kv_layer.dtype)
                self._staging[tr.req_id] = st
            ids = torch.tensor(tr.block_ids, dtype=torch.long)
            blocks = self._blocks_view(kv_layer)[ids]  # [c*bpc, H, 2, bs, D]
            H, D = self._layout.kv_heads, self._layout.head_dim
            rows = (blocks.reshape(tr.count, self._bpc, H, 2, self._block_size, D)
                    .permute(0, 3, 1, 4, 2, 5)
                    .reshape(tr.count, 2, self._chunk_tokens, H, D))
            st[:, li].copy_(rows)

    def wait_for_save(self):
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvtierConnectorMetadata):
            return
        for tr in meta.stores:
            st = self._staging.pop(tr.req_id, None)
            if st is not None:
                # The puts run on a thread (the GIL is released during I/O), so the next
                # forward pass does not wait for kvtier.
                self._pending_saves.append(self._saver.submit(self._store, tr, st))
        self._pending_saves = [f for f in self._pending_saves if not f.done()]

    def _store(self, tr: _Transfer, st: torch.Tensor) -> None:
        client = self._link.client()
        if client is None:
            return
        t0 = time.perf_counter()
        try:
            for i in range(tr.count):
                client.put_chunk(tr.keys, tr.first + i, st[i], model=self._layout,
                                 chunk_tokens=self._chunk_tokens)
                self.stored_chunks += 1
            self._link.ok()
            logger.info("kvtier: stored %d tokens (%d bytes) in %.1f ms",
                        tr.count * self._chunk_tokens, st.numel() * st.element_size(),
                        (time.perf_counter() - t0) * 1e3)
        except kvtier.KvtierError as e:
            self._link.fail(e)

    def get_block_ids_with_load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def shutdown(self):
        self._saver.shutdown(wait=True)
