//! `transfer` suite: one prefill→decode request moved over loopback three ways, in one run.
//!
//! The request is Llama-3.1-8B-shaped (32 layers × 8 KV heads × 128 × bf16, K and V): 4096
//! tokens are 512 MiB (`--quick`: 1024 tokens, 128 MiB), in 256-token chunks. A kvtier server
//! (the decode node) runs in-process; the bench process holds the request as `Bytes` (what a
//! prefill engine or a prefill server's slots hold) and moves it:
//! - (a) **naive**: one awaited `Put` per 16-token block per layer per K/V (32 KiB each at
//!   Llama's shape), as paged engines move KV, over the same connections;
//! - (b) **coalesced**: kvtier's transfer (`kvtier_client::transfer::push`): one manifest, then
//!   one frame per run of layers written with vectored writes from the chunks' memory, read on
//!   the receiver straight into one reserved segment; a second client waits for layer 0
//!   (`wait_layers`) to time the first usable layer. Also through a second server: a
//!   `TransferPush` from a prefill server holding the chunks in its host tier;
//! - (c) **raw**: plain TCP sockets moving the same bytes over the same number of connections
//!   into a reused buffer (the ceiling).
//!
//! Compression on the wire is not implemented, so the compressed figures are `null`.

use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use kvtier::client::transfer::{self, OutgoingChunk, PushOptions};
use kvtier::client::{Client, ClientOptions};
use kvtier_cache::{ChunkKey, ChunkMeta, ModelLayout};
use serde_json::Value;

use crate::inproc;
use crate::report::{Figures, median, round};

#[derive(clap::Args)]
pub struct Args {
    /// Short run (1024 tokens, fewer repetitions; under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Parallel connections for every method (the server's `transfer_connections` default).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Layers per coalesced frame.
    #[arg(long, default_value_t = 2)]
    pub layers_per_run: u32,
    /// Use running servers instead of in-process ones (`scripts/transfer-netns.sh`): the
    /// prefill server's data-plane address, as this process reaches it.
    #[arg(long, requires = "decode")]
    pub prefill: Option<String>,
    /// The decode server's data-plane address (as this process and the prefill server reach it).
    #[arg(long, requires = "prefill")]
    pub decode: Option<String>,
    /// Label of the external run in the JSON line (for example `veth` or `veth-tbf-1gbit`).
    #[arg(long, default_value = "external")]
    pub label: String,
}

const CHUNK_TOKENS: usize = 256;
const BLOCK_TOKENS: usize = 16;

struct Request {
    layout: ModelLayout,
    chunks: Vec<OutgoingChunk>,
    bytes: usize,
}

fn request(tokens: usize, seed: u128) -> Request {
    let layout = ModelLayout::llama31_8b();
    let len = layout.chunk_bytes(CHUNK_TOKENS);
    let chunks: Vec<OutgoingChunk> = (0..tokens / CHUNK_TOKENS)
        .map(|c| {
            let mut meta = ChunkMeta::raw(
                kvtier_cache::key::tenant_id("bench"),
                layout.fingerprint(),
                CHUNK_TOKENS as u32,
                c as u32,
                len as u64,
            );
            meta.parent = c.checked_sub(1).map(|p| ChunkKey(seed + p as u128));
            OutgoingChunk {
                key: ChunkKey(seed + c as u128),
                meta,
                bytes: Bytes::from(inproc::payload(len, seed as u64 + c as u64)),
            }
        })
        .collect();
    let bytes = chunks.iter().map(|c| c.bytes.len()).sum();
    Request {
        layout,
        chunks,
        bytes,
    }
}

async fn connect(addr: &str) -> Result<Client> {
    Ok(Client::connect(
        addr,
        ClientOptions {
            // External servers (scripts/transfer-netns.sh) have a token.
            token: std::env::var("KVTIER_BENCH_TOKEN").ok(),
            tenant: Some("bench".into()),
            client_name: "bench-transfer".into(),
        },
    )
    .await?)
}

async fn conns(addr: &str, n: usize) -> Result<Vec<Client>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(connect(addr).await?);
    }
    Ok(v)
}

