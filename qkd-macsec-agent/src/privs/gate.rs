//! When to drop: once every link has finished its start-up (opened its netlink sockets, attached
//! the data plane, opened the LLDP socket and loaded its TLS files) or failed trying.

use std::collections::BTreeSet;
use std::sync::Mutex;

use tokio::sync::Notify;

static READY: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());
static CHANGED: Notify = Notify::const_new();

/// Link `index` needs no more start-up privileges (it started, or it stopped). Idempotent.
pub fn link_ready(index: usize) {
    READY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(index);
    CHANGED.notify_one();
}

/// Spawns the task that drops to [`super::RUNTIME_CAPS`] once links `0..links` are all ready.
/// A failed drop ends the process: an agent that meant to shed privileges and could not must not
/// go on with all of them.
pub fn spawn_drop_when_started(links: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let ready = READY.lock().unwrap_or_else(|p| p.into_inner()).len();
            if ready >= links {
                break;
            }
            CHANGED.notified().await;
        }
        match tokio::task::spawn_blocking(super::drop_to_runtime).await {
            Ok(Ok(())) => tracing::info!(
                kept = "CAP_NET_ADMIN, CAP_BPF",
                "start-up done: dropped every other capability on every thread, no_new_privs set"
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot drop capabilities after start-up; stopping");
                eprintln!("qkd-macsec-agent: cannot drop capabilities after start-up: {e}");
                std::process::exit(71);
            }
            Err(e) => {
                tracing::error!(error = %e, "capability drop task failed; stopping");
                std::process::exit(71);
            }
        }
    })
}
