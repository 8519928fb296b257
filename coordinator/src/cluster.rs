//! Several coordinator instances on one PostgreSQL database (`[store] backend = "postgres"`).
//! Any instance serves enrolments, fetches and uploads for any round, because all of that is
//! in the database; what lives in one process is timers and subscriptions. This task keeps
//! them in step with the other instances: it wakes on their change notifications, or every
//! `store.poll_ms` at the latest, and then
//! - arms the deadline timer of every open round it did not open itself (each instance has
//!   one: whichever takes the round's lock in the database first closes it, the others find
//!   it closed) and tells this instance's subscribers that the round opened;
//! - closes an open round that is full (the instance that filled it may have died before
//!   closing it);
//! - tells this instance's subscribers of versions another instance published.
//!
//! With sled (one process) it is not started.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::state::{stopped, Coordinator, Event};
use crate::Error;

/// What this instance has already announced to its subscribers.
#[derive(Default)]
struct Seen {
    rounds: HashSet<u64>,
    versions: HashMap<String, u64>,
}

impl Coordinator {
    /// Starts following the other instances (PostgreSQL only; a no-op with sled). Rounds open
    /// at start-up were resumed by [`Coordinator::resume_rounds`] and count as seen.
    pub fn follow_instances(self: &Arc<Self>) -> Result<(), Error> {
        if !self.store.is_shared() {
            return Ok(());
        }
        let mut seen = Seen::default();
        for r in self.store.open_rounds()? {
            seen.rounds.insert(r.id);
        }
        for m in self.model_names() {
            if let Some(v) = self.store.latest_version(&m)? {
                seen.versions.insert(m, v.version);
            }
        }
        let me = self.clone();
        let mut own = self.subscribe_events();
        let mut shutdown = self.shutdown.clone();
        let poll = Duration::from_millis(self.config.store.poll_ms);
        self.spawn_task(async move {
            loop {
                tokio::select! {
                    _ = me.store.wait_change(poll) => {}
                    _ = stopped(&mut shutdown) => return,
                }
                // What this instance announced itself is not announced again.
                while let Ok(e) = own.try_recv() {
                    match e {
                        Event::RoundOpened(r) => {
                            seen.rounds.insert(r.id);
                        }
                        Event::Published(v) => {
                            let e = seen.versions.entry(v.model).or_default();
                            *e = (*e).max(v.version);
                        }
                    }
                }
                if let Err(e) = me.sync_instances(&mut seen) {
                    tracing::warn!(error = %e, "cannot read the other instances' changes");
                }
            }
        });
        Ok(())
    }

    fn sync_instances(self: &Arc<Self>, seen: &mut Seen) -> Result<(), Error> {
        let open = self.store.open_rounds()?;
        for r in &open {
            if seen.rounds.insert(r.id) {
                tracing::info!(
                    model = %r.model, round = r.id, "round opened by another instance"
                );
                self.spawn_deadline(r.id, r.deadline_unix_ms);
                self.publish(Event::RoundOpened(r.clone()));
            }
            if r.updates >= r.max_clients {
                let (me, id) = (self.clone(), r.id);
                self.spawn_task(async move { me.close_round(id, false).await });
            }
        }
        seen.rounds.retain(|id| open.iter().any(|r| r.id == *id));
        for m in self.model_names() {
            let Some(v) = self.store.latest_version(&m)? else {
                continue;
            };
            let known = seen.versions.entry(m).or_default();
            if v.version > *known {
                *known = v.version;
                tracing::info!(
                    model = %v.model, version = v.version, "version published by another instance"
                );
                self.publish(Event::Published(v));
            }
        }
        Ok(())
    }
}
