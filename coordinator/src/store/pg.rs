//! The PostgreSQL backend of [`super::Store`]: the same whole operations as the sled backend,
//! each one SQL transaction, so that several coordinator instances can share one database.
//!
//! - Records are the sled backend's serde JSON in `jsonb` columns; keys, states and counters
//!   are columns. The schema is embedded and versioned (`migrations/`, applied in order under
//!   an advisory lock, recorded in `schema_migrations`).
//! - An accepted update is one transaction: the (round, client) marker (its primary key counts
//!   every update once, whichever instance receives it), the fold into *this instance's*
//!   partial sum and its counters. The transaction holds the round's advisory lock *shared*.
//! - The instance that closes a round holds the round's advisory lock *exclusively*
//!   ([`PgStore::lock_round`]): in-flight accepts finish first, later ones wait and then see
//!   the round closed, so the partial sums it combines are final. A crashed instance's
//!   connection ends and its lock with it.
//! - New rounds and versions are announced with `NOTIFY hearth_changes`; instances wake on it
//!   and also poll, so a lost notification only delays ([`PgStore::wait_change`]).
//!
//! The store interface is synchronous (as sled's): each operation runs on the backend's own
//! small runtime and the caller waits, inside `block_in_place` on a multi-threaded runtime.

use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{de::DeserializeOwned, Serialize};
use sled::IVec;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;
use tokio_postgres::{AsyncMessage, Client, GenericClient, NoTls, Row};

use super::{
    AcceptOutcome, AvailableSample, ClientRecord, MarkAvailable, RoundRecord, RoundState,
    StoreError, TokenRecord, UpdateMarker, VersionMeta,
};

/// The embedded migrations, applied in order; a version is never edited once released.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_deltas.sql")),
    (3, include_str!("migrations/0003_presence.sql")),
];

/// Advisory-lock key (two-int form, a key space apart from the rounds' bigint keys) under
/// which migrations run.
const MIGRATION_LOCK: (i32, i32) = (0x4845_4152, 1);

/// Channel of the change notifications.
const CHANNEL: &str = "hearth_changes";

/// Tables in [`PgStore::snapshot`] order.
const TABLES: &[&str] = &[
    "clients",
    "deltas",
    "downlink",
    "markers",
    "partial_sums",
    "rounds",
    "server_state",
    "tokens",
    "versions",
];

/// Clients available for a model at a time ($2): rows whose time has not passed, live
/// streams' rows only while their instance is alive.
const COUNT_AVAILABLE_SQL: &str = "SELECT count(*) FROM presence p \
     WHERE p.model = $1 AND p.until_ms >= $2 AND (p.until_ms < 9223372036854775807 \
       OR p.instance IN (SELECT name FROM instances WHERE alive_until_ms >= $2))";

/// The cohort draw: the `$4` available clients with the smallest `draw_key` (sha256 of the
/// seed's 8 big-endian bytes and the client id). `ORDER BY .. LIMIT` is a top-N heap sort in
/// the server: memory bounded by the limit, one pass over the model's presence rows.
const SAMPLE_AVAILABLE_SQL: &str = "SELECT p.client_id FROM presence p \
     WHERE p.model = $1 AND p.until_ms >= $2 AND (p.until_ms < 9223372036854775807 \
       OR p.instance IN (SELECT name FROM instances WHERE alive_until_ms >= $2)) \
     ORDER BY sha256(int8send($3::int8) || convert_to(p.client_id, 'UTF8')) LIMIT $4";

/// Clients per statement when presence rows are written in bulk.
const MARK_BATCH: usize = 5000;

/// How long a caller waits for a free connection before the operation fails.
const POOL_WAIT: Duration = Duration::from_secs(30);

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The source carries the server's message; `Display` of the error alone is terse.
        let detail = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        };
        StoreError::Postgres(detail)
    }
}

fn to_json<T: Serialize>(v: &T) -> Json<serde_json::Value> {
    Json(serde_json::to_value(v).expect("store records serialise"))
}

fn from_json<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, StoreError> {
    serde_json::from_value(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn json_col<T: DeserializeOwned>(row: &Row, col: &str) -> Result<T, StoreError> {
    from_json(row.try_get::<_, Json<serde_json::Value>>(col)?.0)
}

fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Conflict(format!("{v} is out of range")))
}

fn state_str(s: RoundState) -> &'static str {
    match s {
        RoundState::Open => "open",
        RoundState::Completed => "completed",
        RoundState::Failed => "failed",
    }
}

/// Where the PostgreSQL backend connects, and how many connections it keeps.
#[derive(Clone)]
pub struct PgOptions {
    /// libpq-style URL or key=value string (`postgres://user:pass@host:port/db`).
    pub url: String,
    /// Most connections open at once.
    pub pool_size: u32,
    /// This process's name in the partial sums and markers.
    pub instance: String,
    /// Accepts this instance runs at once, each folding into a partial sum of its own
    /// (`<instance>`, `<instance>#1`, ...): more commits in flight, and a round may end with
    /// up to this many updates above `max_clients` per instance, less one.
    pub accept_slots: u32,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &"<redacted>")
            .field("pool_size", &self.pool_size)
            .field("instance", &self.instance)
            .field("accept_slots", &self.accept_slots)
            .finish()
    }
}

struct Pool {
    idle: Vec<Client>,
    out: u32,
}

