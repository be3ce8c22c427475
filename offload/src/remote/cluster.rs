//! A real Redis Cluster on loopback for tests and benchmarks: 3 masters + 3 replicas.
//!
//! [`LocalCluster::start`] picks six free ports (each with its cluster-bus port, +10000, free
//! too), starts `redis-server --cluster-enabled yes` on each in its own temporary directory,
//! joins them with `redis-cli --cluster create … --cluster-replicas 1 --cluster-yes` and waits
//! until `redis-cli --cluster check` reports all 16384 slots covered and every node says
//! `cluster_state:ok`. Dropping it kills every server (also when a test panics) and removes
//! the directories. Needs `redis-server` and `redis-cli` on `PATH`; the failure says so.
//!
//! This is process management, not a client: it talks to the servers only through
//! `redis-cli`, so the harness does not depend on the code it tests.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the cluster may take to become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of a local cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Masters; each gets one replica.
    pub masters: usize,
    /// `maxmemory` of each server in bytes (0 = unlimited); eviction is `allkeys-lru`.
    pub maxmemory: u64,
    /// `requirepass` (also used as `masterauth`), when set.
    pub password: Option<String>,
    /// `cluster-node-timeout` in ms: how soon a dead master is failed over.
    pub node_timeout_ms: u64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            masters: 3,
            maxmemory: 0,
            password: None,
            node_timeout_ms: 2000,
        }
    }
}

/// One server of the cluster.
struct Node {
    port: u16,
    child: Option<Child>,
}

/// A running local Redis Cluster; see the module docs.
pub struct LocalCluster {
    nodes: Vec<Node>,
    options: ClusterOptions,
    _dir: tempfile::TempDir,
}

/// Error of the harness: what failed, in words.
pub type HarnessError = String;

impl LocalCluster {
    /// Starts 3 masters + 3 replicas with default options.
    pub fn start() -> Result<LocalCluster, HarnessError> {
        Self::start_with(ClusterOptions::default())
    }

