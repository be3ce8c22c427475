//! `wire` suite: the data plane against what users would otherwise use, in one run.
//!
//! A kvtier server runs in-process on loopback (TCP and a Unix socket). For 32 MiB and 2 MiB
//! chunks it measures get throughput over TCP, over the Unix socket and over shared memory
//! (arenas mapped read-only, one copy out), put throughput over TCP; and compares each with:
//! - a raw socket moving the same bytes (a server that writes N bytes on request; the client
//!   reads into a reused buffer), over TCP and the Unix socket;
//! - a Redis server (`redis-server`, started here) with SET/GET over TCP and its Unix socket.
//!
//! It also measures LOOKUP latency over the Unix socket and aggregate throughput with 64
//! concurrent clients. Every client reads into a reused buffer, so all paths pay the same one
//! copy out of the kernel (shared memory pays one copy out of the arena instead).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use kvtier::client::{Client, ClientOptions};
use kvtier_cache::{ChunkKey, ChunkMeta, ModelLayout, Namespace};

use crate::report::{Figures, median, percentile};

#[derive(clap::Args)]
pub struct Args {
    /// Short run (under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Median GB/s over `reps` rounds (after one warm-up round that touches buffers and page
/// tables) of `n` transfers of `len` bytes, transfer `i` done by `one(i)`.
async fn timed<F: AsyncFnMut(usize) -> Result<()>>(
    reps: usize,
    n: usize,
    len: usize,
    mut one: F,
) -> Result<f64> {
    let mut xs = Vec::new();
    for r in 0..=reps {
        let t = Instant::now();
        for i in 0..n {
            one(i).await?;
        }
        if r > 0 {
            xs.push(gbps(len * n, t.elapsed()));
        }
    }
    Ok(median(&xs))
}

// ---- raw socket baseline -------------------------------------------------------------------

/// A server that answers each 8-byte length request with that many bytes of `data`.
async fn raw_serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, data: Arc<Vec<u8>>) {
    let mut req = [0u8; 8];
    while s.read_exact(&mut req).await.is_ok() {
        let n = (u64::from_le_bytes(req) as usize).min(data.len());
        if s.write_all(&data[..n]).await.is_err() {
            return;
        }
    }
}

async fn raw_get<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, buf: &mut [u8]) -> Result<()> {
    s.write_all(&(buf.len() as u64).to_le_bytes()).await?;
    s.read_exact(buf).await?;
    Ok(())
}

// ---- Redis baseline ------------------------------------------------------------------------

/// A minimal RESP client for SET and GET of binary values. Hand-written so that the client side
/// does exactly what ours does (write the value from its buffer, read the reply straight into a
/// reused buffer) and the comparison measures the servers, not client-library overheads.
struct Resp<S> {
    s: tokio::io::BufStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Resp<S> {
    fn new(s: S) -> Self {
        Resp {
            s: tokio::io::BufStream::with_capacity(64 << 10, 64 << 10, s),
        }
    }

    async fn line(&mut self) -> Result<String> {
        let mut out = Vec::new();
        loop {
            let b = self.s.read_u8().await?;
            if b == b'\n' {
                break;
            }
            out.push(b);
        }
        Ok(String::from_utf8_lossy(&out).trim_end().to_string())
    }

    async fn set(&mut self, key: &str, val: &[u8]) -> Result<()> {
        let head = format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
            key.len(),
            val.len()
        );
        self.s.write_all(head.as_bytes()).await?;
        self.s.write_all(val).await?;
        self.s.write_all(b"\r\n").await?;
        self.s.flush().await?;
        let l = self.line().await?;
        if l != "+OK" {
            bail!("redis SET answered {l:?}");
        }
        Ok(())
    }

