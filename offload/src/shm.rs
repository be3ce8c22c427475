//! Host-tier arenas in memfd shared memory, so same-host clients can read chunks in place.
//!
//! [`MemfdArenas`] backs each arena of [`kvtier_cache::HostTier`] with an anonymous memory file
//! (`memfd_create`) mapped `MAP_SHARED` into the server. The file descriptor travels with the
//! arena; the server passes it to clients over a Unix socket (`SCM_RIGHTS`) and they map it with
//! [`map_readonly`], then read a chunk at the offset `HostTier::locate` reports.
//!
//! Before the descriptor leaves the allocator the file is sealed: it can never shrink or grow
//! (so no mapping can fault with `SIGBUS` on a truncated file) and no new writable access can be
//! created (so a client holding the descriptor cannot write into the server's slots). The
//! server's own writable mapping, made before the seal, stays writable.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use kvtier_cache::host::{Arena, ArenaAllocator};
use kvtier_cache::{CacheError, Result};
use memmap2::{Mmap, MmapMut, MmapOptions};
use rustix::fs::{MemfdFlags, SealFlags};

/// Allocates host arenas as sealed memfd mappings.
#[derive(Debug, Default, Clone, Copy)]
pub struct MemfdArenas;

impl ArenaAllocator for MemfdArenas {
    fn allocate(&self, len: usize) -> Result<Arena> {
        let fd = rustix::fs::memfd_create(
            "kvtier-arena",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(|e| CacheError::io("memfd_create for a host arena", e.into()))?;
        // A fresh memfd reads as zeroes, which is what `ArenaAllocator::allocate` promises.
        rustix::fs::ftruncate(&fd, len as u64)
            .map_err(|e| CacheError::io(format!("size a {len}-byte memfd arena"), e.into()))?;
        // SAFETY: the memfd was created above and nobody else holds it yet; it is sealed against
        // resizing below before the descriptor is shared, so the mapping can never lose pages.
        // Other processes only get read-only access, so the bytes change only through this map.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&fd) }
            .map_err(|e| CacheError::io(format!("map a {len}-byte memfd arena"), e))?;
        rustix::fs::fcntl_add_seals(
            &fd,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::FUTURE_WRITE | SealFlags::SEAL,
        )
        .map_err(|e| CacheError::io("seal a memfd arena", e.into()))?;
        // The host tier carves each arena into disjoint `&mut` slots that live for the rest of
        // the process and never frees an arena, so the mapping is leaked on purpose: a
        // `&'static mut [u8]` is what lets the tier hand out slots without unsafe code.
        let map: &'static mut MmapMut = Box::leak(Box::new(map));
        let mem: &'static mut [u8] = map;
        Ok(Arena {
            mem,
            shared_fd: Some(fd),
        })
    }
}

/// Maps `len` bytes of a shared arena read-only (the client side of [`MemfdArenas`]).
///
/// Fails when the file is shorter than `len`, so a client cannot map pages that would fault.
pub fn map_readonly(fd: BorrowedFd<'_>, len: usize) -> Result<Mmap> {
    let size = rustix::fs::fstat(fd)
        .map_err(|e| CacheError::io("stat a shared arena", e.into()))?
        .st_size;
    if (size as u64) < len as u64 {
        return Err(CacheError::io(
            format!("map {len} bytes of a shared arena"),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the arena holds only {size} bytes"),
            ),
        ));
    }
    // SAFETY: the length was checked against the file, and arenas from `MemfdArenas` are sealed
    // against shrinking, so every mapped page stays backed. The server may rewrite a slot after
    // it is freed; clients read a slot only while they hold a lease on its chunk.
    unsafe { MmapOptions::new().len(len).map(&fd) }
        .map_err(|e| CacheError::io(format!("map {len} bytes of a shared arena read-only"), e))
}

/// Lets callers holding an [`OwnedFd`] from [`Arena::shared_fd`] map it without borrowing rules
/// getting in the way.
pub fn map_arena(fd: &OwnedFd, len: usize) -> Result<Mmap> {
    map_readonly(fd.as_fd(), len)
}