    /// Starts a cluster; retries with fresh ports when a port was taken in between.
    pub fn start_with(options: ClusterOptions) -> Result<LocalCluster, HarnessError> {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start(&options) {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn try_start(options: &ClusterOptions) -> Result<LocalCluster, HarnessError> {
        let dir = tempfile::tempdir().map_err(|e| format!("creating a temp dir: {e}"))?;
        let count = options.masters.max(3) * 2;
        let ports = free_ports(count)?;
        let mut cluster = LocalCluster {
            nodes: Vec::with_capacity(count),
            options: options.clone(),
            _dir: dir,
        };
        for &port in &ports {
            let child = cluster.spawn(port)?;
            cluster.nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        for &port in &ports {
            wait_for_port(port)?;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for &port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        if let Some(p) = &options.password {
            create.args(["-a", p, "--no-auth-warning"]);
        }
        let out = create
            .output()
            .map_err(|e| format!("running redis-cli --cluster create: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        cluster.wait_healthy(READY_TIMEOUT)?;
        Ok(cluster)
    }

    fn spawn(&self, port: u16) -> Result<Child, HarnessError> {
        let dir = self._dir.path().join(port.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .arg("--cluster-node-timeout")
            .arg(self.options.node_timeout_ms.to_string())
            .arg("--dir")
            .arg(&dir)
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--maxmemory-policy", "allkeys-lru"])
            .arg("--maxmemory")
            .arg(self.options.maxmemory.to_string())
            // Large chunks: let a 32 MiB value through the default 512 MiB limit, and replicas
            // take big writes without dropping the link.
            .args(["--client-output-buffer-limit", "replica 0 0 0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.options.password {
            cmd.args(["--requirepass", p, "--masterauth", p]);
        }
        cmd.spawn().map_err(|e| {
            format!("starting redis-server (is it installed? apt-get install redis-server): {e}")
        })
    }

    /// Seed-node URLs, `redis://127.0.0.1:P`, one per server.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The seed list as the `remote` config key spells it: URLs joined by commas.
    pub fn config_value(&self) -> String {
        self.urls().join(",")
    }

    /// Ports of all servers still running.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// Runs `redis-cli -p port ARGS…` and returns its stdout.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<Vec<u8>, HarnessError> {
        let mut cmd = Command::new("redis-cli");
        cmd.arg("-p").arg(port.to_string());
        if let Some(p) = &self.options.password {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("running redis-cli: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout)
    }

    /// Runs a command on whichever master owns `key` (`redis-cli -c` follows MOVED).
    pub fn cli_key(&self, args: &[&str]) -> Result<Vec<u8>, HarnessError> {
        let port = *self.ports().first().ok_or("no server running")?;
        let mut full = vec!["-c"];
        full.extend_from_slice(args);
        self.cli(port, &full)
    }

    /// Ports of the running masters that serve slots, from `CLUSTER NODES` (flags `master`,
    /// not `fail`, with at least one slot range).
    pub fn master_ports(&self) -> Result<Vec<u16>, HarnessError> {
        let port = *self.ports().first().ok_or("no server running")?;
        let out = self.cli(port, &["cluster", "nodes"])?;
        let text = String::from_utf8_lossy(&out);
        let mut ports = Vec::new();
        for line in text.lines() {
            // id addr flags master-id ping pong epoch link-state [slot ranges…]
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags: Vec<&str> = f.get(2).map(|x| x.split(',').collect()).unwrap_or_default();
            if f.len() < 9
                || !flags.contains(&"master")
                || flags.iter().any(|x| x.starts_with("fail"))
            {
                continue;
            }
            let addr = f[1].split('@').next().unwrap_or("");
            if let Some(p) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) {
                ports.push(p);
            }
        }
        Ok(ports)
    }

    /// Kills the server on `port` (SIGKILL) and keeps it down.
    pub fn kill(&mut self, port: u16) -> Result<(), HarnessError> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .ok_or(format!("no server on port {port}"))?;
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Waits until all slots are covered and every running node reports `cluster_state:ok`.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.check() {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!("cluster not healthy after {timeout:?}: {last}"))
    }

    fn check(&self) -> Result<(), HarnessError> {
        let ports = self.ports();
        let first = *ports.first().ok_or("no server running")?;
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--cluster", "check"])
            .arg(format!("127.0.0.1:{first}"));
        if let Some(p) = &self.options.password {
            cmd.args(["-a", p, "--no-auth-warning"]);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("running redis-cli --cluster check: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains("[OK] All 16384 slots covered") || text.contains("[ERR]") {
            return Err(format!("redis-cli --cluster check: {}", text.trim()));
        }
        for port in ports {
            let info = self.cli(port, &["cluster", "info"])?;
            if !String::from_utf8_lossy(&info).contains("cluster_state:ok") {
                return Err(format!("node {port} not in cluster_state:ok"));
            }
            // A replica that has not finished its first sync cannot take over from its master.
            let repl = self.cli(port, &["info", "replication"])?;
            let repl = String::from_utf8_lossy(&repl);
            if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                return Err(format!("replica {port} not yet in sync with its master"));
            }
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut c) = node.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// `n` loopback ports that are free, each with its cluster-bus port (+10000) free as well.
fn free_ports(n: usize) -> Result<Vec<u16>, HarnessError> {
    let mut ports = Vec::with_capacity(n);
    let mut held = Vec::new();
    for _ in 0..200 {
        if ports.len() == n {
            break;
        }
        // Let the kernel pick, then keep only ports whose bus port fits and is free.
        let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| format!("binding a loopback port: {e}"))?;
        let port = l.local_addr().map_err(|e| e.to_string())?.port();
        if port > 55_535 || ports.contains(&port) {
            held.push(l);
            continue;
        }
        match TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port + 10_000)) {
            Ok(bus) => {
                ports.push(port);
                held.push(l);
                held.push(bus);
            }
            Err(_) => held.push(l),
        }
    }
    if ports.len() < n {
        return Err(format!("found only {} free port pairs", ports.len()));
    }
    drop(held);
    Ok(ports)
}

/// Waits until a server answers `PING` on `port`.
fn wait_for_port(port: u16) -> Result<(), HarnessError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 64];
            if s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| n > 0) {
                // +PONG, or -NOAUTH when a password is set: either way the server is up.
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("redis-server on port {port} did not start"))
}
