//! Group commit: many writers, one `fdatasync` at a time, every put acknowledged only once a sync
//! that covers its record has finished.
//!
//! Records carry increasing sequence numbers and are appended under the tier's writer lock, so
//! "every record up to sequence W is written" is a single number. A writer that needs its record
//! durable either finds a sync already covering it, waits for the sync in flight, or becomes the
//! leader: it snapshots W and the segments dirtied so far, syncs them, and publishes W. Writers
//! that arrive during a sync are covered by the next one, which is how puts share syncs.
//!
//! A failed `fdatasync` leaves the page cache in an unknown state (the kernel may drop the dirty
//! pages and clear the error), so the commit is poisoned: every waiter and every later write
//! fails until the tier is reopened and recovery decides what is really on disk.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kvtier_cache::{CacheError, Result};
use parking_lot::{Condvar, Mutex};

struct CommitState {
    /// Every record with a sequence number up to this one is durable.
    durable_seq: u64,
    /// A leader is syncing now.
    syncing: bool,
    /// A sync failed; nothing written since can be acknowledged.
    poisoned: bool,
}

/// The group-commit coordinator of one tier.
pub struct GroupCommit {
    state: Mutex<CommitState>,
    changed: Condvar,
    /// Appends between taking the writer lock and finishing their write.
    appending: AtomicUsize,
    max_delay: Duration,
    syncs: AtomicU64,
}

impl GroupCommit {
    pub fn new(durable_seq: u64, max_delay: Duration) -> Self {
        GroupCommit {
            state: Mutex::new(CommitState {
                durable_seq,
                syncing: false,
                poisoned: false,
            }),
            changed: Condvar::new(),
            appending: AtomicUsize::new(0),
            max_delay,
            syncs: AtomicU64::new(0),
        }
    }

    /// Marks an append as started; the leader of a sync waits briefly for it to join.
    pub fn append_started(&self) {
        self.appending.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks an append as finished (written or failed).
    pub fn append_finished(&self) {
        if self.appending.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Take the lock so the notification cannot slip between a leader's check and wait.
            let _st = self.state.lock();
            self.changed.notify_all();
        }
    }

    /// Whether a sync has failed since open.
    pub fn is_poisoned(&self) -> bool {
        self.state.lock().poisoned
    }

    /// Marks the tier as unable to acknowledge writes (a sync outside group commit failed).
    pub fn poison(&self) {
        self.state.lock().poisoned = true;
        self.changed.notify_all();
    }

    /// Number of syncs the leaders ran.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Returns once the record with sequence `seq` is durable. `sync_batch` syncs everything
    /// written so far and returns the highest sequence number it covered; it runs on at most
    /// one thread at a time.
    pub fn wait_durable(&self, seq: u64, sync_batch: &dyn Fn() -> Result<u64>) -> Result<()> {
        let mut st = self.state.lock();
        loop {
            if st.poisoned {
                return Err(poisoned_error());
            }
            if st.durable_seq >= seq {
                return Ok(());
            }
            if st.syncing {
                self.changed.wait(&mut st);
                continue;
            }
            st.syncing = true;
            // Appends already under way would otherwise need a sync of their own right after
            // this one; give them up to `max_delay` to land.
            let deadline = Instant::now() + self.max_delay;
            while self.appending.load(Ordering::Acquire) > 0 {
                if self.changed.wait_until(&mut st, deadline).timed_out() {
                    break;
                }
            }
            drop(st);
            let outcome = sync_batch();
            self.syncs.fetch_add(1, Ordering::Relaxed);
            st = self.state.lock();
            st.syncing = false;
            match outcome {
                Ok(covered) => st.durable_seq = st.durable_seq.max(covered),
                Err(e) => {
                    st.poisoned = true;
                    self.changed.notify_all();
                    return Err(e);
                }
            }
            self.changed.notify_all();
        }
    }
}

/// The error every write gets once a sync has failed.
pub fn poisoned_error() -> CacheError {
    CacheError::io(
        "disk tier refuses writes after a failed fdatasync; reopen it to recover",
        std::io::Error::other("earlier fdatasync failed"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_return_only_once_covered_and_share_syncs() {
        let commit = GroupCommit::new(0, Duration::from_millis(1));
        let written = AtomicU64::new(0);
        let synced = AtomicU64::new(0);
        let sync_batch = || {
            let covered = written.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(300));
            synced.fetch_max(covered, Ordering::SeqCst);
            Ok(covered)
        };
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        commit.append_started();
                        let seq = written.fetch_add(1, Ordering::SeqCst) + 1;
                        commit.append_finished();
                        commit.wait_durable(seq, &sync_batch).unwrap();
                        assert!(
                            synced.load(Ordering::SeqCst) >= seq,
                            "acknowledged before its sync"
                        );
                    }
                });
            }
        });
        assert!(
            commit.syncs() < 200,
            "200 writes took {} syncs",
            commit.syncs()
        );
    }

    #[test]
    fn a_failed_sync_fails_every_later_write() {
        let commit = GroupCommit::new(5, Duration::ZERO);
        assert!(
            commit
                .wait_durable(3, &|| unreachable!("already durable"))
                .is_ok()
        );
        let failing = || Err(CacheError::io("fdatasync", std::io::Error::other("eio")));
        assert!(commit.wait_durable(6, &failing).is_err());
        assert!(commit.is_poisoned());
        assert!(
            commit.wait_durable(7, &|| Ok(7)).is_err(),
            "a later sync must not clear the failure"
        );
    }
}