/// Maps a client's shared region read-write into the server (`ShmPut`/`ShmGet`).
///
/// Fails when the file is shorter than `len`. The client may truncate an unsealed memfd later,
/// which would fault the server on access; regions are therefore only accepted sealed against
/// shrinking (see [`create_region`], which seals them).
pub fn map_client_region(fd: &OwnedFd, len: usize) -> Result<MmapMut> {
    let seals = rustix::fs::fcntl_get_seals(fd)
        .map_err(|e| CacheError::io("read the seals of a client region", e.into()))?;
    if !seals.contains(SealFlags::SHRINK) {
        return Err(CacheError::io(
            "map a client region",
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the region must be a memfd sealed against shrinking",
            ),
        ));
    }
    let size = rustix::fs::fstat(fd)
        .map_err(|e| CacheError::io("stat a client region", e.into()))?
        .st_size;
    if (size as u64) < len as u64 {
        return Err(CacheError::io(
            format!("map {len} bytes of a client region"),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the region holds only {size} bytes"),
            ),
        ));
    }
    // SAFETY: the file is at least `len` bytes and sealed against shrinking, so every mapped
    // page stays backed for the life of the mapping. The client writes the same pages; the
    // protocol only copies ranges a request names, and a racing client can only corrupt its own
    // data, never the server's memory safety (plain bytes, no invariants).
    unsafe { MmapOptions::new().len(len).map_mut(fd) }
        .map_err(|e| CacheError::io(format!("map a {len}-byte client region"), e))
}

/// Creates a shared region for a client: a memfd of `len` bytes, sealed against shrinking, and
/// its read-write mapping. Send the descriptor to the server with `ShmRegister`.
pub fn create_region(len: usize) -> Result<(OwnedFd, MmapMut)> {
    let fd = rustix::fs::memfd_create(
        "kvtier-region",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| CacheError::io("memfd_create for a shared region", e.into()))?;
    rustix::fs::ftruncate(&fd, len as u64)
        .map_err(|e| CacheError::io(format!("size a {len}-byte region"), e.into()))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW)
        .map_err(|e| CacheError::io("seal a shared region", e.into()))?;
    // SAFETY: created and sized above, sealed against shrinking: every page stays backed.
    let map = unsafe { MmapOptions::new().len(len).map_mut(&fd) }
        .map_err(|e| CacheError::io(format!("map a {len}-byte region"), e))?;
    Ok((fd, map))
}

#[cfg(test)]
mod tests {
    use kvtier_cache::conformance;
    use kvtier_cache::host::{HostConfig, HostTier};
    use kvtier_cache::key::ChunkKey;
    use kvtier_cache::tier::{ChunkMeta, Tier};

    use super::*;

    #[test]
    fn host_tier_on_memfd_passes_conformance() {
        conformance::run_all(&|budget| {
            Box::new(HostTier::with_allocator(
                HostConfig {
                    budget_bytes: budget,
                    arena_bytes: 4 << 20,
                },
                Box::new(MemfdArenas),
            ))
        });
    }

    #[test]
    fn slot_bytes_are_visible_through_a_readonly_map() {
        let host = HostTier::with_allocator(
            HostConfig {
                budget_bytes: 8 << 20,
                arena_bytes: 2 << 20,
            },
            Box::new(MemfdArenas),
        );
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let key = ChunkKey(42);
        host.put(ChunkKey(1), &ChunkMeta::raw(0, 0, 1, 0, 5000), &[1u8; 5000])
            .unwrap();
        host.put(
            key,
            &ChunkMeta::raw(0, 0, 1, 0, payload.len() as u64),
            &payload,
        )
        .unwrap();
        let (_, loc, _view) = host.locate(key).unwrap();
        let arena = host
            .arenas()
            .unwrap()
            .into_iter()
            .find(|a| a.id == loc.arena)
            .unwrap();
        let fd = arena.shared_fd.expect("memfd arenas are shareable");
        let map = map_arena(&fd, arena.len as usize).unwrap();
        let at = loc.offset as usize;
        assert_eq!(&map[at..at + loc.len as usize], &payload[..]);
    }

    #[test]
    fn shared_arena_cannot_be_resized_or_written_by_clients() {
        let arena = MemfdArenas.allocate(1 << 20).unwrap();
        arena.mem[100] = 7;
        let fd = arena.shared_fd.unwrap();
        assert!(
            rustix::fs::ftruncate(&fd, 1 << 10).is_err(),
            "shrink must be sealed"
        );
        assert!(
            rustix::fs::ftruncate(&fd, 2 << 20).is_err(),
            "grow must be sealed"
        );
        // SAFETY (test): the fd is a live memfd of 1 MiB.
        let writable = unsafe { MmapOptions::new().len(1 << 20).map_mut(&fd) };
        assert!(writable.is_err(), "new writable maps must be sealed");
        let map = map_arena(&fd, 1 << 20).unwrap();
        assert_eq!(map[100], 7);
        assert!(
            map_arena(&fd, 2 << 20).is_err(),
            "mapping past the end is refused"
        );
    }
}
