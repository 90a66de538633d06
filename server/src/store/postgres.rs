//! The PostgreSQL store, for several `warmpool serve` replicas sharing one state.
//!
//! - Every operation is one statement (no client-side transactions) on a pooled connection; each statement is
//!   prepared once per connection. The claim is one `UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED)`: two replicas
//!   never take the same sandbox and never wait on each other's candidate.
//! - Each replica holds one **session** connection for its whole life: it `LISTEN`s for what other replicas change
//!   and holds the advisory locks that say which replica is alive and which pools it reconciles. A replica that
//!   dies (even by `kill -9`) closes that connection, which releases its locks at once.
//! - Statements that change what a pool's reconciler or waiting checkouts care about `NOTIFY` the pool in the same
//!   statement.
//!
//! Everything runs on tokio-postgres, the native async driver, on the server's own runtime: no statement ever
//! blocks a thread, so a stalled database delays the requests that need it and nothing else.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Row};
use warmpool_api::{Account, Tag, TrustPolicy};

use super::schema::{self, Dialect, Shape, TableShape};
use super::*;

/// How databases made by earlier versions reach the described schema ([`super::schema`]): applied in order, each
/// once, by whichever replica starts first. A new database is created from the description at the latest version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, json JSONB NOT NULL);
CREATE TABLE tokens (id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, admin BOOLEAN NOT NULL, json JSONB NOT NULL);
CREATE TABLE templates (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, name TEXT NOT NULL, json JSONB NOT NULL,
    UNIQUE (account_id, name));
CREATE TABLE builds (id TEXT PRIMARY KEY, template_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL, json JSONB NOT NULL);
CREATE INDEX builds_by_template ON builds (template_id, created_at);
CREATE TABLE tags (template_id TEXT NOT NULL, name TEXT NOT NULL, build_id TEXT NOT NULL,
    updated_at TEXT NOT NULL, PRIMARY KEY (template_id, name));
CREATE TABLE pools (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, name TEXT NOT NULL, rev BIGINT NOT NULL,
    json JSONB NOT NULL, UNIQUE (account_id, name));
CREATE TABLE leases (pool_id TEXT NOT NULL, key TEXT NOT NULL, json JSONB NOT NULL, PRIMARY KEY (pool_id, key));
CREATE TABLE sandboxes (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, pool_id TEXT, lifecycle TEXT NOT NULL,
    claimed_from TEXT, build_id TEXT NOT NULL, state TEXT NOT NULL, ready_at TEXT, json JSONB NOT NULL);
CREATE INDEX sandboxes_by_pool ON sandboxes (pool_id, lifecycle, ready_at);
CREATE INDEX sandboxes_by_account ON sandboxes (account_id);
CREATE INDEX sandboxes_claimed_from ON sandboxes (claimed_from);
CREATE TABLE health (id INTEGER PRIMARY KEY, at TEXT NOT NULL);
"#,
    r#"
CREATE TABLE trust_policies (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, name TEXT NOT NULL,
    issuer TEXT NOT NULL, json JSONB NOT NULL, UNIQUE (account_id, name));
CREATE INDEX trust_policies_by_issuer ON trust_policies (issuer, id);
"#,
    r#"
CREATE TABLE pool_claims (id TEXT NOT NULL, pool_id TEXT NOT NULL, at_ms BIGINT NOT NULL, hit BOOLEAN NOT NULL,
    PRIMARY KEY (id));
CREATE INDEX pool_claims_by_pool ON pool_claims (pool_id, at_ms);
CREATE TABLE pool_warmups (sandbox_id TEXT NOT NULL, pool_id TEXT NOT NULL, at_ms BIGINT NOT NULL,
    warm_ms BIGINT NOT NULL, PRIMARY KEY (sandbox_id));
CREATE INDEX pool_warmups_by_pool ON pool_warmups (pool_id, at_ms);
"#,
];

/// The `NOTIFY` channel: payload `pool:<id>` or `*`.
const CHANNEL: &str = "warmpool";
/// Advisory lock namespaces (the first key of the two-key form): one lock per live replica, one per reconciled pool,
/// one for migrations, the leader's, and one per account while a quota is checked.
const LOCK_REPLICA: i32 = 0x5750_0001;
const LOCK_POOL: i32 = 0x5750_0002;
const LOCK_MIGRATE: i32 = 0x5750_0003;
const LOCK_LEADER: i32 = 0x5750_0004;
const LOCK_ACCOUNT: i32 = 0x5750_0005;
/// Connections serving statements, at most (each serves one statement at a time).
const CONNECTIONS: usize = 16;
/// Connections opened at start.
const WARM_CONNECTIONS: usize = 4;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An account's own sandboxes (warming or claimed, not pool inventory) and its warm pool inventory.
const COUNT_SANDBOXES: &str =
    "SELECT COUNT(*) FILTER (WHERE pool_id IS NULL AND lifecycle IN ('warming', 'claimed')),
        COUNT(*) FILTER (WHERE pool_id IS NOT NULL AND lifecycle IN ('warming', 'ready'))
     FROM sandboxes WHERE account_id = $1";

/// The held advisory locks of namespace `ns` in this database (`pg_locks` spans the whole cluster).
fn held_locks(ns: i32) -> String {
    format!(
        "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = {ns} AND objsubid = 2 AND granted
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
}

/// The second key of an id's advisory lock (non-negative, so it compares equal to `pg_locks.objid`).
const LOCK_KEY: &str = "(hashtext($1) & 2147483647)";

fn from_json<T: DeserializeOwned>(text: &str) -> StoreResult<T> {
    Ok(serde_json::from_str(text)?)
}

fn lifecycles(expected: &[Lifecycle]) -> Vec<&'static str> {
    expected.iter().map(|l| l.as_str()).collect()
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let reason = match e.code() {
            Some(code) if *code == SqlState::UNIQUE_VIOLATION => {
                let what = e.as_db_error().and_then(|d| d.constraint()).unwrap_or("row").to_string();
                return StoreError::Conflict(what);
            }
            Some(code) if *code == SqlState::DISK_FULL => "the disk is full",
            Some(code) if *code == SqlState::READ_ONLY_SQL_TRANSACTION => "the database is read-only",
            Some(code) if *code == SqlState::IO_ERROR => "an I/O error",
            Some(code)
                if [
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::TOO_MANY_CONNECTIONS,
                ]
                .contains(code) =>
            {
                "the database is not accepting connections"
            }
            Some(_) => return StoreError::Backend(Box::new(e)),
            None => "the database is unreachable",
        };
        StoreError::Unavailable { reason, source: Box::new(e) }
    }
}