/// (a) One awaited put per 16-token block, layer and K/V; blocks spread over the connections.
async fn naive(conns: &[Client], req: &Request, tag: u128) -> Result<(Duration, usize)> {
    let l = &req.layout;
    let block = BLOCK_TOKENS * l.kv_heads as usize * l.head_dim as usize * l.dtype.size();
    let per_chunk = req.chunks[0].bytes.len() / block;
    let calls = req.chunks.len() * per_chunk;
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (ci, conn) in conns.iter().enumerate() {
        let conn = conn.clone();
        let chunks: Vec<Bytes> = req.chunks.iter().map(|c| c.bytes.clone()).collect();
        let n = conns.len();
        set.spawn(async move {
            for call in (ci..calls).step_by(n) {
                let (c, b) = (call / per_chunk, call % per_chunk);
                let data = chunks[c].slice(b * block..(b + 1) * block);
                let key = ChunkKey(tag << 64 | call as u128);
                let meta = ChunkMeta::raw(0, 0, 1, 0, block as u64);
                conn.put(key, &meta, &data).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok((t.elapsed(), calls))
}

/// (b) kvtier's transfer; returns the whole time, the time to layer 0 and the calls made.
async fn coalesced(
    conns: &[Client],
    waiter: &Client,
    req: &Request,
    id: u128,
    per_run: u32,
) -> Result<(Duration, Duration, u32)> {
    let layers = req.layout.num_layers;
    let t = Instant::now();
    let timeout = Duration::from_secs(60);
    // Begin here so the waiter can ask for layer 0 before any layer moves; `push` then sees a
    // begun transfer with nothing arrived and sends all of it.
    transfer::begin(&conns[0], id, &req.chunks, layers, timeout).await?;
    let w = waiter.clone();
    let first = tokio::spawn(async move {
        let p = w.wait_layers(id, 1, timeout).await?;
        anyhow::ensure!(p.layers_done >= 1, "wait_layers ended early: {p:?}");
        anyhow::Ok(t.elapsed())
    });
    let opts = PushOptions {
        layers,
        layers_per_run: per_run,
        timeout,
    };
    let r = transfer::push(conns, id, &req.chunks, opts).await?;
    let total = t.elapsed();
    let first = first.await??;
    Ok((total, first, r.calls))
}

/// (c) A raw-TCP sink: each connection reads its share into a reused buffer, then acks.
async fn raw_sink(listener: TcpListener, share: usize, n: usize) {
    // One connection per share; each reads its share into a buffer it reuses every round.
    for _ in 0..n {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; share];
            while s.read_exact(&mut buf).await.is_ok() {
                if s.write_all(&[1]).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Connection `i` moves chunks `i, i + n, ...` and waits for the sink's ack.
async fn raw(streams: Vec<TcpStream>, req: &Request) -> Result<(Duration, Vec<TcpStream>)> {
    let n = streams.len();
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let mine: Vec<Bytes> = req
            .chunks
            .iter()
            .skip(i)
            .step_by(n)
            .map(|c| c.bytes.clone())
            .collect();
        set.spawn(async move {
            for b in &mine {
                s.write_all(b).await?;
            }
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).await?;
            anyhow::Ok((i, s))
        });
    }
    let mut back: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, s) = r??;
        back[i] = Some(s);
    }
    let elapsed = t.elapsed();
    Ok((
        elapsed,
        back.into_iter()
            .map(|s| s.expect("every stream returned"))
            .collect(),
    ))
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Polls until the transfer is begun on the decode server, then waits for layer 0.
async fn first_layer(waiter: Client, id: u128, t: Instant) -> Result<Duration> {
    loop {
        match waiter.wait_layers(id, 1, Duration::from_secs(120)).await {
            Ok(p) => {
                anyhow::ensure!(p.layers_done >= 1, "wait_layers ended early: {p:?}");
                return Ok(t.elapsed());
            }
            Err(e) if e.code() == Some(kvtier::wire::ErrorCode::NotFound) => {
                anyhow::ensure!(
                    t.elapsed() < Duration::from_secs(60),
                    "transfer never began"
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Push and pull of one request between two running servers, checked byte-exact.
fn run_external(args: &Args, prefill: &str, decode: &str) -> Result<()> {
    let tokens = if args.quick { 1024 } else { 4096 };
    let n = args.connections.clamp(1, 16) as u32;
    let rt = inproc::runtime()?;
    rt.block_on(async {
        let p = connect(prefill).await?;
        let d = connect(decode).await?;
        let waiter = connect(decode).await?;
        let mut figures = Vec::new();
        for (mode, seed) in [("push", 5u128 << 40), ("pull", 6u128 << 40)] {
            let req = request(tokens, seed);
            for c in &req.chunks {
                p.put(c.key, &c.meta, &c.bytes).await?;
            }
            let keys: Vec<ChunkKey> = req.chunks.iter().map(|c| c.key).collect();
            let id = seed | u128::from(std::process::id());
            let t = Instant::now();
            let first = tokio::spawn(first_layer(waiter.clone(), id, t));
            let r = match mode {
                "push" => p.push_transfer(id, &keys, decode, n, args.layers_per_run).await?,
                _ => d.pull_transfer(id, &keys, prefill, n, args.layers_per_run).await?,
            };
            let total = t.elapsed();
            let first = first.await??;
            for (c, got) in req.chunks.iter().zip(d.get(&keys, false).await?) {
                let got = got.ok_or_else(|| anyhow::anyhow!("chunk {:?} missing after {mode}", c.key))?;
                anyhow::ensure!(got.bytes == c.bytes, "chunk {:?} differs after {mode}", c.key);
            }
            d.delete(&keys).await?;
            p.delete(&keys).await?;
            println!(
                "{mode}: {} MiB in {:.1} ms ({:.3} GB/s), {} calls, first layer after {:.1} ms ({:.1}%), byte-exact",
                req.bytes >> 20,
                ms(total),
                gbps(req.bytes, total),
                r.calls,
                ms(first),
                100.0 * first.as_secs_f64() / total.as_secs_f64()
            );
            figures.push((mode, req.bytes, total, first, r.calls));
        }
        let mut f = Figures::new("transfer");
        f.set("network", args.label.as_str());
        f.set("connections", u64::from(n));
        f.set("layers_per_run", args.layers_per_run);
        for (mode, bytes, total, first, calls) in figures {
            f.set("bytes", bytes as u64);
            f.set(&format!("{mode}_calls"), calls);
            f.num(&format!("{mode}_ms"), round(ms(total), 2));
            f.num(&format!("{mode}_gbps"), round(gbps(bytes, total), 3));
            f.num(&format!("{mode}_first_layer_ms"), round(ms(first), 2));
            f.num(&format!("{mode}_first_layer_fraction"), round(first.as_secs_f64() / total.as_secs_f64(), 3));
        }
        f.set("byte_exact", true);
        f.print();
        anyhow::Ok(())
    })
}

pub fn run(args: Args) -> Result<()> {
    if let (Some(p), Some(d)) = (args.prefill.clone(), args.decode.clone()) {
        return run_external(&args, &p, &d);
    }
    let tokens = if args.quick { 1024 } else { 4096 };
    let reps = if args.quick { 2 } else { 3 };
    let n = args.connections.clamp(1, 16);
    let req = request(tokens, 1 << 20);
    anyhow::ensure!(
        req.chunks.len().is_multiple_of(n),
        "{} chunks do not split over {n} connections",
        req.chunks.len()
    );
    let bytes = req.bytes;
    // Host room for the naive blocks plus one transferred copy; the region holds one request.
    let decode = inproc::server(2 * bytes as u64 + (64 << 20), |c| {
        c.transfer_bytes = bytes as u64 + (1 << 20);
    })?;
    let prefill = inproc::server(bytes as u64 + (64 << 20), |_| {})?;
    let rt = inproc::runtime()?;
    let out = rt.block_on(async {
        let dconns = conns(&decode.tcp, n).await?;
        let waiter = connect(&decode.tcp).await?;
        let pconn = connect(&prefill.tcp).await?;
        for c in &req.chunks {
            pconn.put(c.key, &c.meta, &c.bytes).await?;
        }
        let keys: Vec<ChunkKey> = req.chunks.iter().map(|c| c.key).collect();
        // Raw sockets: a sink per connection.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let share = bytes / n;
        tokio::spawn(raw_sink(listener, share, n));
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            streams.push(s);
        }
        let (mut naive_t, mut coal_t, mut first_t, mut raw_t, mut push_t) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut naive_calls, mut coal_calls) = (0, 0);
        for rep in 0..=reps {
            let (d, calls) = naive(&dconns, &req, rep as u128 + 1).await?;
            naive_calls = calls;
            let naive_keys: Vec<ChunkKey> = (0..calls)
                .map(|c| ChunkKey((rep as u128 + 1) << 64 | c as u128))
                .collect();
            for k in naive_keys.chunks(dconns[0].max_keys()) {
                dconns[0].delete(k).await?;
            }
            let (total, first, calls) = coalesced(
                &dconns,
                &waiter,
                &req,
                100 + rep as u128,
                args.layers_per_run,
            )
            .await?;
            coal_calls = calls;
            dconns[0].delete(&keys).await?;
            let (r, back) = raw(std::mem::take(&mut streams), &req).await?;
            streams = back;
            let p = pconn
                .push_transfer(
                    200 + rep as u128,
                    &keys,
                    &decode.tcp,
                    n as u32,
                    args.layers_per_run,
                )
                .await?;
            dconns[0].delete(&keys).await?;
            if rep > 0 {
                naive_t.push(ms(d));
                coal_t.push(ms(total));
                first_t.push(ms(first));
                raw_t.push(ms(r));
                push_t.push(ms(p.elapsed));
            }
        }
        anyhow::Ok((
            naive_t,
            coal_t,
            first_t,
            raw_t,
            push_t,
            naive_calls,
            coal_calls,
        ))
    })?;
    let (naive_t, coal_t, first_t, raw_t, push_t, naive_calls, coal_calls) = out;
    let (naive_ms, coal_ms, first_ms, raw_ms, push_ms) = (
        median(&naive_t),
        median(&coal_t),
        median(&first_t),
        median(&raw_t),
        median(&push_t),
    );
    let d = |m: f64| Duration::from_secs_f64(m / 1e3);
    println!(
        "transfer: {tokens} tokens, {} MiB, {} chunks, {n} connections, {} layers per run, median of {reps}",
        bytes >> 20,
        req.chunks.len(),
        args.layers_per_run
    );
    println!("| method | calls | ms | GB/s |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| naive (16-token block × layer × K/V puts) | {naive_calls} | {naive_ms:.1} | {:.2} |",
        gbps(bytes, d(naive_ms))
    );
    println!(
        "| coalesced (kvtier transfer) | {coal_calls} | {coal_ms:.1} | {:.2} |",
        gbps(bytes, d(coal_ms))
    );
    println!(
        "| coalesced, server → server push | {coal_calls} | {push_ms:.1} | {:.2} |",
        gbps(bytes, d(push_ms))
    );
    println!(
        "| raw TCP | {n} | {raw_ms:.1} | {:.2} |",
        gbps(bytes, d(raw_ms))
    );
    println!(
        "first usable layer after {first_ms:.1} ms ({:.1}% of the coalesced transfer)",
        100.0 * first_ms / coal_ms
    );
    let mut f = Figures::new("transfer");
    f.set("bytes", bytes as u64);
    f.set("tokens", tokens as u64);
    f.set("connections", n as u64);
    f.set("layers_per_run", args.layers_per_run);
    f.set("naive_calls", naive_calls as u64);
    f.set("coalesced_calls", coal_calls);
    f.num("naive_ms", round(naive_ms, 2));
    f.num("coalesced_ms", round(coal_ms, 2));
    f.num("push_ms", round(push_ms, 2));
    f.num("raw_ms", round(raw_ms, 2));
    f.num("coalesced_vs_raw", round(raw_ms / coal_ms, 3));
    f.num("speedup_vs_naive", round(naive_ms / coal_ms, 2));
    f.num("first_layer_ms", round(first_ms, 2));
    f.num("first_layer_fraction", round(first_ms / coal_ms, 3));
    f.num("coalesced_gbps", round(gbps(bytes, d(coal_ms)), 3));
    f.num("raw_gbps", round(gbps(bytes, d(raw_ms)), 3));
    f.set("lossless_effective_gbps", Value::Null);
    f.set("int8_effective_gbps", Value::Null);
    f.print();
    drop(prefill);
    drop(decode);
    Ok(())
}
