//! Helper for `tests/gpu/ipc_engine.py`: maps an engine's paged KV buffer by CUDA IPC, saves
//! the given pages (one gather launch + one copy) into a kvtier host tier, waits for the engine
//! to say `restore` on stdin, then restores them into other pages (one copy + one scatter).
//!
//! `kvtier_ipc_probe HANDLE_HEX OFFSET PLANES PAGES_PER_PLANE PAGE_BYTES SAVE_IDS RESTORE_IDS`
//! (ids comma-separated). Prints `saved <crc32c>` and `restored`; exits non-zero on error.

use std::io::BufRead;

use anyhow::{Context, Result, bail};
use kvtier_cache::{ChunkKey, ChunkMeta, HostConfig, HostTier, Tier};
use kvtier_offload::gpu::ipc::{EngineRegion, IpcHandle, PagedLayout};
use kvtier_offload::gpu::{DeviceBuffer, GpuDevice, PageCopier};

fn ids(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| x.trim().parse::<usize>().context("page id"))
        .collect()
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() != 7 {
        bail!(
            "usage: kvtier_ipc_probe HANDLE_HEX OFFSET PLANES PAGES_PER_PLANE PAGE_BYTES SAVE_IDS RESTORE_IDS"
        );
    }
    let handle = IpcHandle::from_hex(&a[0])?;
    let offset: usize = a[1].parse().context("offset")?;
    let layout = PagedLayout {
        planes: a[2].parse().context("planes")?,
        pages_per_plane: a[3].parse().context("pages per plane")?,
        page_bytes: a[4].parse().context("page bytes")?,
    };
    let (save, restore) = (ids(&a[5])?, ids(&a[6])?);
    if save.len() != restore.len() {
        bail!("as many restore pages as saved pages are needed");
    }
    let dev = GpuDevice::open(0)?;
    let mut region = EngineRegion::open(&dev, handle, offset, layout)?;
    let copier = PageCopier::new(dev.clone())?;
    let bytes = save.len() * layout.planes * layout.page_bytes;
    let mut staging = DeviceBuffer::new(&dev, bytes)?;
    let mut buf = dev.pinned(bytes)?;
    region.save(&copier, &mut staging, &save, &mut buf)?;
    let host = HostTier::new(HostConfig::with_budget((bytes as u64 + (1 << 20)) * 2));
    let key = ChunkKey(0x1bc);
    host.put(key, &ChunkMeta::raw(1, 1, 0, 0, bytes as u64), &buf)?;
    drop(buf);
    println!(
        "saved {:08x}",
        crc32c::crc32c(&host.get(key)?.context("saved chunk")?.1)
    );
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "restore" {
        bail!("expected `restore` on stdin, got {line:?}");
    }
    let (_, saved) = host.get(key)?.context("saved chunk vanished")?;
    region.restore(&copier, &mut staging, &saved, &restore)?;
    println!("restored");
    Ok(())
}
