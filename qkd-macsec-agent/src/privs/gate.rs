//! When to drop: once every link has finished its start-up (opened its netlink sockets, attached
//! the data plane, opened the LLDP socket and loaded its TLS files) or failed trying.
//!
//! Each link holds a [`StartupToken`]; the drop waits until every token said `ready` or was
//! dropped (a link that failed to start needs no more privileges either). No global state: the
//! tokens and the task that waits for them are made together by [`drop_when_started`].

use tokio::sync::oneshot;

use super::PrivsError;

/// One link's start-up, as the capability drop waits for it.
#[derive(Debug)]
pub struct StartupToken(Option<oneshot::Sender<()>>);

impl StartupToken {
    /// This link needs no more start-up privileges. Idempotent; dropping the token says the
    /// same.
    pub fn ready(&mut self) {
        if let Some(t) = self.0.take() {
            let _ = t.send(());
        }
    }
}

/// A token per link (`links` of them) and the task that drops to [`super::RUNTIME_CAPS`] once
/// all of them are ready. The task's result says whether the drop worked: an agent that meant
/// to shed privileges and could not must not go on with all of them, and the caller stops it.
pub fn drop_when_started(
    links: usize,
) -> (
    Vec<StartupToken>,
    tokio::task::JoinHandle<Result<(), PrivsError>>,
) {
    let (tokens, waits): (Vec<_>, Vec<_>) = (0..links)
        .map(|_| {
            let (tx, rx) = oneshot::channel();
            (StartupToken(Some(tx)), rx)
        })
        .unzip();
    let task = tokio::spawn(async move {
        for w in waits {
            // Ready or dropped: either way this link is done with its start-up.
            let _ = w.await;
        }
        let r = tokio::task::spawn_blocking(super::drop_to_runtime)
            .await
            .map_err(|e| PrivsError::Drop {
                step: "the capability drop task".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        if r.is_ok() {
            tracing::info!(
                kept = "CAP_NET_ADMIN, CAP_BPF",
                "start-up done: dropped every other capability on every thread, no_new_privs set"
            );
        }
        r
    });
    (tokens, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait ends only when every token is ready or dropped. (The drop itself needs
    /// privileges and is tested in tests/tests/host_privs.rs; here only the waiting.)
    #[tokio::test]
    async fn waits_for_every_token_ready_or_dropped() {
        let (tokens, waits): (Vec<_>, Vec<_>) = (0..3)
            .map(|_| {
                let (tx, rx) = oneshot::channel::<()>();
                (StartupToken(Some(tx)), rx)
            })
            .unzip();
        let all = tokio::spawn(async move {
            for w in waits {
                let _ = w.await;
            }
        });
        let mut tokens = tokens.into_iter();
        let mut a = tokens.next().unwrap();
        a.ready();
        a.ready();
        drop(tokens.next());
        tokio::task::yield_now().await;
        assert!(!all.is_finished(), "one link is still starting");
        drop(tokens.next());
        all.await.unwrap();
    }
}
