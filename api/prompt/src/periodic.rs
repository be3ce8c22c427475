//! Background jobs over the store (index builds, squeezing): plain threads that hold the store
//! weakly, so they end once the service that owns the store is gone.

use std::sync::Weak;
use std::time::Duration;

use kvtier_cache::TieredStore;

/// Runs `f` on a named plain thread every `every`, holding the store weakly: the thread ends
/// once the store is gone. Background jobs are CPU work that must not run on async workers.
pub fn spawn_periodic(
    name: &str,
    every: Duration,
    store: Weak<TieredStore>,
    mut f: impl FnMut(&TieredStore) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                let Some(store) = store.upgrade() else { return };
                f(&store);
            }
        })
        .map(|_| ())
}
