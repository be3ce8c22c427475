"""The kvtier Python client against a real `kvtier serve`: keys equal to the Rust side's,
byte-exact round trips through every buffer kind and both transports, tenant isolation, and
errors mapped to their exception classes."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import kvtier

LAYOUT = kvtier.Layout.builtin("smollm2-135m")
CT = 16  # small chunks keep payloads small: 30 layers x 2 x 3 x 64 x 16 tokens x 2 B = 368,640 B


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, 49152, size=n)]


def payload(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(LAYOUT.chunk_bytes(CT) // 2).astype(np.float16)


def test_layout_and_key_shape():
    assert LAYOUT.num_layers == 30 and LAYOUT.kv_heads == 3 and LAYOUT.head_dim == 64
    assert LAYOUT.dtype == "f16" and LAYOUT.chunk_bytes(CT) == 30 * 2 * 3 * 64 * CT * 2
    same = kvtier.Layout("HuggingFaceTB/SmolLM2-135M-Instruct", 30, 3, 64, "f16")
    assert same == LAYOUT and same.fingerprint == LAYOUT.fingerprint
    assert kvtier.Layout("other", 30, 3, 64).fingerprint != LAYOUT.fingerprint
    toks = prompt(40)
    keys = kvtier.chunk_keys(toks, LAYOUT, chunk_tokens=CT)
    assert len(keys) == 2  # the trailing 8 tokens are a partial chunk: no key
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys)
    # Chained: a shared prefix shares keys, a change in chunk 0 changes every later key.
    assert kvtier.chunk_keys(toks[:16] + prompt(16, 9), LAYOUT, chunk_tokens=CT)[0] == keys[0]
    changed = [toks[0] + 1] + toks[1:]
    assert not set(kvtier.chunk_keys(changed, LAYOUT, chunk_tokens=CT)) & set(keys)
    # The namespace: tenant, salt, chunk size and model all change the keys.
    assert kvtier.chunk_keys(toks, LAYOUT, tenant="b", chunk_tokens=CT) != keys
    assert kvtier.chunk_keys(toks, LAYOUT, salt="lora-1", chunk_tokens=CT) != keys
    assert kvtier.chunk_keys(toks, "llama-3.1-8b", chunk_tokens=CT) != keys
    assert kvtier.chunk_keys(toks, LAYOUT.fingerprint, chunk_tokens=CT) == keys
    assert kvtier.chunk_keys(toks, "smollm2-135m", tenant="default", chunk_tokens=CT) == keys


@pytest.mark.parametrize("salt", [None, "lora-7"])
def test_keys_equal_the_rust_side(server, salt):
    """Chunks stored under keys computed in Python are the chunks the Rust CLI finds when it
    hashes the same tokens (server-side hashing, kvtier-prompt's model table)."""
    toks = prompt(5 * CT + 3, seed=1)
    c = kvtier.Client(server.address, tenant="team-a")
    keys = c.chunk_keys(toks, model="smollm2-135m", salt=salt, chunk_tokens=CT)
    assert keys == kvtier.chunk_keys(toks, LAYOUT, tenant="team-a", salt=salt, chunk_tokens=CT)
    for i in range(len(keys)):
        c.put_chunk(keys, i, payload(i), model=LAYOUT, chunk_tokens=CT)
    args = ["lookup", "--json", "--model", "smollm2-135m", "--chunk-tokens", str(CT),
            "--tokens", ",".join(map(str, toks))]
    if salt:
        args += ["--salt", salt]
    out = json.loads(server.cli(*args, tenant="team-a"))
    assert out["hit_tokens"] == 5 * CT
    assert [h["key"] for h in out["hits"]] == keys
    # Another tenant asking the CLI finds nothing.
    other = json.loads(server.cli(*args, tenant="team-b"))
    assert other["hit_tokens"] == 0
    hit = c.lookup(toks, model=LAYOUT, salt=salt, chunk_tokens=CT)
    assert (hit.hit_chunks, hit.hit_tokens, hit.keys) == (5, 5 * CT, keys)
    assert hit.fidelities == ["exact"] * 5


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_byte_exact_round_trip(server, transport):
    addr = server.address if transport == "tcp" else server.unix_address
    c = kvtier.Client(addr)
    assert c.shared_memory == (transport == "unix")
    toks = prompt(3 * CT, seed=2)
    keys = c.chunk_keys(toks, model=LAYOUT, chunk_tokens=CT)
    chunks = [payload(10 + i) for i in range(3)]
    c.put(keys[0], chunks[0], model=LAYOUT, tokens=CT)  # numpy array
    c.put(keys[1], bytearray(chunks[1].tobytes()), model=LAYOUT, tokens=CT, depth=1,
          parent=keys[0])
    c.put(keys[2], memoryview(chunks[2].tobytes()), model=LAYOUT, tokens=CT, depth=2,
          parent=keys[1])
    assert c.lookup(toks, model=LAYOUT, chunk_tokens=CT).hit_chunks == 3
    got = c.get(keys)
    assert [g == x.tobytes() for g, x in zip(got, chunks)] == [True] * 3
    # get_into a numpy array of the chunks' dtype and shape: bytes land in place, packed.
    out = np.zeros((3, chunks[0].size), np.float16)
    missing = "0" * 32
    placed = c.get_into([keys[0], missing, keys[1], keys[2]], out)
    n = chunks[0].nbytes
    assert placed == [(0, n), None, (n, n), (2 * n, n)]
    assert np.array_equal(out.view(np.uint16), np.stack(chunks).view(np.uint16))
    # A bytearray works too, and a buffer too small is refused.
    ba = bytearray(n)
    assert c.get_into([keys[2]], ba) == [(0, n)] and bytes(ba) == chunks[2].tobytes()
    with pytest.raises(ValueError, match="too small"):
        c.get_into(keys, bytearray(n))
    with pytest.raises(BufferError):
        c.get_into(keys[:1], bytes(n))
    with pytest.raises(ValueError, match="contiguous"):
        c.put(keys[0], np.zeros((4, 4))[:, ::2], model=LAYOUT)
    assert c.delete(keys + [missing]) == 3
    assert c.get(keys) == [None, None, None]


def test_torch_tensors_round_trip(server):
    torch = pytest.importorskip("torch")
    c = kvtier.Client(server.address)
    keys = c.chunk_keys(prompt(CT, seed=3), model=LAYOUT, chunk_tokens=CT)
    t = torch.randn(LAYOUT.chunk_bytes(CT) // 2, dtype=torch.bfloat16)
    c.put(keys[0], t, model=LAYOUT, tokens=CT)
    out = torch.empty_like(t)
    assert c.get_into(keys, out) == [(0, t.numel() * 2)]
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))
    with pytest.raises(ValueError, match="contiguous"):
        c.put(keys[0], t.view(2, -1).t(), model=LAYOUT)