    async fn get(&mut self, key: &str, buf: &mut [u8]) -> Result<()> {
        let cmd = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        self.s.write_all(cmd.as_bytes()).await?;
        self.s.flush().await?;
        let l = self.line().await?;
        let n: usize = l
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("redis GET answered {l:?}"))?;
        if n != buf.len() {
            bail!("redis value of {n} bytes, expected {}", buf.len());
        }
        self.s.read_exact(buf).await?;
        let mut crlf = [0u8; 2];
        self.s.read_exact(&mut crlf).await?;
        Ok(())
    }
}

struct Redis {
    child: Child,
    port: u16,
    socket: PathBuf,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis(dir: &Path) -> Result<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let socket = dir.join("redis.sock");
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--unixsocket"])
        .arg(&socket)
        .args(["--save", "", "--appendonly", "no", "--proto-max-bulk-len", "1gb", "--client-query-buffer-limit", "1gb"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (the Redis baseline); install it with `apt-get install redis-server` or run scripts/test.sh once")?;
    let r = Redis {
        child,
        port,
        socket,
    };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && r.socket.exists() {
            return Ok(r);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("redis-server did not start listening on port {port}")
}

// ---- the suite -----------------------------------------------------------------------------

struct SizeFigures {
    tcp_get: f64,
    uds_get: f64,
    shm_get: f64,
    tcp_put: f64,
    raw_tcp: f64,
    raw_uds: f64,
    redis_tcp_get: f64,
    redis_uds_get: f64,
}

async fn measure_size(
    len: usize,
    n: usize,
    reps: usize,
    tcp: &Client,
    uds: &Client,
    raw_tcp_addr: std::net::SocketAddr,
    raw_uds_path: &Path,
    redis: &Redis,
) -> Result<SizeFigures> {
    let data: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
    let keys: Vec<ChunkKey> = (0..n as u128)
        .map(|i| ChunkKey((len as u128) << 32 | i))
        .collect();
    let meta = ChunkMeta::raw(0, 1, 256, 0, len as u64);
    let tcp_put = timed(reps, n, len, async |i| {
        Ok(tcp.put(keys[i], &meta, &data).await?)
    })
    .await?;
    let mut buf = Vec::new();
    let check = |b: &[u8]| -> Result<()> {
        if b != &data[..] {
            bail!("read back wrong bytes");
        }
        Ok(())
    };
    let mut socket_get = async |c: &Client| {
        let g = timed(reps, n, len, async |i| {
            let (e, b) = c
                .get_into(&[keys[i]], false, std::mem::take(&mut buf))
                .await?;
            buf = b;
            e[0].as_ref().context("chunk missing")?;
            Ok(())
        })
        .await?;
        check(&buf)?;
        anyhow::Ok(g)
    };
    let tcp_get = socket_get(tcp).await?;
    let uds_get = socket_get(uds).await?;
    uds.map_arenas().await?;
    let shm_get = timed(reps, n, len, async |i| {
        let e = uds.read_located(&[keys[i]], false, &mut buf).await?;
        e[0].as_ref().context("chunk missing")?;
        Ok(())
    })
    .await?;
    check(&buf)?;
    let mut rbuf = vec![0u8; len];
    let mut s = TcpStream::connect(raw_tcp_addr).await?;
    s.set_nodelay(true)?;
    let raw_tcp = timed(reps, n, len, async |_| raw_get(&mut s, &mut rbuf).await).await?;
    let mut s = UnixStream::connect(raw_uds_path).await?;
    let raw_uds = timed(reps, n, len, async |_| raw_get(&mut s, &mut rbuf).await).await?;
    let mut rt = Resp::new(TcpStream::connect(("127.0.0.1", redis.port)).await?);
    let mut ru = Resp::new(UnixStream::connect(&redis.socket).await?);
    for i in 0..n {
        rt.set(&format!("k{len}-{i}"), &data).await?;
    }
    let redis_tcp_get = timed(reps, n, len, async |i| {
        rt.get(&format!("k{len}-{i}"), &mut rbuf).await
    })
    .await?;
    if rbuf != data {
        bail!("redis returned wrong bytes");
    }
    let redis_uds_get = timed(reps, n, len, async |i| {
        ru.get(&format!("k{len}-{i}"), &mut rbuf).await
    })
    .await?;
    tcp.delete(&keys).await?;
    Ok(SizeFigures {
        tcp_get,
        uds_get,
        shm_get,
        tcp_put,
        raw_tcp,
        raw_uds,
        redis_tcp_get,
        redis_uds_get,
    })
}

/// LOOKUP round trips over the Unix socket for a prompt whose chunks are all stored.
async fn measure_lookup(c: &Client, tokens_n: usize, iters: usize) -> Result<(f64, f64)> {
    let layout = ModelLayout::llama31_8b();
    let ns = Namespace::new(layout.fingerprint(), "default");
    let tokens: Vec<u32> = (0..tokens_n as u32)
        .map(|i| i.wrapping_mul(2_654_435_761) % 128_000)
        .collect();
    let keys = ns.chunk_keys(&tokens);
    for (i, k) in keys.iter().enumerate() {
        c.put(
            *k,
            &ChunkMeta::raw(0, layout.fingerprint(), 256, i as u32, 64),
            &[0u8; 64],
        )
        .await?;
    }
    let mut us = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        let r = c.lookup(layout.fingerprint(), None, 256, &tokens).await?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        if r.hits.len() != keys.len() {
            bail!("lookup found {} of {} chunks", r.hits.len(), keys.len());
        }
    }
    c.delete(&keys).await?;
    Ok((median(&us), percentile(&us, 99.0)))
}

/// Aggregate get throughput of `clients` connections reading 2 MiB chunks concurrently.
async fn measure_concurrent(addr: &str, clients: usize, per_client: usize) -> Result<f64> {
    let len = 2 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    let setup = Client::connect(addr, ClientOptions::default()).await?;
    let keys: Vec<ChunkKey> = (0..16u128).map(|i| ChunkKey(0xc0c0_0000 + i)).collect();
    for k in &keys {
        setup
            .put(*k, &ChunkMeta::raw(0, 1, 256, 0, len as u64), &data)
            .await?;
    }
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Client::connect(addr, ClientOptions::default()).await?);
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (ci, c) in conns.into_iter().enumerate() {
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::new();
            for i in 0..per_client {
                let (e, b) = c
                    .get_into(&[keys[(ci + i) % keys.len()]], false, buf)
                    .await?;
                buf = b;
                e[0].as_ref().context("chunk missing")?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let g = gbps(len * clients * per_client, t.elapsed());
    setup.delete(&keys).await?;
    Ok(g)
}

pub fn run(args: Args) -> Result<()> {
    crate::inproc::runtime()?.block_on(run_async(args))
}

async fn run_async(args: Args) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = crate::inproc::server(2 << 30, |_| {})?;
    let (tcp_addr, uds_addr) = (server.tcp.clone(), server.unix.clone());

    // Raw baselines serve the same bytes, from the server's side (its runtime and threads).
    let big = Arc::new(vec![7u8; 32 << 20]);
    let raw_tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
    raw_tcp.set_nonblocking(true)?;
    let raw_tcp_addr = raw_tcp.local_addr()?;
    let d = big.clone();
    server.handle.spawn(async move {
        let Ok(l) = TcpListener::from_std(raw_tcp) else {
            return;
        };
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(raw_serve(s, d.clone()));
        }
    });
    let raw_path = dir.path().join("raw.sock");
    let raw_uds = std::os::unix::net::UnixListener::bind(&raw_path)?;
    raw_uds.set_nonblocking(true)?;
    let d = big.clone();
    server.handle.spawn(async move {
        let Ok(l) = UnixListener::from_std(raw_uds) else {
            return;
        };
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(raw_serve(s, d.clone()));
        }
    });
    let redis = start_redis(dir.path())?;