struct Inner {
    config: tokio_postgres::Config,
    size: u32,
    instance: String,
    rt: Option<tokio::runtime::Runtime>,
    pool: Mutex<Pool>,
    freed: Condvar,
    /// Notified on every `hearth_changes` notification the listener receives.
    changes: tokio::sync::Notify,
    listener: Mutex<Option<Client>>,
    /// Free accept slots of the `slot_count` (see [`PgOptions::accept_slots`]).
    slots: Mutex<Vec<u32>>,
    slot_count: u32,
    slot_freed: Condvar,
}

/// An accept slot taken from the free list; returned on drop.
struct Slot<'a> {
    inner: &'a Inner,
    n: u32,
}

impl Slot<'_> {
    /// The name of this slot's partial sums: the instance's own for slot 0.
    fn partial(&self) -> String {
        match self.n {
            0 => self.inner.instance.clone(),
            n => format!("{}#{n}", self.inner.instance),
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.inner.slots.lock().expect("slot lock").push(self.n);
        self.inner.slot_freed.notify_one();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("instance", &self.inner.instance)
            .field("pool_size", &self.inner.size)
            .finish_non_exhaustive()
    }
}

/// A pooled connection, returned to the pool when dropped (or discarded when closed).
struct Conn<'a> {
    store: &'a Inner,
    client: Option<Client>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("connection present")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("connection present")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let mut p = self.store.pool.lock().expect("pool lock");
        p.out -= 1;
        if let Some(c) = self.client.take() {
            if !c.is_closed() {
                p.idle.push(c);
            }
        }
        self.store.freed.notify_one();
    }
}

/// Holds a round's advisory lock exclusively (see [`PgStore::lock_round`]); released on drop.
pub struct PgRoundLock {
    store: PgStore,
    client: Option<Client>,
    round: i64,
}

impl Drop for PgRoundLock {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let round = self.round;
        let unlocked = self.store.block(async {
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&round])
                .await
        });
        let mut p = self.store.inner.pool.lock().expect("pool lock");
        p.out -= 1;
        // A connection that could not unlock is closed (dropped), which releases the lock.
        if unlocked.is_ok() && !client.is_closed() {
            p.idle.push(client);
        }
        self.store.inner.freed.notify_one();
    }
}

impl std::fmt::Debug for PgRoundLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgRoundLock({})", self.round)
    }
}

/// Counters of an open round, summed over the instances' partial sums.
const COUNTERS: &str =
    "SELECT COALESCE(SUM(updates), 0)::int8, COALESCE(SUM(total_samples), 0)::int8, \
     COALESCE(SUM(uplink_bytes), 0)::int8, COALESCE(SUM(eval_samples), 0)::int8, \
     COALESCE(SUM(eval_loss_sum), 0)::float8, COALESCE(SUM(eval_correct), 0)::float8 \
     FROM partial_sums WHERE round = $1";

impl PgStore {
    /// Connects (one connection, to fail early on a wrong URL or password), applies pending
    /// migrations and starts listening for changes.
    pub fn connect(opts: &PgOptions) -> Result<PgStore, StoreError> {
        let config = tokio_postgres::Config::from_str(&opts.url)
            .map_err(|e| StoreError::Postgres(format!("bad url: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hearth-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Postgres(format!("runtime: {e}")))?;
        let store = PgStore {
            inner: Arc::new(Inner {
                config,
                size: opts.pool_size.max(1),
                instance: opts.instance.clone(),
                rt: Some(rt),
                pool: Mutex::new(Pool {
                    idle: Vec::new(),
                    out: 0,
                }),
                freed: Condvar::new(),
                changes: tokio::sync::Notify::new(),
                listener: Mutex::new(None),
                slots: Mutex::new((0..opts.accept_slots.max(1)).rev().collect()),
                slot_count: opts.accept_slots.max(1),
                slot_freed: Condvar::new(),
            }),
        };
        // Reach the server once before anything else: a database that is down or refuses us is
        // "unavailable" (exit 69), which an operator fixes differently from a failed migration.
        drop(store.conn().map_err(|e| match e {
            StoreError::Postgres(m) => StoreError::Unavailable(m),
            e => e,
        })?);
        store.migrate()?;
        // A database without LISTEN (CockroachDB) leaves polling alone.
        if let Err(e) = store.listen() {
            tracing::warn!(error = %e, "cannot listen for changes: polling only");
        }
        Ok(store)
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// Accepts this instance runs at once ([`PgOptions::accept_slots`]).
    pub fn accept_slots(&self) -> u32 {
        self.inner.slot_count
    }

    /// A free accept slot, waiting for one (callers run at most `accept_slots` accepts per
    /// round at once, so this waits only when rounds of several models accept together).
    fn slot(&self) -> Slot<'_> {
        let inner = &*self.inner;
        let mut free = inner.slots.lock().expect("slot lock");
        loop {
            if let Some(n) = free.pop() {
                return Slot { inner, n };
            }
            free = inner.slot_freed.wait(free).expect("slot lock");
        }
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.inner.rt.as_ref().expect("runtime present")
    }

    /// Runs `fut` on the backend's runtime and waits for it: in `block_in_place` on a
    /// multi-threaded runtime's worker, on a scoped thread from a current-thread runtime.
    fn block<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        self.block_with(move || fut)
    }

    /// Runs `f` with a connection from the pool on the backend's runtime and waits for it
    /// (as [`PgStore::block`]); the connection returns to the pool afterwards. Every
    /// operation on a pooled connection goes through here.
    fn with_client<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&mut Client) -> Result<T, StoreError> + Send,
        T: Send,
    {
        let mut conn = self.conn()?;
        let c: &mut Client = &mut conn;
        self.block_with(move || f(c))
    }

    /// [`PgStore::block`] of the future `make` returns, made on the thread that runs it (so
    /// the future itself need not be `Send`).
    fn block_with<M, F>(&self, make: M) -> F::Output
    where
        M: FnOnce() -> F + Send,
        F: Future,
        F::Output: Send,
    {
        let h = self.rt().handle();
        match tokio::runtime::Handle::try_current().map(|c| c.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread) => std::thread::scope(|s| {
                s.spawn(move || h.block_on(make()))
                    .join()
                    .expect("store thread panicked")
            }),
            Ok(_) => tokio::task::block_in_place(move || h.block_on(make())),
            Err(_) => h.block_on(make()),
        }
    }