def test_tenants_never_see_each_other(server):
    toks = prompt(2 * CT, seed=4)
    a = kvtier.Client(server.address, tenant="a")
    b = kvtier.Client(server.unix_address, tenant="b")
    keys_a = a.chunk_keys(toks, model=LAYOUT, chunk_tokens=CT)
    for i in range(2):
        a.put_chunk(keys_a, i, payload(20 + i), model=LAYOUT, chunk_tokens=CT)
    assert a.lookup(toks, model=LAYOUT, chunk_tokens=CT).hit_chunks == 2
    assert b.lookup(toks, model=LAYOUT, chunk_tokens=CT).hit_chunks == 0
    # Even with a's raw keys, b reads and deletes nothing, over the socket or shared memory.
    assert b.get(keys_a) == [None, None]
    assert b.get_into(keys_a, bytearray(LAYOUT.chunk_bytes(CT) * 2)) == [None, None]
    assert b.delete(keys_a) == 0
    assert a.get(keys_a)[1] == payload(21).tobytes()


def test_errors_are_mapped(server, token_server):
    with pytest.raises(kvtier.ConnectError):
        kvtier.Client(f"127.0.0.1:{__import__('conftest').free_port()}")
    with pytest.raises(kvtier.UnauthorizedError):
        kvtier.Client(token_server.address, token="wrong")
    with pytest.raises(kvtier.UnauthorizedError):
        kvtier.Client(token_server.address)
    ok = kvtier.Client(token_server.address, token="s3cret-token")
    assert "tiers" in json.dumps(ok.stats()) or isinstance(ok.stats(), dict)
    assert issubclass(kvtier.UnauthorizedError, kvtier.KvtierError)
    assert kvtier.ERROR_CLASSES[3] is kvtier.NotFoundError
    c = kvtier.Client(server.address)
    with pytest.raises(ValueError, match="chunk key"):
        c.get(["not-a-key"])
    with pytest.raises(ValueError, match="chunk_tokens"):
        c.lookup([1, 2, 3], model=LAYOUT, chunk_tokens=0)
    with pytest.raises(ValueError, match="unknown model"):
        c.lookup([1, 2, 3], model="gpt-9")
    with pytest.raises(ValueError, match="dtype"):
        kvtier.Layout("m", 1, 1, 1, "int3")
    # A chunk larger than the whole host tier is refused by the server with its code.
    with pytest.raises((kvtier.TierFullError, kvtier.TooLargeError)):
        c.put("1" * 32, np.zeros(600 << 20, np.uint8), model=LAYOUT)


def test_concurrent_threads_share_a_client(server):
    """Calls release the GIL and may overlap: threads share one connection, all exact."""
    c = kvtier.Client(server.address)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            toks = prompt(2 * CT, seed=100 + t)
            keys = c.chunk_keys(toks, model=LAYOUT, chunk_tokens=CT)
            for i in range(2):
                c.put_chunk(keys, i, payload(100 * t + i), model=LAYOUT, chunk_tokens=CT)
            out = np.empty(LAYOUT.chunk_bytes(CT) * 2, np.uint8)
            assert c.get_into(keys, out) is not None
            want = np.concatenate([payload(100 * t + i).view(np.uint8) for i in range(2)])
            assert np.array_equal(out, want)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