    let tcp = Client::connect(&tcp_addr, ClientOptions::default()).await?;
    let uds = Client::connect(&uds_addr, ClientOptions::default()).await?;
    let (reps, n_big, n_small, lookups, clients, per_client) = if args.quick {
        (3, 4, 32, 300, 64, 4)
    } else {
        (7, 8, 64, 2000, 64, 16)
    };
    let big_f = measure_size(
        32 << 20,
        n_big,
        reps,
        &tcp,
        &uds,
        raw_tcp_addr,
        &raw_path,
        &redis,
    )
    .await?;
    let small_f = measure_size(
        2 << 20,
        n_small,
        reps,
        &tcp,
        &uds,
        raw_tcp_addr,
        &raw_path,
        &redis,
    )
    .await?;
    let (lk50, lk99) = measure_lookup(&uds, 32 * 1024, lookups).await?;
    let (lk128_50, lk128_99) = measure_lookup(&uds, 128 * 1024, lookups / 3).await?;
    let conc = measure_concurrent(&tcp_addr, clients, per_client).await?;

    println!(
        "kvtier wire bench ({} mode), medians in GB/s",
        if args.quick { "quick" } else { "full" }
    );
    println!("{:<26} {:>9} {:>9}", "path", "32 MiB", "2 MiB");
    let row = |name: &str, a: f64, b: f64| println!("{name:<26} {a:>9.2} {b:>9.2}");
    row("kvtier get, tcp", big_f.tcp_get, small_f.tcp_get);
    row("kvtier get, unix socket", big_f.uds_get, small_f.uds_get);
    row("kvtier get, shared memory", big_f.shm_get, small_f.shm_get);
    row("kvtier put, tcp", big_f.tcp_put, small_f.tcp_put);
    row("raw socket, tcp", big_f.raw_tcp, small_f.raw_tcp);
    row("raw socket, unix", big_f.raw_uds, small_f.raw_uds);
    row("redis GET, tcp", big_f.redis_tcp_get, small_f.redis_tcp_get);
    row(
        "redis GET, unix",
        big_f.redis_uds_get,
        small_f.redis_uds_get,
    );
    println!(
        "lookup over unix socket: 32k tokens p50 {lk50:.1} us p99 {lk99:.1} us; 128k tokens p50 {lk128_50:.1} us p99 {lk128_99:.1} us"
    );
    println!("{clients} concurrent clients, 2 MiB gets over tcp: {conc:.2} GB/s");