    /// A new connection whose I/O runs on the backend's runtime; `on_message` sees its
    /// notifications.
    fn open_client(
        &self,
        on_message: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Result<Client, StoreError> {
        let config = self.inner.config.clone();
        let connect = self.rt().spawn(async move {
            let (client, mut conn) = config.connect(NoTls).await?;
            tokio::spawn(async move {
                let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                while let Some(m) = messages.next().await {
                    match m {
                        Ok(AsyncMessage::Notification(_)) => {
                            if let Some(f) = &on_message {
                                f();
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "PostgreSQL connection ended");
                            break;
                        }
                    }
                }
            });
            Ok::<_, tokio_postgres::Error>(client)
        });
        let joined = self.block(connect);
        Ok(joined.map_err(|e| StoreError::Postgres(format!("connect task: {e}")))??)
    }

    /// A connection from the pool, waiting up to [`POOL_WAIT`] for one.
    fn conn(&self) -> Result<Conn<'_>, StoreError> {
        let inner = &*self.inner;
        let deadline = std::time::Instant::now() + POOL_WAIT;
        let mut p = inner.pool.lock().expect("pool lock");
        loop {
            while let Some(c) = p.idle.pop() {
                if !c.is_closed() {
                    p.out += 1;
                    return Ok(Conn {
                        store: inner,
                        client: Some(c),
                    });
                }
            }
            if p.out < inner.size {
                p.out += 1;
                drop(p);
                let mut conn = Conn {
                    store: inner,
                    client: None,
                };
                conn.client = Some(self.open_client(None)?);
                return Ok(conn);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::Postgres(format!(
                    "no free connection after {} s (pool_size = {})",
                    POOL_WAIT.as_secs(),
                    inner.size
                )));
            }
            p = inner.freed.wait_timeout(p, left).expect("pool lock").0;
        }
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.with_client(async move |c| {
            let (a, b) = MIGRATION_LOCK;
            c.execute("SELECT pg_advisory_lock($1, $2)", &[&a, &b])
                .await?;
            let r = async {
                c.batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (
                             version integer PRIMARY KEY,
                             applied_at timestamptz NOT NULL DEFAULT now())",
                )
                .await?;
                let done: Vec<i32> = c
                    .query("SELECT version FROM schema_migrations", &[])
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if let Some(v) = done
                    .iter()
                    .find(|v| !MIGRATIONS.iter().any(|(m, _)| m == *v))
                {
                    return Err(StoreError::Conflict(format!(
                        "the database has schema version {v}, which this coordinator does \
                             not know (a newer release migrated it)"
                    )));
                }
                for (v, sql) in MIGRATIONS {
                    if done.contains(v) {
                        continue;
                    }
                    let tx = c.transaction().await?;
                    tx.batch_execute(sql).await?;
                    tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[v])
                        .await?;
                    tx.commit().await?;
                    tracing::info!(version = v, "database schema migrated");
                }
                Ok(())
            }
            .await;
            c.execute("SELECT pg_advisory_unlock($1, $2)", &[&a, &b])
                .await?;
            r
        })
    }

    fn listen(&self) -> Result<(), StoreError> {
        let me = Arc::downgrade(&self.inner);
        let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Some(inner) = me.upgrade() {
                inner.changes.notify_waiters();
            }
        });
        let client = self.open_client(Some(wake))?;
        self.block(client.batch_execute(&format!("LISTEN {CHANNEL}")))?;
        *self.inner.listener.lock().expect("listener lock") = Some(client);
        Ok(())
    }

    /// Waits until another instance announces a change (a round opened or closed, a version
    /// published) or `limit` passes; re-establishes a lost listening connection.
    pub async fn wait_change(&self, limit: Duration) {
        let dead = self
            .inner
            .listener
            .lock()
            .expect("listener lock")
            .as_ref()
            .is_none_or(Client::is_closed);
        if dead {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = me.listen() {
                    tracing::warn!(error = %e, "cannot listen for changes: polling only");
                }
            })
            .await;
        }
        let _ = tokio::time::timeout(limit, self.inner.changes.notified()).await;
    }

    /// Takes round `id`'s advisory lock exclusively on a connection of its own, waiting for
    /// accepts in flight (they hold it shared) and for another instance that is closing it.
    pub fn lock_round(&self, id: u64) -> Result<PgRoundLock, StoreError> {
        let round = i64_of(id)?;
        let mut conn = self.conn()?;
        let client = conn.client.take().expect("connection present");
        // The slot stays taken until the lock is dropped.
        std::mem::forget(conn);
        let lock = PgRoundLock {
            store: self.clone(),
            client: Some(client),
            round,
        };
        let c = lock.client.as_ref().expect("client present");
        self.block(c.execute("SELECT pg_advisory_lock($1)", &[&round]))?;
        Ok(lock)
    }

    // ------------------------------------------------------------ tokens and clients

    pub(super) fn add_token(&self, token: &str, rec: &TokenRecord) -> Result<bool, StoreError> {
        let rec = to_json(rec);
        self.with_client(async move |c| {
            let n = c
                .execute(
                    "INSERT INTO tokens (token, rec) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&token, &rec],
                )
                .await?;
            Ok(n == 1)
        })
    }

    pub(super) fn token(&self, token: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.with_client(async move |c| {
            c.query_opt("SELECT rec FROM tokens WHERE token = $1", &[&token])
                .await?
                .map(|r| json_col(&r, "rec"))
                .transpose()
        })
    }

    pub(super) fn enroll(&self, token: &str, client: &ClientRecord) -> Result<(), StoreError> {
        let crec = to_json(client);
        self.with_client(async move |c| {
            let tx = c.transaction().await?;
            let Some(row) = tx
                .query_opt(
                    "SELECT rec FROM tokens WHERE token = $1 FOR UPDATE",
                    &[&token],
                )
                .await?
            else {
                return Err(StoreError::TokenRejected);
            };
            let mut rec: TokenRecord = json_col(&row, "rec")?;
            if rec.uses == 0 {
                return Err(StoreError::TokenRejected);
            }
            if rec.expires_unix_ms != 0 && client.enrolled_unix_ms >= rec.expires_unix_ms {
                return Err(StoreError::TokenExpired);
            }
            if !rec.device.is_empty() && rec.device != client.device_name {
                return Err(StoreError::TokenDevice(rec.device.clone()));
            }
            rec.uses -= 1;
            tx.execute(
                "UPDATE tokens SET rec = $2 WHERE token = $1",
                &[&token, &to_json(&rec)],
            )
            .await?;
            tx.execute(
                "INSERT INTO clients (client_id, device_name, rec) VALUES ($1, $2, $3) \
                     ON CONFLICT (client_id) DO UPDATE SET device_name = $2, rec = $3",
                &[&client.client_id, &client.device_name, &crec],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    pub(super) fn revoke(&self, device: &str, now_ms: u64) -> Result<Vec<String>, StoreError> {
        self.with_client(async move |c| {
            let tx = c.transaction().await?;
            let rows = tx
                .query(
                    "SELECT client_id, rec FROM clients \
                         WHERE device_name = $1 OR client_id = $1 ORDER BY client_id FOR UPDATE",
                    &[&device],
                )
                .await?;
            let mut ids = Vec::new();
            for row in rows {
                let id: String = row.try_get("client_id")?;
                let mut rec: ClientRecord = json_col(&row, "rec")?;
                if rec.revoked_unix_ms.is_none() {
                    rec.revoked_unix_ms = Some(now_ms);
                    tx.execute(
                        "UPDATE clients SET rec = $2 WHERE client_id = $1",
                        &[&id, &to_json(&rec)],
                    )
                    .await?;
                }
                ids.push(id);
            }
            // A revoked client is not available any more.
            tx.execute("DELETE FROM presence WHERE client_id = ANY($1)", &[&ids])
                .await?;
            tx.commit().await?;
            Ok(ids)
        })
    }

    pub(super) fn client(&self, client_id: &str) -> Result<Option<ClientRecord>, StoreError> {
        self.with_client(async move |c| {
            c.query_opt(
                "SELECT rec FROM clients WHERE client_id = $1",
                &[&client_id],
            )
            .await?
            .map(|r| json_col(&r, "rec"))
            .transpose()
        })
    }

    // ------------------------------------------------------------ availability

    pub(super) fn mark_available(
        &self,
        model: &str,
        clients: &[String],
        how: MarkAvailable,
    ) -> Result<(), StoreError> {
        let instance = &self.inner.instance;
        self.with_client(async move |c| {
            // Bounded statements: many clients go in slices.
            for part in clients.chunks(MARK_BATCH) {
                match how {
                    MarkAvailable::Live => {
                        c.execute(
                            "INSERT INTO presence (model, client_id, instance, until_ms) \
                             SELECT $1::text, c, $3::text, $4::int8 FROM unnest($2::text[]) AS c \
                             ON CONFLICT (model, client_id) \
                             DO UPDATE SET instance = EXCLUDED.instance, until_ms = EXCLUDED.until_ms",
                            &[&model, &part, instance, &(super::LIVE_UNTIL as i64)],
                        )
                        .await?;
                    }
                    MarkAvailable::Until(until) => {
                        c.execute(
                            "UPDATE presence SET until_ms = $3 \
                             WHERE model = $1 AND client_id = ANY($2)",
                            &[&model, &part, &i64_of(until)?],
                        )
                        .await?;
                    }
                }
            }
            Ok(())
        })
    }

    pub(super) fn heartbeat(&self, alive_until_ms: u64) -> Result<(), StoreError> {
        let until = i64_of(alive_until_ms)?;
        let instance = &self.inner.instance;
        self.with_client(async move |c| {
            c.execute(
                "INSERT INTO instances (name, alive_until_ms) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET alive_until_ms = EXCLUDED.alive_until_ms",
                &[instance, &until],
            )
            .await?;
            Ok(())
        })
    }

    pub(super) fn sample_available(
        &self,
        model: &str,
        now_ms: u64,
        seed: u64,
        k: usize,
    ) -> Result<AvailableSample, StoreError> {
        let now = i64_of(now_ms)?;
        // The seed's 8 bytes as PostgreSQL's int8send writes them (big-endian), as draw_key.
        let seed = i64::from_be_bytes(seed.to_be_bytes());
        let limit = i64_of(k as u64)?;
        self.with_client(async move |c| {
            let available: i64 = c
                .query_one(COUNT_AVAILABLE_SQL, &[&model, &now])
                .await?
                .get(0);
            if k == 0 {
                return Ok(AvailableSample {
                    available: available as u64,
                    ..AvailableSample::default()
                });
            }
            let rows = c
                .query(SAMPLE_AVAILABLE_SQL, &[&model, &now, &seed, &limit])
                .await?;
            let held = rows.len();
            let mut cohort = rows
                .iter()
                .map(|r| r.try_get::<_, String>(0))
                .collect::<Result<Vec<_>, _>>()?;
            cohort.sort();
            Ok(AvailableSample {
                available: available as u64,
                cohort,
                held,
            })
        })
    }

    /// The plan PostgreSQL chooses for the cohort draw (tests: a bounded top-k sort).
    #[cfg(test)]
    pub(super) fn explain_sample(
        &self,
        model: &str,
        now_ms: u64,
        k: usize,
    ) -> Result<String, StoreError> {
        let (now, limit) = (i64_of(now_ms)?, i64_of(k as u64)?);
        self.with_client(async move |c| {
            let rows = c
                .query(
                    &format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {SAMPLE_AVAILABLE_SQL}"),
                    &[&model, &now, &0i64, &limit],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n"))
        })
    }

    // ------------------------------------------------------------ models

    async fn insert_version(
        c: &impl GenericClient,
        meta: &VersionMeta,
        onnx: &[u8],
    ) -> Result<(), StoreError> {
        let n = c
            .execute(
                "INSERT INTO versions (model, version, meta, onnx) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
                &[&meta.model, &i64_of(meta.version)?, &to_json(meta), &onnx],
            )
            .await?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "version {} of {} already exists",
                meta.version, meta.model
            )));
        }
        c.execute(
            "SELECT pg_notify($1, $2)",
            &[
                &CHANNEL,
                &format!("version {} {}", meta.model, meta.version),
            ],
        )
        .await?;
        Ok(())
    }

    pub(super) fn put_version(&self, meta: &VersionMeta, onnx: &[u8]) -> Result<(), StoreError> {
        self.with_client(async move |c| Self::insert_version(&*c, meta, onnx).await)
    }

    pub(super) fn update_version_meta(&self, meta: &VersionMeta) -> Result<(), StoreError> {
        self.with_client(async move |c| {
            let n = c
                .execute(
                    "UPDATE versions SET meta = $3 WHERE model = $1 AND version = $2",
                    &[&meta.model, &i64_of(meta.version)?, &to_json(meta)],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::Conflict(format!(
                    "version {} of {} does not exist",
                    meta.version, meta.model
                )));
            }
            Ok(())
        })
    }

    pub(super) fn latest_version(&self, model: &str) -> Result<Option<VersionMeta>, StoreError> {
        self.with_client(async move |c| {
            c.query_opt(
                "SELECT meta FROM versions WHERE model = $1 ORDER BY version DESC LIMIT 1",
                &[&model],
            )
            .await?
            .map(|r| json_col(&r, "meta"))
            .transpose()
        })
    }

    pub(super) fn version(
        &self,
        model: &str,
        version: u64,
    ) -> Result<Option<VersionMeta>, StoreError> {
        let v = i64_of(version)?;
        self.with_client(async move |c| {
            c.query_opt(
                "SELECT meta FROM versions WHERE model = $1 AND version = $2",
                &[&model, &v],
            )
            .await?
            .map(|r| json_col(&r, "meta"))
            .transpose()
        })
    }

    pub(super) fn versions(&self, model: &str) -> Result<Vec<VersionMeta>, StoreError> {
        self.with_client(async move |c| {
            c.query(
                "SELECT meta FROM versions WHERE model = $1 ORDER BY version",
                &[&model],
            )
            .await?
            .iter()
            .map(|r| json_col(r, "meta"))
            .collect()
        })
    }

    pub(super) fn put_rollback(&self, meta: &VersionMeta, onnx: &[u8]) -> Result<(), StoreError> {
        self.with_client(async move |c| {
            let tx = c.transaction().await?;
            Self::insert_version(&tx, meta, onnx).await?;
            tx.execute("DELETE FROM server_state WHERE model = $1", &[&meta.model])
                .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    pub(super) fn add_downlink(
        &self,
        model: &str,
        version: u64,
        bytes: u64,
    ) -> Result<(), StoreError> {
        let (v, b) = (i64_of(version)?, i64_of(bytes)?);
        self.with_client(async move |c| {
            c.execute(
                "INSERT INTO downlink (model, version, bytes) VALUES ($1, $2, $3) \
                     ON CONFLICT (model, version) DO UPDATE SET bytes = downlink.bytes + $3",
                &[&model, &v, &b],
            )
            .await?;
            Ok(())
        })
    }

    pub(super) fn downlink(&self, model: &str, version: u64) -> Result<u64, StoreError> {
        let v = i64_of(version)?;
        self.with_client(async move |c| {
            let r = c
                .query_opt(
                    "SELECT bytes FROM downlink WHERE model = $1 AND version = $2",
                    &[&model, &v],
                )
                .await?;
            Ok(r.map_or(0, |r| r.get::<_, i64>(0) as u64))
        })
    }

    pub(super) fn put_delta(
        &self,
        model: &str,
        version: u64,
        rec: &super::DeltaRecord,
    ) -> Result<(), StoreError> {
        let (v, base) = (i64_of(version)?, i64_of(rec.base)?);
        self.with_client(async move |c| {
            c.execute(
                "INSERT INTO deltas (model, version, base, payload, residual) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (model, version) DO UPDATE \
                     SET base = $3, payload = $4, residual = $5",
                &[&model, &v, &base, &rec.payload, &rec.residual],
            )
            .await?;
            Ok(())
        })
    }

    pub(super) fn delta(
        &self,
        model: &str,
        version: u64,
    ) -> Result<Option<super::DeltaRecord>, StoreError> {
        let v = i64_of(version)?;
        self.with_client(async move |c| {
            let r = c
                .query_opt(
                    "SELECT base, payload, residual FROM deltas WHERE model = $1 AND version = $2",
                    &[&model, &v],
                )
                .await?;
            Ok(r.map(|r| super::DeltaRecord {
                base: r.get::<_, i64>(0) as u64,
                payload: r.get(1),
                residual: r.get(2),
            }))
        })
    }

    pub(super) fn model_bytes(
        &self,
        model: &str,
        version: u64,
    ) -> Result<Option<IVec>, StoreError> {
        let v = i64_of(version)?;
        self.with_client(async move |c| {
            let r = c
                .query_opt(
                    "SELECT onnx FROM versions WHERE model = $1 AND version = $2",
                    &[&model, &v],
                )
                .await?;
            Ok(r.map(|r| IVec::from(r.get::<_, Vec<u8>>(0))))
        })
    }

    pub(super) fn server_state(&self, model: &str) -> Result<Option<IVec>, StoreError> {
        self.with_client(async move |c| {
            let r = c
                .query_opt("SELECT state FROM server_state WHERE model = $1", &[&model])
                .await?;
            Ok(r.map(|r| IVec::from(r.get::<_, Vec<u8>>(0))))
        })
    }

    // ------------------------------------------------------------ rounds

    /// A round record from its row; an open round's counters are summed from the partial
    /// sums (a closed round's were written into it when it closed).
    async fn round_of(c: &impl GenericClient, row: &Row) -> Result<RoundRecord, StoreError> {
        let mut rec: RoundRecord = json_col(row, "rec")?;
        rec.id = row.try_get::<_, i64>("id")? as u64;
        if rec.state == RoundState::Open {
            Self::add_counters(c, &mut rec).await?;
        }
        Ok(rec)
    }

    async fn add_counters(c: &impl GenericClient, rec: &mut RoundRecord) -> Result<(), StoreError> {
        let r = c.query_one(COUNTERS, &[&(rec.id as i64)]).await?;
        rec.updates = r.get::<_, i64>(0) as u32;
        rec.total_samples = r.get::<_, i64>(1) as u64;
        rec.uplink_bytes = r.get::<_, i64>(2) as u64;
        rec.fed_eval_samples = r.get::<_, i64>(3) as u64;
        rec.fed_eval_loss_sum = r.get(4);
        rec.fed_eval_correct = r.get(5);
        Ok(())
    }

    async fn rounds_where(
        c: &impl GenericClient,
        clause: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<RoundRecord>, StoreError> {
        let rows = c
            .query(&format!("SELECT id, rec FROM rounds {clause}"), params)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(Self::round_of(c, row).await?);
        }
        Ok(out)
    }

    pub(super) fn open_round(
        &self,
        proto: &RoundRecord,
    ) -> Result<(RoundRecord, bool), StoreError> {
        self.with_client(async move |c| {
            loop {
                let open =
                    Self::rounds_where(c, "WHERE model = $1 AND state = 'open'", &[&proto.model])
                        .await?;
                if let Some(r) = open.into_iter().next() {
                    return Ok((r, false));
                }
                let tx = c.transaction().await?;
                let id: i64 = tx
                    .query_one("SELECT nextval('round_ids')", &[])
                    .await?
                    .get(0);
                let mut rec = proto.clone();
                rec.id = id as u64;
                rec.state = RoundState::Open;
                let inserted = tx
                    .execute(
                        "INSERT INTO rounds (id, model, state, rec) VALUES ($1, $2, 'open', $3)",
                        &[&id, &rec.model, &to_json(&rec)],
                    )
                    .await;
                match inserted {
                    // Another instance opened one meanwhile: return that one.
                    Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => continue,
                    r => r?,
                };
                tx.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&CHANNEL, &format!("round {id}")],
                )
                .await?;
                tx.commit().await?;
                return Ok((rec, true));
            }
        })
    }

    pub(super) fn round(&self, id: u64) -> Result<Option<RoundRecord>, StoreError> {
        let id = i64_of(id)?;
        self.with_client(async move |c| {
            Ok(Self::rounds_where(c, "WHERE id = $1", &[&id])
                .await?
                .into_iter()
                .next())
        })
    }

    pub(super) fn latest_round(&self, model: &str) -> Result<Option<RoundRecord>, StoreError> {
        self.with_client(async move |c| {
            Ok(
                Self::rounds_where(c, "WHERE model = $1 ORDER BY id DESC LIMIT 1", &[&model])
                    .await?
                    .into_iter()
                    .next(),
            )
        })
    }

    pub(super) fn rounds_of(&self, model: &str) -> Result<Vec<RoundRecord>, StoreError> {
        self.with_client(async move |c| {
            Self::rounds_where(c, "WHERE model = $1 ORDER BY id", &[&model]).await
        })
    }

    pub(super) fn open_rounds(&self) -> Result<Vec<RoundRecord>, StoreError> {
        self.with_client(async move |c| {
            Self::rounds_where(c, "WHERE state = 'open' ORDER BY model", &[]).await
        })
    }

    pub(super) fn round_sums(&self, id: u64) -> Result<Vec<IVec>, StoreError> {
        let id = i64_of(id)?;
        self.with_client(async move |c| {
            Ok(c.query(
                "SELECT sum FROM partial_sums WHERE round = $1 ORDER BY instance",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| IVec::from(r.get::<_, Vec<u8>>(0)))
            .collect())
        })
    }

    pub(super) fn recent_markers(
        &self,
        model: &str,
        rounds: usize,
    ) -> Result<Vec<UpdateMarker>, StoreError> {
        let n = rounds as i64;
        self.with_client(async move |c| {
            c.query(
                "SELECT m.marker FROM markers m JOIN \
                       (SELECT id FROM rounds WHERE model = $1 AND state = 'completed' \
                        ORDER BY id DESC LIMIT $2) r ON m.round = r.id \
                     ORDER BY m.round DESC, m.client_id",
                &[&model, &n],
            )
            .await?
            .iter()
            .map(|r| json_col(r, "marker"))
            .collect()
        })
    }

    pub(super) fn markers(&self, id: u64) -> Result<Vec<UpdateMarker>, StoreError> {
        let id = i64_of(id)?;
        self.with_client(async move |c| {
            c.query(
                "SELECT marker FROM markers WHERE round = $1 ORDER BY client_id",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| json_col(r, "marker"))
            .collect()
        })
    }

    pub(super) fn marker(&self, id: u64, client: &str) -> Result<Option<UpdateMarker>, StoreError> {
        let id = i64_of(id)?;
        self.with_client(async move |c| {
            c.query_opt(
                "SELECT marker FROM markers WHERE round = $1 AND client_id = $2",
                &[&id, &client],
            )
            .await?
            .map(|r| json_col(&r, "marker"))
            .transpose()
        })
    }

    pub(super) fn kept_updates(&self, id: u64) -> Result<Vec<(UpdateMarker, IVec)>, StoreError> {
        let id = i64_of(id)?;
        self.with_client(async move |c| {
            c.query(
                "SELECT marker, kept FROM markers WHERE round = $1 AND kept IS NOT NULL \
                     ORDER BY client_id",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| Ok((json_col(r, "marker")?, IVec::from(r.get::<_, Vec<u8>>(1)))))
            .collect()
        })
    }

    pub(super) fn snapshot(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Vec<(IVec, IVec)>>, StoreError> {
        self.with_client(async move |c| {
            let mut out = std::collections::BTreeMap::new();
            for t in TABLES {
                let rows = c
                    .query(
                        &format!("SELECT row_to_json(t)::text FROM {t} t ORDER BY 1"),
                        &[],
                    )
                    .await?;
                let kvs = rows
                    .iter()
                    .map(|r| {
                        (
                            IVec::from(r.get::<_, String>(0).as_bytes()),
                            IVec::from(&[][..]),
                        )
                    })
                    .collect();
                out.insert((*t).to_string(), kvs);
            }
            Ok(out)
        })
    }

    pub(super) fn accept_update<F>(
        &self,
        round_id: u64,
        marker: &UpdateMarker,
        keep: Option<&[u8]>,
        fold: F,
    ) -> Result<AcceptOutcome, StoreError>
    where
        F: Fn(Option<&[u8]>) -> Result<Vec<u8>, String> + Send + Sync,
    {
        let id = i64_of(round_id)?;
        let instance = self.inner.instance.clone();
        // One accept at a time per partial sum: its row is read and replaced below.
        let slot = self.slot();
        let partial = slot.partial();
        let fold = &fold;
        self.with_client(async move |c| {
            let tx = c.transaction().await?;
            // Shared with other accepts, exclusive with the instance closing the round.
            tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&id])
                .await?;
            let Some(row) = tx
                .query_opt("SELECT id, rec FROM rounds WHERE id = $1", &[&id])
                .await?
            else {
                return Ok(AcceptOutcome::NotFound);
            };
            let mut rec = Self::round_of(&tx, &row).await?;
            let dup = tx
                .query_opt(
                    "SELECT 1 FROM markers WHERE round = $1 AND client_id = $2",
                    &[&id, &marker.client_id],
                )
                .await?;
            if dup.is_some() {
                return Ok(AcceptOutcome::Duplicate(rec));
            }
            if rec.state != RoundState::Open {
                return Ok(AcceptOutcome::NotOpen(rec));
            }
            if rec.updates >= rec.max_clients {
                return Ok(AcceptOutcome::Full(rec));
            }
            let prev: Option<Vec<u8>> = tx
                .query_opt(
                    "SELECT sum FROM partial_sums WHERE round = $1 AND instance = $2 FOR UPDATE",
                    &[&id, &partial],
                )
                .await?
                .map(|r| r.get(0));
            let next = fold(prev.as_deref()).map_err(StoreError::Fold)?;
            let inserted = tx
                .execute(
                    "INSERT INTO markers (round, client_id, instance, marker, kept) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[&id, &marker.client_id, &instance, &to_json(marker), &keep],
                )
                .await?;
            if inserted == 0 {
                // Another instance recorded this client's update meanwhile.
                drop(tx);
                let row = c
                    .query_one("SELECT id, rec FROM rounds WHERE id = $1", &[&id])
                    .await?;
                return Ok(AcceptOutcome::Duplicate(Self::round_of(c, &row).await?));
            }
            let (en, el, ec) = if marker.eval_samples > 0 {
                let n = marker.eval_samples as f64;
                (
                    marker.eval_samples,
                    n * f64::from(marker.eval_loss),
                    n * f64::from(marker.eval_accuracy),
                )
            } else {
                (0, 0.0, 0.0)
            };
            tx.execute(
                "INSERT INTO partial_sums (round, instance, sum, updates, total_samples, \
                       uplink_bytes, eval_samples, eval_loss_sum, eval_correct) \
                     VALUES ($1, $2, $3, 1, $4, $5, $6, $7, $8) \
                     ON CONFLICT (round, instance) DO UPDATE SET sum = $3, \
                       updates = partial_sums.updates + 1, \
                       total_samples = partial_sums.total_samples + $4, \
                       uplink_bytes = partial_sums.uplink_bytes + $5, \
                       eval_samples = partial_sums.eval_samples + $6, \
                       eval_loss_sum = partial_sums.eval_loss_sum + $7, \
                       eval_correct = partial_sums.eval_correct + $8",
                &[
                    &id,
                    &partial,
                    &next,
                    &i64_of(marker.num_samples)?,
                    &i64_of(marker.payload_bytes)?,
                    &i64_of(en)?,
                    &el,
                    &ec,
                ],
            )
            .await?;
            tx.commit().await?;
            rec.updates += 1;
            rec.total_samples += marker.num_samples;
            rec.uplink_bytes += marker.payload_bytes;
            rec.fed_eval_samples += en;
            rec.fed_eval_loss_sum += el;
            rec.fed_eval_correct += ec;
            Ok(AcceptOutcome::Accepted(rec))
        })
    }

    /// Closes an open round in `tx`: final counters into the record, partial sums deleted,
    /// kept updates dropped. Callers hold the round's lock ([`PgStore::lock_round`]).
    async fn close_round_tx(
        tx: &tokio_postgres::Transaction<'_>,
        id: i64,
    ) -> Result<RoundRecord, StoreError> {
        let Some(row) = tx
            .query_opt(
                "SELECT id, rec FROM rounds WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
        else {
            return Err(StoreError::Conflict(format!("round {id} does not exist")));
        };
        let mut rec = Self::round_of(tx, &row).await?;
        if rec.state != RoundState::Open {
            return Err(StoreError::Conflict(format!("round {id} is not open")));
        }
        rec.closed_unix_ms = super::now_unix_ms();
        tx.execute("DELETE FROM partial_sums WHERE round = $1", &[&id])
            .await?;
        tx.execute(
            "UPDATE markers SET kept = NULL WHERE round = $1 AND kept IS NOT NULL",
            &[&id],
        )
        .await?;
        Ok(rec)
    }

    async fn finish_close(
        tx: tokio_postgres::Transaction<'_>,
        rec: &RoundRecord,
    ) -> Result<(), StoreError> {
        let id = rec.id as i64;
        tx.execute(
            "UPDATE rounds SET state = $2, rec = $3 WHERE id = $1",
            &[&id, &state_str(rec.state), &to_json(rec)],
        )
        .await?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &format!("closed {id}")],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) fn complete_round(
        &self,
        round_id: u64,
        meta: &VersionMeta,
        onnx: &[u8],
        server_state: Option<&[u8]>,
        detail: &str,
    ) -> Result<RoundRecord, StoreError> {
        let id = i64_of(round_id)?;
        self.with_client(async move |c| {
            let tx = c.transaction().await?;
            let mut rec = Self::close_round_tx(&tx, id).await?;
            Self::insert_version(&tx, meta, onnx).await?;
            if let Some(state) = server_state {
                tx.execute(
                    "INSERT INTO server_state (model, state) VALUES ($1, $2) \
                         ON CONFLICT (model) DO UPDATE SET state = $2",
                    &[&meta.model, &state],
                )
                .await?;
            }
            rec.state = RoundState::Completed;
            rec.new_version = meta.version;
            rec.eval_accuracy = meta.eval_accuracy;
            rec.detail = detail.to_string();
            Self::finish_close(tx, &rec).await?;
            Ok(rec)
        })
    }

    pub(super) fn end_round(
        &self,
        round_id: u64,
        state: RoundState,
        detail: &str,
    ) -> Result<RoundRecord, StoreError> {
        let id = i64_of(round_id)?;
        self.with_client(async move |c| {
            let tx = c.transaction().await?;
            let mut rec = Self::close_round_tx(&tx, id).await?;
            rec.state = state;
            rec.detail = detail.to_string();
            Self::finish_close(tx, &rec).await?;
            Ok(rec)
        })
    }
}