/// A statement parameter with its type (statements are sent typed: one round trip, nothing prepared).
type Param<'a> = (&'a (dyn ToSql + Sync), Type);

fn text(v: &(dyn ToSql + Sync)) -> Param<'_> {
    (v, Type::TEXT)
}

/// What the session task and the store share.
struct Session {
    config: Config,
    replica: String,
    events: UnboundedSender<StoreEvent>,
    client: Mutex<Option<Arc<Client>>>,
}

pub struct PgStore {
    config: Config,
    describe: String,
    /// Connections for statements. deadpool-postgres: tokio-postgres's own pool, which keeps each connection's
    /// prepared statements, checks a connection before handing it out again and replaces broken ones.
    pool: Pool,
    session: Mutex<Option<Arc<Session>>>,
    /// The task keeping this replica's session; aborted with the store, which closes the session and so releases
    /// its locks.
    session_task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(task) = self.session_task.lock().expect("session task").take() {
            task.abort();
        }
    }
}

/// Connects one client and drives its connection on a task of its own.
async fn connect(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = &e as &dyn std::error::Error, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

fn unreachable_pool(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => e.into(),
        e => StoreError::Unavailable { reason: "the database is unreachable", source: Box::new(e) },
    }
}

impl PgStore {
    /// Connects, and brings the schema up to date (once, whichever replica gets there first).
    pub async fn open(url: &str) -> StoreResult<PgStore> {
        let mut config: Config = url.parse().map_err(|e| StoreError::Unavailable {
            reason: "the PostgreSQL URL does not parse",
            source: Box::new(e),
        })?;
        config.connect_timeout(CONNECT_TIMEOUT);
        // An operator (or a test) may name a replica's connections in the URL (`?application_name=…`).
        if config.get_application_name().is_none() {
            config.application_name("warmpool");
        }
        let describe = format!(
            "postgres://{}@{}/{}",
            config.get_user().unwrap_or(""),
            config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            config.get_dbname().unwrap_or("")
        );
        migrate(&config).await?;
        let manager = deadpool_postgres::Manager::from_config(
            config.clone(),
            NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(CONNECTIONS)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        // The pool opens connections when asked; open a few now, so the first burst of requests after a start
        // does not wait on connection setup (a replica that just started would lose every race for inventory).
        let warm = futures::future::try_join_all((0..WARM_CONNECTIONS).map(|_| pool.get())).await;
        drop(warm.map_err(unreachable_pool)?);
        Ok(PgStore { config, describe, pool, session: Mutex::new(None), session_task: Mutex::new(None) })
    }

    /// Runs a statement on a pooled connection, prepared once per connection (the SQL texts are the store's own,
    /// a few dozen).
    async fn query(&self, sql: &str, params: &[Param<'_>]) -> StoreResult<Vec<Row>> {
        let client = self.pool.get().await.map_err(unreachable_pool)?;
        let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
        let statement = client.prepare_typed_cached(sql, &types).await?;
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        Ok(client.query(&statement, &values).await?)
    }

    /// Rows changed by a statement that returns one row per change.
    async fn changed(&self, sql: &str, params: &[Param<'_>]) -> StoreResult<usize> {
        Ok(self.query(sql, params).await?.len())
    }

    async fn one<T: DeserializeOwned>(&self, sql: &str, params: &[Param<'_>]) -> StoreResult<Option<T>> {
        match self.query(sql, params).await?.first() {
            Some(row) => Ok(Some(from_json(row.get::<_, &str>(0))?)),
            None => Ok(None),
        }
    }

    async fn many<T: DeserializeOwned>(&self, sql: &str, params: &[Param<'_>]) -> StoreResult<Vec<T>> {
        self.query(sql, params).await?.iter().map(|row| from_json(row.get::<_, &str>(0))).collect()
    }

    fn session_client(&self) -> StoreResult<Arc<Client>> {
        let session = self.session.lock().expect("session").clone();
        session.and_then(|s| s.client.lock().expect("session client").clone()).ok_or(
            StoreError::Unavailable {
                reason: "this replica's database session is reconnecting",
                source: "no session".into(),
            },
        )
    }

    /// Runs `sql`; with a quota, in a transaction that first takes the account's quota lock and counts the
    /// sandboxes it owns: [`StoreError::OverQuota`] at `max`, and nothing written. Claims and creates of one account
    /// queue on the lock on every replica, so no two pass the quota together (each statement's snapshot is taken
    /// after the lock).
    async fn query_within_quota(
        &self,
        account_id: &str,
        max: Option<u64>,
        sql: &str,
        params: &[Param<'_>],
    ) -> StoreResult<Vec<Row>> {
        let Some(max) = max else { return self.query(sql, params).await };
        let mut client = self.pool.get().await.map_err(unreachable_pool)?;
        // tokio-postgres's own transaction (deadpool's wraps it with a statement cache it shares).
        let client: &mut tokio_postgres::Client = &mut client;
        let tx = client.transaction().await?;
        // Statements sent together are pipelined: one round trip for the lock and the count (which waits for the
        // lock on the server), one for the write and the commit, so the lock is held for about one round trip.
        let lock = format!("SELECT pg_advisory_xact_lock({LOCK_ACCOUNT}, {LOCK_KEY})");
        let account = [text(&account_id)];
        let (_, counted) =
            futures::try_join!(tx.query_typed(&lock, &account), tx.query_typed(COUNT_SANDBOXES, &account))?;
        let owned = counted.first().map_or(0, |r| r.get::<_, i64>(0)) as u64;
        if owned >= max {
            return Err(StoreError::OverQuota { owned, max });
        }
        let (rows, ()) = futures::try_join!(tx.query_typed(sql, params), tx.batch_execute("COMMIT"))?;
        // Committed on the server already: the transaction's rollback on drop would only draw a warning.
        std::mem::forget(tx);
        Ok(rows)
    }

    /// Inserts a sandbox, within its account's quota when `max_owned` is given.
    async fn insert_sandbox_within(&self, row: &SandboxRow, max_owned: Option<u64>) -> StoreResult<()> {
        let SandboxColumns { json, pool_id, lifecycle, state, ready_at } = SandboxColumns::of(row)?;
        let (id, account, build_id, claimed_from) = (
            row.sandbox.id.as_str(),
            row.account_id.as_str(),
            row.sandbox.build_id.as_str(),
            row.claimed_from.as_deref(),
        );
        let sql = "INSERT INTO sandboxes (id, account_id, pool_id, lifecycle, claimed_from, build_id, state, ready_at, json)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)";
        let params = [
            text(&id),
            text(&account),
            text(&pool_id),
            text(&lifecycle),
            text(&claimed_from),
            text(&build_id),
            text(&state),
            text(&ready_at),
            text(&json),
        ];
        self.query_within_quota(&row.account_id, max_owned, sql, &params).await?;
        Ok(())
    }

    /// A statement on this replica's session (where its advisory locks live) that answers one boolean.
    async fn session_bool(&self, sql: &str, params: &[Param<'_>]) -> StoreResult<bool> {
        let client = self.session_client()?;
        let rows = client.query_typed(sql, params).await?;
        Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
    }
}

/// A database as the first released version made it (what the upgrade test starts from).
#[cfg(test)]
pub async fn create_first_version(url: &str) {
    let client = connect(&url.parse().unwrap()).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL);
             INSERT INTO schema_migrations VALUES (1, 'then');",
        )
        .await
        .unwrap();
    client.batch_execute(MIGRATIONS[0]).await.unwrap();
}

impl PgStore {
    /// The live schema, to compare with the description.
    pub async fn shape(&self) -> StoreResult<Shape> {
        let mut shape = Shape::default();
        let columns = self
            .query(
                "SELECT table_name::text, column_name::text, data_type::text, is_nullable = 'YES'
                 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name <> 'schema_migrations'",
                &[],
            )
            .await?;
        for row in &columns {
            let (table, column): (String, String) = (row.get(0), row.get(1));
            let kind = Shape::kind_of(&table, &column, row.get(2));
            let t: &mut TableShape = shape.0.entry(table).or_default();
            t.columns.insert(column, (kind, row.get(3)));
        }
        let indexes = self
            .query(
                "SELECT t.relname::text, i.relname::text, ix.indisprimary, ix.indisunique,
                        array_agg(a.attname::text ORDER BY k.n)
                 FROM pg_index ix
                 JOIN pg_class t ON t.oid = ix.indrelid
                 JOIN pg_class i ON i.oid = ix.indexrelid
                 JOIN pg_namespace ns ON ns.oid = t.relnamespace
                 CROSS JOIN LATERAL unnest(ix.indkey) WITH ORDINALITY AS k(attnum, n)
                 JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
                 WHERE ns.nspname = current_schema() AND t.relname <> 'schema_migrations'
                 GROUP BY 1, 2, 3, 4",
                &[],
            )
            .await?;
        for row in &indexes {
            let table: String = row.get(0);
            let columns: Vec<String> = row.get(4);
            let t = shape.0.entry(table).or_default();
            match (row.get::<_, bool>(2), row.get::<_, bool>(3)) {
                (true, _) => t.primary_key = columns,
                (false, true) => {
                    t.unique.insert(columns);
                }
                (false, false) => {
                    t.indexes.insert(row.get(1), columns);
                }
            }
        }
        Ok(shape)
    }
}

async fn migrate(config: &Config) -> StoreResult<()> {
    let mut client = connect(config).await?;
    let tx = client.transaction().await?;
    tx.execute(&format!("SELECT pg_advisory_xact_lock({LOCK_MIGRATE}, 0)"), &[]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)",
    )
    .await?;
    let applied: i64 = tx.query_one("SELECT COUNT(*) FROM schema_migrations", &[]).await?.get(0);
    if applied == 0 {
        tx.batch_execute(&schema::create(Dialect::Postgres)).await?;
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        if applied > 0 {
            tx.batch_execute(sql).await?;
        }
        let version = i as i32 + 1;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
            &[&version, &ts(&Utc::now())],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps this replica's session: connects, `LISTEN`s, takes the replica's lock, forwards notifications, and when the
/// connection ends says so ([`StoreEvent::LocksLost`]) and connects again. The first attempt's outcome goes to
/// `first`.
async fn keep_session(
    session: Arc<Session>,
    mut first: Option<tokio::sync::oneshot::Sender<Result<(), tokio_postgres::Error>>>,
) {
    loop {
        let attempt = async {
            let (client, mut connection) = session.config.connect(NoTls).await?;
            let events = session.events.clone();
            let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
            let pump = tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(|cx| connection.poll_message(cx));
                while let Some(Ok(message)) = messages.next().await {
                    if let AsyncMessage::Notification(n) = message {
                        // A change of a sandbox outside any pool notifies an empty payload: nobody's business.
                        let event = match n.payload() {
                            "*" => StoreEvent::All,
                            payload => match payload.strip_prefix("pool:") {
                                Some(pool) => StoreEvent::Pool(pool.to_string()),
                                None => continue,
                            },
                        };
                        let _ = events.send(event);
                    }
                }
                let _ = ended_tx.send(());
            });
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
            client
                .query_typed(
                    &format!("SELECT pg_advisory_lock({LOCK_REPLICA}, {LOCK_KEY})"),
                    &[text(&session.replica)],
                )
                .await?;
            // The session ends with this task, even when the task is aborted.
            Ok::<_, tokio_postgres::Error>((Arc::new(client), ended, AbortOnDrop(pump)))
        };
        match attempt.await {
            Ok((client, ended, _pump)) => {
                *session.client.lock().expect("session client") = Some(client);
                match first.take() {
                    Some(first) => {
                        let _ = first.send(Ok(()));
                    }
                    // Reconnected: something may have changed unheard.
                    None => {
                        let _ = session.events.send(StoreEvent::All);
                    }
                }
                let _ = ended.await;
                *session.client.lock().expect("session client") = None;
                tracing::warn!(
                    "Lost the database session; this replica's pools go to others until it reconnects"
                );
                let _ = session.events.send(StoreEvent::LocksLost);
            }
            Err(e) => {
                if let Some(first) = first.take() {
                    let _ = first.send(Err(e));
                    return;
                }
                tracing::warn!(error = &e as &dyn std::error::Error, "Cannot reconnect the database session");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn check_writable(&self) -> StoreResult<()> {
        let at = ts(&Utc::now());
        self.query(
            "INSERT INTO health (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            &[text(&at)],
        )
        .await?;
        Ok(())
    }

    async fn insert_account(&self, a: &Account) -> StoreResult<()> {
        let json = serde_json::to_string(a)?;
        self.query(
            "INSERT INTO accounts (id, name, json) VALUES ($1, $2, $3::jsonb)",
            &[text(&a.id.as_str()), text(&a.name), text(&json)],
        )
        .await?;
        Ok(())
    }
    async fn get_account(&self, id: &str) -> StoreResult<Option<Account>> {
        self.one("SELECT json::text FROM accounts WHERE id = $1", &[text(&id)]).await
    }
    async fn list_accounts(&self, page: &Page) -> StoreResult<Vec<Account>> {
        let (after, limit) = (page.after(), i64::from(page.limit));
        self.many(
            "SELECT json::text FROM accounts WHERE id > $1 ORDER BY id LIMIT $2",
            &[text(&after), (&limit, Type::INT8)],
        )
        .await
    }
    async fn update_account(&self, a: &Account) -> StoreResult<()> {
        let json = serde_json::to_string(a)?;
        self.query(
            "UPDATE accounts SET name = $2, json = $3::jsonb WHERE id = $1",
            &[text(&a.id.as_str()), text(&a.name), text(&json)],
        )
        .await?;
        Ok(())
    }

    async fn insert_token(&self, t: &TokenRow) -> StoreResult<()> {
        let json = serde_json::to_string(t)?;
        self.query(
            "INSERT INTO tokens (id, hash, admin, json) VALUES ($1, $2, $3, $4::jsonb)",
            &[text(&t.id.as_str()), text(&t.hash), (&t.admin, Type::BOOL), text(&json)],
        )
        .await?;
        Ok(())
    }
    async fn credential(&self, hash: &str, default_account: &str) -> StoreResult<Option<Credential>> {
        self.one(
            "SELECT json_build_object('token', t.json, 'account', a.json)::text FROM tokens t
             LEFT JOIN accounts a ON a.id = COALESCE(t.json->>'account_id', $2)
             WHERE t.hash = $1",
            &[text(&hash), text(&default_account)],
        )
        .await
    }
    async fn has_admin_token(&self) -> StoreResult<bool> {
        Ok(!self.query("SELECT 1 FROM tokens WHERE admin LIMIT 1", &[]).await?.is_empty())
    }
    async fn delete_token(&self, id: &str) -> StoreResult<bool> {
        Ok(self.changed("DELETE FROM tokens WHERE id = $1 RETURNING 1", &[text(&id)]).await? > 0)
    }

    async fn insert_trust_policy(&self, p: &TrustPolicy) -> StoreResult<()> {
        let json = serde_json::to_string(p)?;
        self.query(
            "INSERT INTO trust_policies (id, account_id, name, issuer, json) VALUES ($1, $2, $3, $4, $5::jsonb)",
            &[text(&p.id.as_str()), text(&p.account_id.as_str()), text(&p.name), text(&p.issuer), text(&json)],
        ).await
        .map_err(conflict_as(format!("trust policy {:?}", p.name)))?;
        Ok(())
    }
    async fn get_trust_policy(&self, account_id: &str, id: &str) -> StoreResult<Option<TrustPolicy>> {
        self.one(
            "SELECT json::text FROM trust_policies WHERE account_id = $1 AND id = $2",
            &[text(&account_id), text(&id)],
        )
        .await
    }
    async fn list_trust_policies(&self, account_id: &str, page: &Page) -> StoreResult<Vec<TrustPolicy>> {
        let (after, limit) = (page.after(), i64::from(page.limit));
        self.many(
            "SELECT json::text FROM trust_policies WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[text(&account_id), text(&after), (&limit, Type::INT8)],
        )
        .await
    }
    async fn trust_policies_for_issuer(&self, issuer: &str) -> StoreResult<Vec<TrustPolicy>> {
        self.many("SELECT json::text FROM trust_policies WHERE issuer = $1 ORDER BY id", &[text(&issuer)])
            .await
    }
    async fn delete_trust_policy(&self, account_id: &str, id: &str) -> StoreResult<bool> {
        Ok(self
            .changed(
                "DELETE FROM trust_policies WHERE account_id = $1 AND id = $2 RETURNING 1",
                &[text(&account_id), text(&id)],
            )
            .await?
            > 0)
    }

    async fn insert_template(&self, row: &TemplateRow) -> StoreResult<()> {
        let t = &row.template;
        let json = serde_json::to_string(row)?;
        self.query(
            "INSERT INTO templates (id, account_id, name, json) VALUES ($1, $2, $3, $4::jsonb)",
            &[text(&t.id.as_str()), text(&row.account_id.as_str()), text(&t.name), text(&json)],
        )
        .await
        .map_err(conflict_as(format!("template {:?}", t.name)))?;
        Ok(())
    }
    async fn get_template(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<TemplateRow>> {
        self.one(
            "SELECT json::text FROM templates WHERE account_id = $1 AND (id = $2 OR name = $2)",
            &[text(&account_id), text(&id_or_name)],
        )
        .await
    }
    async fn list_templates(&self, account_id: &str, page: &Page) -> StoreResult<Vec<TemplateRow>> {
        let (after, limit) = (page.after(), i64::from(page.limit));
        self.many(
            "SELECT json::text FROM templates WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[text(&account_id), text(&after), (&limit, Type::INT8)],
        )
        .await
    }
    async fn update_template(&self, row: &TemplateRow) -> StoreResult<()> {
        let t = &row.template;
        let json = serde_json::to_string(row)?;
        self.query(
            "UPDATE templates SET name = $2, json = $3::jsonb WHERE id = $1",
            &[text(&t.id.as_str()), text(&t.name), text(&json)],
        )
        .await
        .map_err(conflict_as(format!("template {:?}", t.name)))?;
        Ok(())
    }
    async fn delete_template(&self, id: &str) -> StoreResult<()> {
        self.query(
            "WITH t AS (DELETE FROM tags WHERE template_id = $1), b AS (DELETE FROM builds WHERE template_id = $1),
                  n AS (SELECT pg_notify('warmpool', '*'))
             DELETE FROM templates WHERE id = $1 AND EXISTS (SELECT 1 FROM n)",
            &[text(&id)],
        ).await?;
        Ok(())
    }

    async fn insert_build(&self, row: &BuildRow) -> StoreResult<()> {
        let b = &row.build;
        let (created, json) = (ts(&b.created_at), serde_json::to_string(row)?);
        self.query(
            "INSERT INTO builds (id, template_id, status, created_at, json) VALUES ($1, $2, $3, $4, $5::jsonb)",
            &[text(&b.id.as_str()), text(&b.template_id.as_str()), text(&b.status.as_str()), text(&created), text(&json)],
        ).await?;
        Ok(())
    }
    async fn get_build(&self, id: &str) -> StoreResult<Option<BuildRow>> {
        self.one("SELECT json::text FROM builds WHERE id = $1", &[text(&id)]).await
    }
    async fn list_builds(&self, template_id: &str) -> StoreResult<Vec<BuildRow>> {
        self.many(
            "SELECT json::text FROM builds WHERE template_id = $1 ORDER BY created_at",
            &[text(&template_id)],
        )
        .await
    }
    async fn page_builds(&self, template_id: &str, page: &Page) -> StoreResult<Vec<BuildRow>> {
        let (after, limit) = (page.after(), i64::from(page.limit));
        self.many(
            "SELECT json::text FROM builds WHERE template_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[text(&template_id), text(&after), (&limit, Type::INT8)],
        )
        .await
    }
    async fn list_builds_in(&self, statuses: &[&'static str]) -> StoreResult<Vec<BuildRow>> {
        self.many(
            "SELECT json::text FROM builds WHERE status = ANY($1) ORDER BY created_at",
            &[(&statuses, Type::TEXT_ARRAY)],
        )
        .await
    }
    async fn update_build(&self, row: &BuildRow) -> StoreResult<()> {
        let b = &row.build;
        let json = serde_json::to_string(row)?;
        // A build that finished changes what pools can start: every replica hears it.
        self.query(
            "WITH u AS (UPDATE builds SET status = $2, json = $3::jsonb WHERE id = $1 RETURNING status)
             SELECT pg_notify('warmpool', '*') FROM u WHERE status IN ('ready', 'failed')",
            &[text(&b.id.as_str()), text(&b.status.as_str()), text(&json)],
        )
        .await?;
        Ok(())
    }
    async fn latest_ready_build(&self, template_id: &str) -> StoreResult<Option<BuildRow>> {
        self.one(
            "SELECT json::text FROM builds WHERE template_id = $1 AND status = 'ready'
             ORDER BY created_at DESC LIMIT 1",
            &[text(&template_id)],
        )
        .await
    }

    async fn put_tag(
        &self,
        template_id: &str,
        tag: &str,
        build_id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let at = ts(&at);
        self.query(
            "WITH u AS (INSERT INTO tags (template_id, name, build_id, updated_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (template_id, name) DO UPDATE SET build_id = excluded.build_id,
                 updated_at = excluded.updated_at RETURNING 1)
             SELECT pg_notify('warmpool', '*') FROM u",
            &[text(&template_id), text(&tag), text(&build_id), text(&at)],
        )
        .await?;
        Ok(())
    }
    async fn get_tag(&self, template_id: &str, tag: &str) -> StoreResult<Option<Tag>> {
        Ok(self.list_tags(template_id).await?.into_iter().find(|t| t.name == tag))
    }
    async fn list_tags(&self, template_id: &str) -> StoreResult<Vec<Tag>> {
        self.query(
            "SELECT name, build_id, updated_at FROM tags WHERE template_id = $1 ORDER BY name",
            &[text(&template_id)],
        )
        .await?
        .iter()
        .map(|r| {
            let updated_at = DateTime::parse_from_rfc3339(r.get::<_, &str>(2))
                .map_err(|e| StoreError::Corrupt { what: "tag timestamp", source: Box::new(e) })?
                .with_timezone(&Utc);
            Ok(Tag {
                name: r.get(0),
                template_id: stored_id("tag template id", template_id)?,
                build_id: stored_id("tag build id", r.get::<_, String>(1))?,
                updated_at,
            })
        })
        .collect()
    }
    async fn delete_tag(&self, template_id: &str, tag: &str) -> StoreResult<bool> {
        Ok(self
            .changed(
                "WITH d AS (DELETE FROM tags WHERE template_id = $1 AND name = $2 RETURNING 1)
             SELECT pg_notify('warmpool', '*') FROM d",
                &[text(&template_id), text(&tag)],
            )
            .await?
            > 0)
    }

    async fn insert_pool(&self, row: &PoolRow) -> StoreResult<()> {
        let p = &row.pool;
        let json = serde_json::to_string(row)?;
        self.query(
            "WITH i AS (INSERT INTO pools (id, account_id, name, rev, json) VALUES ($1, $2, $3, $4, $5::jsonb)
                 RETURNING id)
             SELECT pg_notify('warmpool', 'pool:' || id) FROM i",
            &[text(&p.id.as_str()), text(&row.account_id.as_str()), text(&p.name), (&(row.rev as i64), Type::INT8), text(&json)],
        ).await
        .map_err(conflict_as(format!("warm pool {:?}", p.name)))?;
        Ok(())
    }
    async fn get_pool(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<PoolRow>> {
        self.one(
            "SELECT json::text FROM pools WHERE account_id = $1 AND (id = $2 OR name = $2)",
            &[text(&account_id), text(&id_or_name)],
        )
        .await
    }
    async fn get_pool_by_id(&self, id: &str) -> StoreResult<Option<PoolRow>> {
        self.one("SELECT json::text FROM pools WHERE id = $1", &[text(&id)]).await
    }
    async fn list_pools(&self, account_id: Option<&str>) -> StoreResult<Vec<PoolRow>> {
        match account_id {
            Some(a) => {
                self.many("SELECT json::text FROM pools WHERE account_id = $1 ORDER BY name", &[text(&a)])
                    .await
            }
            None => self.many("SELECT json::text FROM pools ORDER BY id", &[]).await,
        }
    }
    async fn page_pools(&self, account_id: &str, page: &Page) -> StoreResult<Vec<PoolRow>> {
        let (after, limit) = (page.after(), i64::from(page.limit));
        self.many(
            "SELECT json::text FROM pools WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            &[text(&account_id), text(&after), (&limit, Type::INT8)],
        )
        .await
    }
    async fn update_pool(&self, row: &PoolRow) -> StoreResult<bool> {
        let p = &row.pool;
        let next = PoolRow { rev: row.rev + 1, ..row.clone() };
        let json = serde_json::to_string(&next)?;
        let changed = self
            .changed(
                "WITH u AS (UPDATE pools SET name = $2, rev = $4 + 1, json = $3::jsonb WHERE id = $1 AND rev = $4
                     RETURNING id)
                 SELECT pg_notify('warmpool', 'pool:' || id) FROM u",
                &[text(&p.id.as_str()), text(&p.name), text(&json), (&(row.rev as i64), Type::INT8)],
            ).await
            .map_err(conflict_as(format!("warm pool {:?}", p.name)))?;
        Ok(changed == 1)
    }
    async fn list_pool_ids(&self) -> StoreResult<Vec<String>> {
        Ok(self.query("SELECT id FROM pools ORDER BY id", &[]).await?.iter().map(|r| r.get(0)).collect())
    }
    async fn delete_pool(&self, id: &str) -> StoreResult<()> {
        self.query(
            "WITH l AS (DELETE FROM leases WHERE pool_id = $1), c AS (DELETE FROM pool_claims WHERE pool_id = $1),
                  w AS (DELETE FROM pool_warmups WHERE pool_id = $1), d AS (DELETE FROM pools WHERE id = $1 RETURNING id)
             SELECT pg_notify('warmpool', 'pool:' || id) FROM d",
            &[text(&id)],
        ).await?;
        Ok(())
    }

    async fn put_lease(&self, row: &LeaseRow) -> StoreResult<()> {
        let json = serde_json::to_string(row)?;
        self.query(
            "WITH u AS (INSERT INTO leases (pool_id, key, json) VALUES ($1, $2, $3::jsonb)
                 ON CONFLICT (pool_id, key) DO UPDATE SET json = excluded.json RETURNING pool_id)
             SELECT pg_notify('warmpool', 'pool:' || pool_id) FROM u",
            &[text(&row.lease.pool_id.as_str()), text(&row.lease.key), text(&json)],
        )
        .await?;
        Ok(())
    }
    async fn delete_lease(&self, pool_id: &str, key: &str) -> StoreResult<bool> {
        Ok(self
            .changed(
                "WITH d AS (DELETE FROM leases WHERE pool_id = $1 AND key = $2 RETURNING pool_id)
             SELECT pg_notify('warmpool', 'pool:' || pool_id) FROM d",
                &[text(&pool_id), text(&key)],
            )
            .await?
            > 0)
    }
    async fn list_leases(&self, pool_id: &str) -> StoreResult<Vec<LeaseRow>> {
        self.many("SELECT json::text FROM leases WHERE pool_id = $1 ORDER BY key", &[text(&pool_id)]).await
    }

    async fn record_claims(&self, claims: &[ClaimEvent]) -> StoreResult<()> {
        if claims.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = claims.iter().map(|c| c.id.as_str()).collect();
        let pools: Vec<&str> = claims.iter().map(|c| c.pool_id.as_str()).collect();
        let ats: Vec<i64> = claims.iter().map(|c| c.at.timestamp_millis()).collect();
        let hits: Vec<bool> = claims.iter().map(|c| c.hit).collect();
        // The pools' reconcilers (maybe on other replicas) hear of the new demand.
        self.query(
            "WITH i AS (INSERT INTO pool_claims (id, pool_id, at_ms, hit)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::bool[]))
             SELECT pg_notify('warmpool', 'pool:' || p) FROM (SELECT DISTINCT unnest($2::text[]) AS p) AS n",
            &[
                (&ids, Type::TEXT_ARRAY),
                (&pools, Type::TEXT_ARRAY),
                (&ats, Type::INT8_ARRAY),
                (&hits, Type::BOOL_ARRAY),
            ],
        )
        .await?;
        Ok(())
    }
    async fn record_warmup(
        &self,
        pool_id: &str,
        sandbox_id: &str,
        at: DateTime<Utc>,
        seconds: f64,
    ) -> StoreResult<()> {
        let (at, warm_ms) = (at.timestamp_millis(), (seconds * 1000.0).round() as i64);
        self.query(
            "INSERT INTO pool_warmups (sandbox_id, pool_id, at_ms, warm_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (sandbox_id) DO NOTHING",
            &[text(&sandbox_id), text(&pool_id), (&at, Type::INT8), (&warm_ms, Type::INT8)],
        )
        .await?;
        Ok(())
    }
    async fn demand_sample(
        &self,
        pool_id: &str,
        since: DateTime<Utc>,
        recent: DateTime<Utc>,
        warmups: u32,
    ) -> StoreResult<DemandSample> {
        let (since, recent, limit) = (since.timestamp_millis(), recent.timestamp_millis(), warmups as i64);
        let rows = self
            .query(
                "SELECT COUNT(*) FILTER (WHERE at_ms >= $2), COUNT(*) FILTER (WHERE at_ms >= $2 AND hit),
                    COUNT(*) FILTER (WHERE at_ms >= $3), MAX(at_ms), MIN(at_ms) FILTER (WHERE at_ms >= $3),
                    ARRAY(SELECT warm_ms / 1000.0::float8 FROM pool_warmups WHERE pool_id = $1 ORDER BY at_ms DESC LIMIT $4)
             FROM pool_claims WHERE pool_id = $1",
                &[text(&pool_id), (&since, Type::INT8), (&recent, Type::INT8), (&limit, Type::INT8)],
            )
            .await?;
        let row = rows.first().ok_or_else(|| StoreError::Backend("an aggregate returned no row".into()))?;
        Ok(DemandSample {
            claims: row.get::<_, i64>(0) as u64,
            hits: row.get::<_, i64>(1) as u64,
            recent_claims: row.get::<_, i64>(2) as u64,
            last_claim_at: row.get::<_, Option<i64>>(3).and_then(DateTime::from_timestamp_millis),
            recent_first_at: row.get::<_, Option<i64>>(4).and_then(DateTime::from_timestamp_millis),
            warm_seconds: row.get(5),
        })
    }
    async fn prune_demand(&self, pool_id: &str, before: DateTime<Utc>, keep_warmups: u32) -> StoreResult<()> {
        let offset = keep_warmups.saturating_sub(1) as i64;
        self.query(
            "WITH c AS (DELETE FROM pool_claims WHERE pool_id = $1 AND at_ms < $2)
             DELETE FROM pool_warmups WHERE pool_id = $1 AND at_ms < (SELECT at_ms FROM pool_warmups
                 WHERE pool_id = $1 ORDER BY at_ms DESC LIMIT 1 OFFSET $3)",
            &[text(&pool_id), (&before.timestamp_millis(), Type::INT8), (&offset, Type::INT8)],
        )
        .await?;
        Ok(())
    }

    async fn insert_sandbox(&self, row: &SandboxRow) -> StoreResult<()> {
        self.insert_sandbox_within(row, None).await
    }
    async fn insert_owned_sandbox(&self, row: &SandboxRow, max_owned: u64) -> StoreResult<()> {
        self.insert_sandbox_within(row, Some(max_owned)).await
    }
    async fn get_sandbox(&self, id: &str) -> StoreResult<Option<SandboxRow>> {
        self.one("SELECT json::text FROM sandboxes WHERE id = $1", &[text(&id)]).await
    }
    async fn list_sandboxes(&self, account_id: &str, page: &Page) -> StoreResult<Vec<SandboxRow>> {
        let (after, limit) = (page.after(), i64::from(page.limit));
        self.many(
            "SELECT json::text FROM sandboxes WHERE account_id = $1 AND pool_id IS NULL AND id > $2 ORDER BY id \
             LIMIT $3",
            &[text(&account_id), text(&after), (&limit, Type::INT8)],
        ).await
    }
    async fn list_all_sandboxes(&self) -> StoreResult<Vec<SandboxRow>> {
        self.many("SELECT json::text FROM sandboxes ORDER BY id", &[]).await
    }
    async fn list_pool_sandboxes(&self, pool_id: &str) -> StoreResult<Vec<SandboxRow>> {
        self.many(
            "SELECT json::text FROM sandboxes WHERE pool_id = $1 OR claimed_from = $1 ORDER BY id",
            &[text(&pool_id)],
        )
        .await
    }
    async fn update_sandbox_if(&self, row: &SandboxRow, expected: &[Lifecycle]) -> StoreResult<bool> {
        let SandboxColumns { json, pool_id, lifecycle, state, ready_at } = SandboxColumns::of(row)?;
        let expected = lifecycles(expected);
        // The pool hears it: a sandbox that became ready wakes waiting checkouts; one that went, its reconciler.
        let changed = self.changed(
            "WITH u AS (UPDATE sandboxes SET account_id = $2, pool_id = $3, lifecycle = $4, claimed_from = $5,
                 state = $6, ready_at = $7, json = $8::jsonb WHERE id = $1 AND lifecycle = ANY($9)
                 RETURNING COALESCE(pool_id, claimed_from) AS pool)
             SELECT pg_notify('warmpool', 'pool:' || pool) FROM u",
            &[
                text(&row.sandbox.id.as_str()),
                text(&row.account_id.as_str()),
                text(&pool_id),
                text(&lifecycle),
                text(&row.claimed_from.as_deref()),
                text(&state),
                text(&ready_at),
                text(&json),
                (&expected, Type::TEXT_ARRAY),
            ],
        ).await?;
        Ok(changed == 1)
    }
    async fn delete_sandbox_if(&self, id: &str, expected: &[Lifecycle]) -> StoreResult<bool> {
        let expected = lifecycles(expected);
        let changed = self
            .changed(
                "WITH d AS (DELETE FROM sandboxes WHERE id = $1 AND lifecycle = ANY($2)
                 RETURNING COALESCE(pool_id, claimed_from) AS pool)
             SELECT pg_notify('warmpool', 'pool:' || pool) FROM d",
                &[text(&id), (&expected, Type::TEXT_ARRAY)],
            )
            .await?;
        Ok(changed == 1)
    }
    async fn count_live_sandboxes(&self) -> StoreResult<u64> {
        let rows = self.query(
            "SELECT COUNT(*) FROM sandboxes WHERE lifecycle IN ('warming', 'ready', 'claimed', 'draining')",
            &[],
        ).await?;
        Ok(rows[0].get::<_, i64>(0) as u64)
    }
    async fn count_sandboxes(&self, account_id: &str) -> StoreResult<(u64, u64)> {
        let rows = self.query(COUNT_SANDBOXES, &[text(&account_id)]).await?;
        Ok((rows[0].get::<_, i64>(0) as u64, rows[0].get::<_, i64>(1) as u64))
    }

    async fn claim_ready(
        &self,
        pool_id: &str,
        prefer_build: Option<&str>,
        claim: &ClaimUpdate,
    ) -> StoreResult<Option<SandboxRow>> {
        let (row_patch, sandbox_patch) = claim.patches(pool_id);
        let (row_patch, sandbox_patch) = (row_patch.to_string(), sandbox_patch.to_string());
        let prefer = prefer_build.unwrap_or("");
        // One statement: the candidate is locked as it is picked, and a candidate another claim (or a stop) has
        // locked is skipped, not waited for.
        let sql = "WITH c AS (UPDATE sandboxes s SET account_id = $2, pool_id = NULL, lifecycle = 'claimed',
                     claimed_from = $1,
                     json = (s.json || $3::jsonb) || jsonb_build_object('sandbox', (s.json -> 'sandbox') || $4::jsonb)
                 WHERE s.id = (SELECT id FROM sandboxes WHERE pool_id = $1 AND lifecycle = 'ready'
                               ORDER BY (build_id = $5) DESC, ready_at LIMIT 1 FOR UPDATE SKIP LOCKED)
                   AND s.lifecycle = 'ready'
                 RETURNING s.json)
             SELECT json::text, pg_notify('warmpool', 'pool:' || $1) FROM c";
        let account = claim.account_id.as_str();
        let params = [text(&pool_id), text(&account), text(&row_patch), text(&sandbox_patch), text(&prefer)];
        let rows = self.query_within_quota(&claim.account_id, claim.max_owned, sql, &params).await?;
        rows.first().map(|r| from_json(r.get::<_, &str>(0))).transpose()
    }

    async fn join(&self, replica: &str, events: UnboundedSender<StoreEvent>) -> StoreResult<()> {
        let session = Arc::new(Session {
            config: self.config.clone(),
            replica: replica.to_string(),
            events,
            client: Mutex::new(None),
        });
        let (first, joined) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(keep_session(session.clone(), Some(first)));
        *self.session_task.lock().expect("session task") = Some(task.abort_handle());
        joined.await.map_err(|e| StoreError::Backend(Box::new(e)))??;
        *self.session.lock().expect("session") = Some(session);
        Ok(())
    }

    async fn replica_alive(&self, replica: &str) -> StoreResult<bool> {
        let rows = self
            .query(
                &format!("SELECT EXISTS ({} AND objid = {LOCK_KEY}::oid)", held_locks(LOCK_REPLICA)),
                &[text(&replica)],
            )
            .await?;
        Ok(rows[0].get(0))
    }

    async fn lock_pool(&self, pool_id: &str) -> StoreResult<bool> {
        self.session_bool(&format!("SELECT pg_try_advisory_lock({LOCK_POOL}, {LOCK_KEY})"), &[text(&pool_id)])
            .await
    }

    async fn unlock_pool(&self, pool_id: &str) -> StoreResult<()> {
        self.session_bool(&format!("SELECT pg_advisory_unlock({LOCK_POOL}, {LOCK_KEY})"), &[text(&pool_id)])
            .await?;
        Ok(())
    }

    async fn lock_leader(&self) -> StoreResult<bool> {
        self.session_bool(&format!("SELECT pg_try_advisory_lock({LOCK_LEADER}, 0)"), &[]).await
    }

    async fn cluster(&self) -> StoreResult<Option<Cluster>> {
        let rows = self.query(
            &format!(
                "SELECT (SELECT COUNT(*) FROM ({}) r), (SELECT COUNT(*) FROM pools), (SELECT COUNT(*) FROM ({}) p)",
                held_locks(LOCK_REPLICA),
                held_locks(LOCK_POOL)
            ),
            &[],
        ).await?;
        let count = |i| rows[0].get::<_, i64>(i) as u64;
        Ok(Some(Cluster { replicas: count(0), pools: count(1), locked_pools: count(2) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::contract::{sandbox, Backend, Postgres};

    async fn joined(
        db: &Postgres,
        replica: &str,
    ) -> (Arc<dyn Store>, tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) {
        let store = db.open().await;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        store.join(replica, tx).await.unwrap();
        (store, rx)
    }

    async fn next_event(rx: &mut tokio::sync::mpsc::UnboundedReceiver<StoreEvent>) -> StoreEvent {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("no event within 10 s").unwrap()
    }

    /// A sandbox becoming ready on one replica wakes the other (its waiting checkouts and its reconciler); a moved
    /// tag reaches every pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_reach_other_replicas() {
        let db = Postgres::start();
        let (a, _a_events) = joined(&db, "rep_a").await;
        let (_b, mut b_events) = joined(&db, "rep_b").await;
        let mut row = sandbox("sbx_1", "twp_1");
        row.lifecycle = Lifecycle::Warming;
        a.insert_sandbox(&row).await.unwrap();
        row.lifecycle = Lifecycle::Ready;
        assert!(a.update_sandbox_if(&row, &[Lifecycle::Warming]).await.unwrap());
        assert_eq!(next_event(&mut b_events).await, StoreEvent::Pool("twp_1".into()));
        a.put_tag("tpl_1", "stable", "bld_1", Utc::now()).await.unwrap();
        assert_eq!(next_event(&mut b_events).await, StoreEvent::All);
    }

    /// A pool is reconciled by one replica at a time; when that replica's process goes, its locks go with its
    /// session and another replica takes the pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pool_has_one_replica_and_a_dead_replica_lets_go() {
        let db = Postgres::start();
        let (a, _a_events) = joined(&db, "rep_a").await;
        let (b, _b_events) = joined(&db, "rep_b").await;
        a.insert_pool(&crate::store::contract::pool("twp_1", "api")).await.unwrap();
        assert!(a.lock_pool("twp_1").await.unwrap());
        assert!(!b.lock_pool("twp_1").await.unwrap());
        assert!(a.lock_leader().await.unwrap());
        assert!(!b.lock_leader().await.unwrap());
        assert!(b.replica_alive("rep_a").await.unwrap());
        assert!(!b.replica_alive("rep_gone").await.unwrap());
        assert_eq!(b.cluster().await.unwrap(), Some(Cluster { replicas: 2, pools: 1, locked_pools: 1 }));
        drop(a);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !b.lock_pool("twp_1").await.unwrap() {
            assert!(std::time::Instant::now() < deadline, "the pool was never released");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(b.lock_leader().await.unwrap());
        assert!(!b.replica_alive("rep_a").await.unwrap());
        assert_eq!(b.cluster().await.unwrap(), Some(Cluster { replicas: 1, pools: 1, locked_pools: 1 }));
    }
}