    server.stop()?;
    let b = &big_f;
    let mut f = Figures::new("wire");
    f.num("tcp_get_gbps", b.tcp_get);
    f.num("uds_get_gbps", b.uds_get);
    f.num("shm_get_gbps", b.shm_get);
    f.num("tcp_put_gbps", b.tcp_put);
    f.num("raw_tcp_gbps", b.raw_tcp);
    f.num("raw_uds_gbps", b.raw_uds);
    f.num("tcp_get_vs_raw", b.tcp_get / b.raw_tcp);
    f.num("uds_get_vs_raw", b.uds_get / b.raw_uds);
    f.num("redis_tcp_get_gbps", b.redis_tcp_get);
    f.num("redis_uds_get_gbps", b.redis_uds_get);
    f.num("tcp_get_vs_redis", b.tcp_get / b.redis_tcp_get);
    f.num("shm_get_vs_redis", b.shm_get / b.redis_uds_get);
    f.num("small_tcp_get_vs_raw", small_f.tcp_get / small_f.raw_tcp);
    f.num("small_uds_get_vs_raw", small_f.uds_get / small_f.raw_uds);
    f.num(
        "small_shm_get_vs_redis",
        small_f.shm_get / small_f.redis_uds_get,
    );
    f.num("lookup_p50_us", lk50);
    f.num("lookup_p99_us", lk99);
    f.set("lookup_tokens", 32 * 1024);
    f.num("lookup_128k_p99_us", lk128_99);
    f.num("concurrent_64_get_gbps", conc);
    f.print();
    Ok(())
}
