//! The embedded store: one SQLite file in the data dir, WAL mode, schema migrations on open. A `kill -9` of the
//! server loses no committed write (WAL with `synchronous=NORMAL` is durable across process crashes).
//!
//! SQLite blocks, so it never runs on the server's async threads: one writer thread owns the only connection that
//! writes (SQLite serialises writers anyway), and a few reader threads own read-only connections, which WAL lets
//! read while a write is in progress. A caller sends its statement to one of them and awaits the answer, so a
//! slow write (or another process holding the write lock) delays writes, never reads, and never a request that
//! does not touch the store.

use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Params};
use serde::de::DeserializeOwned;
use warmpool_api::{Account, Tag, TrustPolicy};

use super::schema::{self, Dialect, Shape, TableShape};
use super::*;

/// How databases made by earlier versions reach the described schema ([`super::schema`]): applied in order, each
/// once. A new database is created from the description at the latest version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, json TEXT NOT NULL);
CREATE TABLE tokens (id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, admin INTEGER NOT NULL, json TEXT NOT NULL);
CREATE TABLE templates (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, name TEXT NOT NULL, json TEXT NOT NULL,
    UNIQUE (account_id, name));
CREATE TABLE builds (id TEXT PRIMARY KEY, template_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL, json TEXT NOT NULL);
CREATE INDEX builds_by_template ON builds (template_id, created_at);
CREATE TABLE tags (template_id TEXT NOT NULL, name TEXT NOT NULL, build_id TEXT NOT NULL,
    updated_at TEXT NOT NULL, PRIMARY KEY (template_id, name));
CREATE TABLE pools (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, name TEXT NOT NULL, json TEXT NOT NULL,
    UNIQUE (account_id, name));
CREATE TABLE leases (pool_id TEXT NOT NULL, key TEXT NOT NULL, json TEXT NOT NULL, PRIMARY KEY (pool_id, key));
CREATE TABLE sandboxes (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, pool_id TEXT, pool_slot TEXT,
    claimed_from TEXT, build_id TEXT NOT NULL, state TEXT NOT NULL, ready_at TEXT, json TEXT NOT NULL);
CREATE INDEX sandboxes_by_pool ON sandboxes (pool_id, pool_slot, ready_at);
CREATE INDEX sandboxes_by_account ON sandboxes (account_id);
"#,
    r#"
ALTER TABLE sandboxes ADD COLUMN lifecycle TEXT NOT NULL DEFAULT 'claimed';
UPDATE sandboxes SET lifecycle = CASE
    WHEN pool_slot IS NOT NULL THEN pool_slot
    WHEN state = 'starting' THEN 'warming'
    WHEN state = 'failed' THEN 'failed'
    WHEN state = 'stopped' THEN 'draining'
    ELSE 'claimed' END;
UPDATE sandboxes SET json = json_remove(json_set(json, '$.lifecycle', lifecycle), '$.pool_slot', '$.handle.token');
DROP INDEX sandboxes_by_pool;
CREATE INDEX sandboxes_by_pool ON sandboxes (pool_id, lifecycle, ready_at);
CREATE TABLE health (id INTEGER PRIMARY KEY, at TEXT NOT NULL);
"#,
    r#"
CREATE TABLE trust_policies (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, name TEXT NOT NULL,
    issuer TEXT NOT NULL, json TEXT NOT NULL, UNIQUE (account_id, name));
CREATE INDEX trust_policies_by_issuer ON trust_policies (issuer, id);
"#,
    r#"
ALTER TABLE pools ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
UPDATE pools SET rev = COALESCE(json_extract(json, '$.rev'), 0);
ALTER TABLE sandboxes DROP COLUMN pool_slot;
CREATE INDEX sandboxes_claimed_from ON sandboxes (claimed_from);
"#,
    r#"
CREATE TABLE pool_claims (id TEXT NOT NULL, pool_id TEXT NOT NULL, at_ms INTEGER NOT NULL, hit INTEGER NOT NULL,
    PRIMARY KEY (id));
CREATE INDEX pool_claims_by_pool ON pool_claims (pool_id, at_ms);
CREATE TABLE pool_warmups (sandbox_id TEXT NOT NULL, pool_id TEXT NOT NULL, at_ms INTEGER NOT NULL,
    warm_ms INTEGER NOT NULL, PRIMARY KEY (sandbox_id));
CREATE INDEX pool_warmups_by_pool ON pool_warmups (pool_id, at_ms);
"#,
];

/// Connections that only read, each on a thread of its own.
const READERS: usize = 3;
/// How long a write waits for another process's write lock before it fails as `service_unavailable`.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct SqliteStore {
    writer: Threads,
    readers: Threads,
    path: String,
}

/// A statement to run on a store thread, with the connection that thread owns.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// Threads that each own one connection and run the jobs sent to them, in order of arrival. They end (closing
/// their connections) when the store is dropped.
struct Threads(mpsc::Sender<Job>);

impl Threads {
    fn spawn(name: &str, connections: Vec<Connection>) -> StoreResult<Threads> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for (i, mut conn) in connections.into_iter().enumerate() {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    // The lock is held only while waiting for the next job, never while running one.
                    let next = rx.lock().expect("store queue").recv();
                    let Ok(job) = next else { return };
                    job(&mut conn);
                })
                .map_err(|e| StoreError::Backend(Box::new(e)))?;
        }
        Ok(Threads(tx))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let _ = reply.send(f(&mut Db(conn)));
        });
        let gone = || StoreError::Backend("the store's threads have stopped".into());
        self.0.send(job).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Takes group and other access away from `path` if it exists (the database, its WAL, its shared memory).
fn restrict_to_owner(path: &Path) -> StoreResult<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(cannot_open)?;
    }
    Ok(())
}

fn cannot_open(e: std::io::Error) -> StoreError {
    StoreError::Unavailable { reason: "the database file cannot be opened", source: Box::new(e) }
}

fn lifecycles(expected: &[Lifecycle]) -> String {
    expected.iter().map(|l| format!("'{}'", l.as_str())).collect::<Vec<_>>().join(", ")
}

fn from_json<T: DeserializeOwned>(text: String) -> StoreResult<T> {
    Ok(serde_json::from_str(&text)?)
}

fn connect(path: &Path) -> StoreResult<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (or creates) the database. The file and its WAL are readable by the owner only: the database holds
    /// every token hash and pool of every account.
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        // Created private, so it is never readable by others, not even for a moment.
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(cannot_open)?;
        restrict_to_owner(path)?;
        let mut writer = connect(path)?;
        writer.pragma_update(None, "journal_mode", "WAL")?;
        migrate(&mut writer)?;
        for suffix in ["-wal", "-shm"] {
            let mut companion = path.as_os_str().to_owned();
            companion.push(suffix);
            restrict_to_owner(Path::new(&companion))?;
        }
        let readers = (0..READERS)
            .map(|_| {
                let conn = connect(path)?;
                conn.pragma_update(None, "query_only", "ON")?;
                Ok(conn)
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(SqliteStore {
            writer: Threads::spawn("sqlite-writer", vec![writer])?,
            readers: Threads::spawn("sqlite-reader", readers)?,
            path: path.display().to_string(),
        })
    }
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: usize = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 {
        tx.execute_batch(&schema::create(Dialect::Sqlite))?;
    } else {
        for sql in &MIGRATIONS[version.min(MIGRATIONS.len())..] {
            tx.execute_batch(sql)?;
        }
    }
    tx.pragma_update(None, "user_version", MIGRATIONS.len())?;
    tx.commit()?;
    Ok(())
}

/// A database as the first released version made it (what the upgrade test starts from).
#[cfg(test)]
pub fn create_first_version(path: &Path) {
    let conn = Connection::open(path).unwrap();
    conn.execute_batch(MIGRATIONS[0]).unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
}

impl SqliteStore {
    /// The live schema, to compare with the description.
    pub async fn shape(&self) -> StoreResult<Shape> {
        self.readers
            .run(|db| {
                let conn = &*db.0;
                let mut shape = Shape::default();
                let tables: Vec<String> = conn
                    .prepare(
                        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
                    )?
                    .query_map([], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for table in tables {
                    let mut t = TableShape::default();
                    let mut pk: Vec<(i64, String)> = Vec::new();
                    let mut stmt =
                        conn.prepare("SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1)")?;
                    let columns = stmt.query_map([&table], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, bool>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    })?;
                    for column in columns {
                        let (name, sql_type, not_null, pk_pos) = column?;
                        if pk_pos > 0 {
                            pk.push((pk_pos, name.clone()));
                        }
                        let kind = Shape::kind_of(&table, &name, &sql_type);
                        t.columns.insert(name, (kind, !not_null && pk_pos == 0));
                    }
                    pk.sort();
                    t.primary_key = pk.into_iter().map(|(_, n)| n).collect();
                    let mut stmt = conn.prepare("SELECT name, origin FROM pragma_index_list(?1)")?;
                    let indexes: Vec<(String, String)> = stmt
                        .query_map([&table], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?;
                    for (index, origin) in indexes {
                        let columns: Vec<String> = conn
                            .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")?
                            .query_map([&index], |r| r.get(0))?
                            .collect::<Result<_, _>>()?;
                        match origin.as_str() {
                            "u" => {
                                t.unique.insert(columns);
                            }
                            "c" => {
                                t.indexes.insert(index, columns);
                            }
                            _ => {}
                        }
                    }
                    shape.0.insert(table, t);
                }
                Ok(shape)
            })
            .await
    }
}

/// One connection, on its store thread: the statements themselves.
pub struct Db<'c>(&'c mut Connection);

impl Db<'_> {
    fn exec(&self, sql: &str, params: impl Params) -> StoreResult<usize> {
        Ok(self.0.prepare_cached(sql)?.execute(params)?)
    }

    fn one<T: DeserializeOwned>(&self, sql: &str, params: impl Params) -> StoreResult<Option<T>> {
        let text: Option<String> = self.0.prepare_cached(sql)?.query_row(params, |r| r.get(0)).optional()?;
        text.map(from_json).transpose()
    }

    fn many<T: DeserializeOwned>(&self, sql: &str, params: impl Params) -> StoreResult<Vec<T>> {
        let mut stmt = self.0.prepare_cached(sql)?;
        let rows = stmt.query_map(params, |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for text in rows {
            out.push(from_json(text?)?);
        }
        Ok(out)
    }
}

/// Each [`Store`] method sends the statement of the same name to the writer or to a reader. Arguments are copied
/// into the job (it runs on another thread).
macro_rules! on_threads {
    ($($threads:ident fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        #[async_trait::async_trait]
        impl Store for SqliteStore {
            fn describe(&self) -> String {
                format!("sqlite:{}", self.path)
            }

            async fn put_tag(&self, template_id: &str, tag: &str, build_id: &str, at: DateTime<Utc>) -> StoreResult<()> {
                let (template_id, tag, build_id) = (template_id.to_owned(), tag.to_owned(), build_id.to_owned());
                self.writer.run(move |db| db.put_tag(&template_id, &tag, &build_id, at)).await
            }

            async fn insert_owned_sandbox(&self, row: &SandboxRow, max_owned: u64) -> StoreResult<()> {
                let row = row.clone();
                self.writer.run(move |db| db.insert_owned_sandbox(&row, max_owned)).await
            }

            async fn record_claims(&self, claims: &[ClaimEvent]) -> StoreResult<()> {
                let claims = claims.to_vec();
                self.writer.run(move |db| db.record_claims(&claims)).await
            }

            async fn record_warmup(
                &self,
                pool_id: &str,
                sandbox_id: &str,
                at: DateTime<Utc>,
                seconds: f64,
            ) -> StoreResult<()> {
                let (pool_id, sandbox_id) = (pool_id.to_owned(), sandbox_id.to_owned());
                self.writer.run(move |db| db.record_warmup(&pool_id, &sandbox_id, at, seconds)).await
            }

            async fn demand_sample(
                &self,
                pool_id: &str,
                since: DateTime<Utc>,
                recent: DateTime<Utc>,
                warmups: u32,
            ) -> StoreResult<DemandSample> {
                let pool_id = pool_id.to_owned();
                self.readers.run(move |db| db.demand_sample(&pool_id, since, recent, warmups)).await
            }

            async fn prune_demand(&self, pool_id: &str, before: DateTime<Utc>, keep_warmups: u32) -> StoreResult<()> {
                let pool_id = pool_id.to_owned();
                self.writer.run(move |db| db.prune_demand(&pool_id, before, keep_warmups)).await
            }

            async fn list_pools(&self, account_id: Option<&str>) -> StoreResult<Vec<PoolRow>> {
                let account_id = account_id.map(str::to_owned);
                self.readers.run(move |db| db.list_pools(account_id.as_deref())).await
            }

            async fn claim_ready(
                &self,
                pool_id: &str,
                prefer_build: Option<&str>,
                claim: &ClaimUpdate,
            ) -> StoreResult<Option<SandboxRow>> {
                let (pool_id, prefer_build, claim) =
                    (pool_id.to_owned(), prefer_build.map(str::to_owned), claim.clone());
                self.writer.run(move |db| db.claim_ready(&pool_id, prefer_build.as_deref(), &claim)).await
            }

            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    $( let $arg = $arg.to_owned(); )*
                    self.$threads.run(move |db| db.$name($(&$arg),*)).await
                }
            )*
        }
    };
}

on_threads! {
    writer fn check_writable(&self) -> StoreResult<()>;
    writer fn insert_account(&self, account: &Account) -> StoreResult<()>;
    readers fn get_account(&self, id: &str) -> StoreResult<Option<Account>>;
    readers fn list_accounts(&self, page: &Page) -> StoreResult<Vec<Account>>;
    writer fn update_account(&self, account: &Account) -> StoreResult<()>;
    writer fn insert_token(&self, token: &TokenRow) -> StoreResult<()>;
    readers fn credential(&self, hash: &str, default_account: &str) -> StoreResult<Option<Credential>>;
    readers fn has_admin_token(&self) -> StoreResult<bool>;
    writer fn delete_token(&self, id: &str) -> StoreResult<bool>;
    writer fn insert_trust_policy(&self, policy: &TrustPolicy) -> StoreResult<()>;
    readers fn get_trust_policy(&self, account_id: &str, id: &str) -> StoreResult<Option<TrustPolicy>>;
    readers fn list_trust_policies(&self, account_id: &str, page: &Page) -> StoreResult<Vec<TrustPolicy>>;
    readers fn trust_policies_for_issuer(&self, issuer: &str) -> StoreResult<Vec<TrustPolicy>>;
    writer fn delete_trust_policy(&self, account_id: &str, id: &str) -> StoreResult<bool>;
    writer fn insert_template(&self, row: &TemplateRow) -> StoreResult<()>;
    readers fn get_template(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<TemplateRow>>;
    readers fn list_templates(&self, account_id: &str, page: &Page) -> StoreResult<Vec<TemplateRow>>;
    writer fn update_template(&self, row: &TemplateRow) -> StoreResult<()>;
    writer fn delete_template(&self, id: &str) -> StoreResult<()>;
    writer fn insert_build(&self, row: &BuildRow) -> StoreResult<()>;
    readers fn get_build(&self, id: &str) -> StoreResult<Option<BuildRow>>;
    readers fn list_builds(&self, template_id: &str) -> StoreResult<Vec<BuildRow>>;
    readers fn page_builds(&self, template_id: &str, page: &Page) -> StoreResult<Vec<BuildRow>>;
    readers fn list_builds_in(&self, statuses: &[&'static str]) -> StoreResult<Vec<BuildRow>>;
    writer fn update_build(&self, row: &BuildRow) -> StoreResult<()>;
    readers fn latest_ready_build(&self, template_id: &str) -> StoreResult<Option<BuildRow>>;
    readers fn get_tag(&self, template_id: &str, tag: &str) -> StoreResult<Option<Tag>>;
    readers fn list_tags(&self, template_id: &str) -> StoreResult<Vec<Tag>>;
    writer fn delete_tag(&self, template_id: &str, tag: &str) -> StoreResult<bool>;
    writer fn insert_pool(&self, row: &PoolRow) -> StoreResult<()>;
    readers fn get_pool(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<PoolRow>>;
    readers fn get_pool_by_id(&self, id: &str) -> StoreResult<Option<PoolRow>>;
    readers fn page_pools(&self, account_id: &str, page: &Page) -> StoreResult<Vec<PoolRow>>;
    writer fn update_pool(&self, row: &PoolRow) -> StoreResult<bool>;
    readers fn list_pool_ids(&self) -> StoreResult<Vec<String>>;
    writer fn delete_pool(&self, id: &str) -> StoreResult<()>;
    writer fn put_lease(&self, row: &LeaseRow) -> StoreResult<()>;
    writer fn delete_lease(&self, pool_id: &str, key: &str) -> StoreResult<bool>;
    readers fn list_leases(&self, pool_id: &str) -> StoreResult<Vec<LeaseRow>>;
    writer fn insert_sandbox(&self, row: &SandboxRow) -> StoreResult<()>;
    readers fn get_sandbox(&self, id: &str) -> StoreResult<Option<SandboxRow>>;
    readers fn list_sandboxes(&self, account_id: &str, page: &Page) -> StoreResult<Vec<SandboxRow>>;
    readers fn list_all_sandboxes(&self) -> StoreResult<Vec<SandboxRow>>;
    readers fn list_pool_sandboxes(&self, pool_id: &str) -> StoreResult<Vec<SandboxRow>>;
    writer fn update_sandbox_if(&self, row: &SandboxRow, expected: &[Lifecycle]) -> StoreResult<bool>;
    writer fn delete_sandbox_if(&self, id: &str, expected: &[Lifecycle]) -> StoreResult<bool>;
    readers fn count_live_sandboxes(&self) -> StoreResult<u64>;
    readers fn count_sandboxes(&self, account_id: &str) -> StoreResult<(u64, u64)>;
}

impl Db<'_> {
    fn check_writable(&mut self) -> StoreResult<()> {
        self.exec(
            "INSERT INTO health (id, at) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            [ts(&Utc::now())],
        )?;
        Ok(())
    }

    fn insert_account(&mut self, a: &Account) -> StoreResult<()> {
        self.exec(
            "INSERT INTO accounts (id, name, json) VALUES (?1, ?2, ?3)",
            params![a.id.as_str(), a.name, serde_json::to_string(a)?],
        )?;
        Ok(())
    }
    fn get_account(&mut self, id: &str) -> StoreResult<Option<Account>> {
        self.one("SELECT json FROM accounts WHERE id = ?1", [id])
    }
    fn list_accounts(&mut self, page: &Page) -> StoreResult<Vec<Account>> {
        self.many(
            "SELECT json FROM accounts WHERE id > ?1 ORDER BY id LIMIT ?2",
            params![page.after(), page.limit],
        )
    }
    fn update_account(&mut self, a: &Account) -> StoreResult<()> {
        self.exec(
            "UPDATE accounts SET name = ?2, json = ?3 WHERE id = ?1",
            params![a.id.as_str(), a.name, serde_json::to_string(a)?],
        )?;
        Ok(())
    }

    fn insert_token(&mut self, t: &TokenRow) -> StoreResult<()> {
        self.exec(
            "INSERT INTO tokens (id, hash, admin, json) VALUES (?1, ?2, ?3, ?4)",
            params![t.id.as_str(), t.hash, t.admin, serde_json::to_string(t)?],
        )?;
        Ok(())
    }
    fn credential(&mut self, hash: &str, default_account: &str) -> StoreResult<Option<Credential>> {
        self.one(
            "SELECT json_object('token', json(t.json), 'account', json(a.json)) FROM tokens t
             LEFT JOIN accounts a ON a.id = COALESCE(json_extract(t.json, '$.account_id'), ?2)
             WHERE t.hash = ?1",
            [hash, default_account],
        )
    }
    fn has_admin_token(&mut self) -> StoreResult<bool> {
        let conn = &*self.0;
        Ok(conn.query_row("SELECT COUNT(*) FROM tokens WHERE admin = 1", [], |r| r.get::<_, i64>(0))? > 0)
    }
    fn delete_token(&mut self, id: &str) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM tokens WHERE id = ?1", [id])? > 0)
    }

    fn insert_trust_policy(&mut self, p: &TrustPolicy) -> StoreResult<()> {
        self.exec(
            "INSERT INTO trust_policies (id, account_id, name, issuer, json) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![p.id.as_str(), p.account_id.as_str(), p.name, p.issuer, serde_json::to_string(p)?],
        )
        .map_err(conflict_as(format!("trust policy {:?}", p.name)))?;
        Ok(())
    }
    fn get_trust_policy(&mut self, account_id: &str, id: &str) -> StoreResult<Option<TrustPolicy>> {
        self.one("SELECT json FROM trust_policies WHERE account_id = ?1 AND id = ?2", [account_id, id])
    }
    fn list_trust_policies(&mut self, account_id: &str, page: &Page) -> StoreResult<Vec<TrustPolicy>> {
        self.many(
            "SELECT json FROM trust_policies WHERE account_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![account_id, page.after(), page.limit],
        )
    }
    fn trust_policies_for_issuer(&mut self, issuer: &str) -> StoreResult<Vec<TrustPolicy>> {
        self.many("SELECT json FROM trust_policies WHERE issuer = ?1 ORDER BY id", [issuer])
    }
    fn delete_trust_policy(&mut self, account_id: &str, id: &str) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM trust_policies WHERE account_id = ?1 AND id = ?2", [account_id, id])? > 0)
    }

    fn insert_template(&mut self, row: &TemplateRow) -> StoreResult<()> {
        let t = &row.template;
        self.exec(
            "INSERT INTO templates (id, account_id, name, json) VALUES (?1, ?2, ?3, ?4)",
            params![t.id.as_str(), row.account_id.as_str(), t.name, serde_json::to_string(row)?],
        )
        .map_err(conflict_as(format!("template {:?}", t.name)))?;
        Ok(())
    }
    fn get_template(&mut self, account_id: &str, id_or_name: &str) -> StoreResult<Option<TemplateRow>> {
        self.one(
            "SELECT json FROM templates WHERE account_id = ?1 AND (id = ?2 OR name = ?2)",
            [account_id, id_or_name],
        )
    }
    fn list_templates(&mut self, account_id: &str, page: &Page) -> StoreResult<Vec<TemplateRow>> {
        self.many(
            "SELECT json FROM templates WHERE account_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![account_id, page.after(), page.limit],
        )
    }
    fn update_template(&mut self, row: &TemplateRow) -> StoreResult<()> {
        let t = &row.template;
        self.exec(
            "UPDATE templates SET name = ?2, json = ?3 WHERE id = ?1",
            params![t.id.as_str(), t.name, serde_json::to_string(row)?],
        )
        .map_err(conflict_as(format!("template {:?}", t.name)))?;
        Ok(())
    }
    fn delete_template(&mut self, id: &str) -> StoreResult<()> {
        let conn = &mut *self.0;
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM tags WHERE template_id = ?1", [id])?;
        tx.execute("DELETE FROM builds WHERE template_id = ?1", [id])?;
        tx.execute("DELETE FROM templates WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    fn insert_build(&mut self, row: &BuildRow) -> StoreResult<()> {
        let b = &row.build;
        self.exec(
            "INSERT INTO builds (id, template_id, status, created_at, json) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                b.id.as_str(),
                b.template_id.as_str(),
                b.status.as_str(),
                ts(&b.created_at),
                serde_json::to_string(row)?
            ],
        )?;
        Ok(())
    }
    fn get_build(&mut self, id: &str) -> StoreResult<Option<BuildRow>> {
        self.one("SELECT json FROM builds WHERE id = ?1", [id])
    }
    fn list_builds(&mut self, template_id: &str) -> StoreResult<Vec<BuildRow>> {
        self.many("SELECT json FROM builds WHERE template_id = ?1 ORDER BY created_at", [template_id])
    }
    fn page_builds(&mut self, template_id: &str, page: &Page) -> StoreResult<Vec<BuildRow>> {
        self.many(
            "SELECT json FROM builds WHERE template_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![template_id, page.after(), page.limit],
        )
    }
    fn list_builds_in(&mut self, statuses: &[&'static str]) -> StoreResult<Vec<BuildRow>> {
        let all: Vec<BuildRow> = self.many("SELECT json FROM builds ORDER BY created_at", [])?;
        Ok(all.into_iter().filter(|b| statuses.contains(&b.build.status.as_str())).collect())
    }
    fn update_build(&mut self, row: &BuildRow) -> StoreResult<()> {
        let b = &row.build;
        self.exec(
            "UPDATE builds SET status = ?2, json = ?3 WHERE id = ?1",
            params![b.id.as_str(), b.status.as_str(), serde_json::to_string(row)?],
        )?;
        Ok(())
    }
    fn latest_ready_build(&mut self, template_id: &str) -> StoreResult<Option<BuildRow>> {
        self.one(
            "SELECT json FROM builds WHERE template_id = ?1 AND status = 'ready' ORDER BY created_at DESC LIMIT 1",
            [template_id],
        )
    }

    fn put_tag(
        &mut self,
        template_id: &str,
        tag: &str,
        build_id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.exec(
            "INSERT INTO tags (template_id, name, build_id, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (template_id, name) DO UPDATE SET build_id = excluded.build_id, updated_at = excluded.updated_at",
            params![template_id, tag, build_id, ts(&at)],
        )?;
        Ok(())
    }
    fn get_tag(&mut self, template_id: &str, tag: &str) -> StoreResult<Option<Tag>> {
        Ok(self.list_tags(template_id)?.into_iter().find(|t| t.name == tag))
    }
    fn list_tags(&mut self, template_id: &str) -> StoreResult<Vec<Tag>> {
        let conn = &*self.0;
        let mut stmt = conn.prepare_cached(
            "SELECT name, build_id, updated_at FROM tags WHERE template_id = ?1 ORDER BY name",
        )?;
        let rows = stmt.query_map([template_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, build_id, updated_at) = row?;
            let updated_at = DateTime::parse_from_rfc3339(&updated_at)
                .map_err(|e| StoreError::Corrupt { what: "tag timestamp", source: Box::new(e) })?
                .with_timezone(&Utc);
            out.push(Tag {
                name,
                template_id: stored_id("tag template id", template_id)?,
                build_id: stored_id("tag build id", build_id)?,
                updated_at,
            });
        }
        Ok(out)
    }
    fn delete_tag(&mut self, template_id: &str, tag: &str) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM tags WHERE template_id = ?1 AND name = ?2", [template_id, tag])? > 0)
    }

    fn insert_pool(&mut self, row: &PoolRow) -> StoreResult<()> {
        let p = &row.pool;
        self.exec(
            "INSERT INTO pools (id, account_id, name, rev, json) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                p.id.as_str(),
                row.account_id.as_str(),
                p.name,
                row.rev as i64,
                serde_json::to_string(row)?
            ],
        )
        .map_err(conflict_as(format!("warm pool {:?}", p.name)))?;
        Ok(())
    }
    fn get_pool(&mut self, account_id: &str, id_or_name: &str) -> StoreResult<Option<PoolRow>> {
        self.one(
            "SELECT json FROM pools WHERE account_id = ?1 AND (id = ?2 OR name = ?2)",
            [account_id, id_or_name],
        )
    }
    fn get_pool_by_id(&mut self, id: &str) -> StoreResult<Option<PoolRow>> {
        self.one("SELECT json FROM pools WHERE id = ?1", [id])
    }
    fn list_pools(&mut self, account_id: Option<&str>) -> StoreResult<Vec<PoolRow>> {
        match account_id {
            Some(a) => self.many("SELECT json FROM pools WHERE account_id = ?1 ORDER BY name", [a]),
            None => self.many("SELECT json FROM pools ORDER BY id", []),
        }
    }
    fn page_pools(&mut self, account_id: &str, page: &Page) -> StoreResult<Vec<PoolRow>> {
        self.many(
            "SELECT json FROM pools WHERE account_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![account_id, page.after(), page.limit],
        )
    }
    fn update_pool(&mut self, row: &PoolRow) -> StoreResult<bool> {
        let p = &row.pool;
        let next = PoolRow { rev: row.rev + 1, ..row.clone() };
        let changed = self
            .exec(
                "UPDATE pools SET name = ?2, rev = ?4 + 1, json = ?3 WHERE id = ?1 AND rev = ?4",
                params![p.id.as_str(), p.name, serde_json::to_string(&next)?, row.rev as i64],
            )
            .map_err(conflict_as(format!("warm pool {:?}", p.name)))?;
        Ok(changed == 1)
    }
    fn list_pool_ids(&mut self) -> StoreResult<Vec<String>> {
        let conn = &*self.0;
        let mut stmt = conn.prepare_cached("SELECT id FROM pools ORDER BY id")?;
        let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }
    fn delete_pool(&mut self, id: &str) -> StoreResult<()> {
        let conn = &mut *self.0;
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM leases WHERE pool_id = ?1", [id])?;
        tx.execute("DELETE FROM pool_claims WHERE pool_id = ?1", [id])?;
        tx.execute("DELETE FROM pool_warmups WHERE pool_id = ?1", [id])?;
        tx.execute("DELETE FROM pools WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    fn put_lease(&mut self, row: &LeaseRow) -> StoreResult<()> {
        self.exec(
            "INSERT INTO leases (pool_id, key, json) VALUES (?1, ?2, ?3)
             ON CONFLICT (pool_id, key) DO UPDATE SET json = excluded.json",
            params![row.lease.pool_id.as_str(), row.lease.key, serde_json::to_string(row)?],
        )?;
        Ok(())
    }
    fn delete_lease(&mut self, pool_id: &str, key: &str) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM leases WHERE pool_id = ?1 AND key = ?2", [pool_id, key])? > 0)
    }
    fn list_leases(&mut self, pool_id: &str) -> StoreResult<Vec<LeaseRow>> {
        self.many("SELECT json FROM leases WHERE pool_id = ?1 ORDER BY key", [pool_id])
    }

    fn record_claims(&mut self, claims: &[ClaimEvent]) -> StoreResult<()> {
        let tx = self.0.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO pool_claims (id, pool_id, at_ms, hit) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for c in claims {
                insert.execute(params![c.id, c.pool_id, c.at.timestamp_millis(), c.hit])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
    fn record_warmup(
        &mut self,
        pool_id: &str,
        sandbox_id: &str,
        at: DateTime<Utc>,
        seconds: f64,
    ) -> StoreResult<()> {
        self.exec(
            "INSERT INTO pool_warmups (sandbox_id, pool_id, at_ms, warm_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (sandbox_id) DO NOTHING",
            params![sandbox_id, pool_id, at.timestamp_millis(), (seconds * 1000.0).round() as i64],
        )?;
        Ok(())
    }
    fn demand_sample(
        &mut self,
        pool_id: &str,
        since: DateTime<Utc>,
        recent: DateTime<Utc>,
        warmups: u32,
    ) -> StoreResult<DemandSample> {
        let conn = &*self.0;
        let (claims, hits, recent_claims, last, recent_first): (u64, u64, u64, Option<i64>, Option<i64>) =
            conn.prepare_cached(
                "SELECT COUNT(*) FILTER (WHERE at_ms >= ?2), COUNT(*) FILTER (WHERE at_ms >= ?2 AND hit),
                        COUNT(*) FILTER (WHERE at_ms >= ?3), MAX(at_ms), MIN(at_ms) FILTER (WHERE at_ms >= ?3)
                 FROM pool_claims WHERE pool_id = ?1",
            )?
            .query_row(params![pool_id, since.timestamp_millis(), recent.timestamp_millis()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
        let warm_seconds = conn
            .prepare_cached(
                "SELECT warm_ms FROM pool_warmups WHERE pool_id = ?1 ORDER BY at_ms DESC LIMIT ?2",
            )?
            .query_map(params![pool_id, warmups], |r| r.get::<_, i64>(0))?
            .map(|ms| ms.map(|ms| ms as f64 / 1000.0))
            .collect::<Result<Vec<f64>, _>>()?;
        Ok(DemandSample {
            claims,
            hits,
            recent_claims,
            last_claim_at: last.and_then(DateTime::from_timestamp_millis),
            recent_first_at: recent_first.and_then(DateTime::from_timestamp_millis),
            warm_seconds,
        })
    }
    fn prune_demand(&mut self, pool_id: &str, before: DateTime<Utc>, keep_warmups: u32) -> StoreResult<()> {
        let tx = self.0.transaction()?;
        tx.execute(
            "DELETE FROM pool_claims WHERE pool_id = ?1 AND at_ms < ?2",
            params![pool_id, before.timestamp_millis()],
        )?;
        tx.execute(
            "DELETE FROM pool_warmups WHERE pool_id = ?1 AND at_ms < (SELECT at_ms FROM pool_warmups
                 WHERE pool_id = ?1 ORDER BY at_ms DESC LIMIT 1 OFFSET ?2)",
            params![pool_id, keep_warmups.saturating_sub(1)],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn insert_sandbox(&mut self, row: &SandboxRow) -> StoreResult<()> {
        let SandboxColumns { json, pool_id, lifecycle, state, ready_at } = SandboxColumns::of(row)?;
        self.exec(
            "INSERT INTO sandboxes (id, account_id, pool_id, lifecycle, claimed_from, build_id, state, ready_at, json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![row.sandbox.id.as_str(), row.account_id.as_str(), pool_id, lifecycle, row.claimed_from.as_deref(), row.sandbox.build_id.as_str(), state, ready_at, json],
        )?;
        Ok(())
    }
    fn get_sandbox(&mut self, id: &str) -> StoreResult<Option<SandboxRow>> {
        self.one("SELECT json FROM sandboxes WHERE id = ?1", [id])
    }
    fn list_sandboxes(&mut self, account_id: &str, page: &Page) -> StoreResult<Vec<SandboxRow>> {
        self.many(
            "SELECT json FROM sandboxes WHERE account_id = ?1 AND pool_id IS NULL AND id > ?2 ORDER BY id LIMIT ?3",
            params![account_id, page.after(), page.limit],
        )
    }
    fn list_all_sandboxes(&mut self) -> StoreResult<Vec<SandboxRow>> {
        self.many("SELECT json FROM sandboxes ORDER BY id", [])
    }
    fn list_pool_sandboxes(&mut self, pool_id: &str) -> StoreResult<Vec<SandboxRow>> {
        self.many("SELECT json FROM sandboxes WHERE pool_id = ?1 OR claimed_from = ?1 ORDER BY id", [pool_id])
    }
    fn update_sandbox_if(&mut self, row: &SandboxRow, expected: &[Lifecycle]) -> StoreResult<bool> {
        let SandboxColumns { json, pool_id, lifecycle, state, ready_at } = SandboxColumns::of(row)?;
        let changed = self.exec(
            &format!(
                "UPDATE sandboxes SET account_id = ?2, pool_id = ?3, lifecycle = ?4, claimed_from = ?5, state = ?6,
                 ready_at = ?7, json = ?8 WHERE id = ?1 AND lifecycle IN ({})",
                lifecycles(expected)
            ),
            params![row.sandbox.id.as_str(), row.account_id.as_str(), pool_id, lifecycle, row.claimed_from.as_deref(), state, ready_at, json],
        )?;
        Ok(changed == 1)
    }
    fn delete_sandbox_if(&mut self, id: &str, expected: &[Lifecycle]) -> StoreResult<bool> {
        let sql = format!("DELETE FROM sandboxes WHERE id = ?1 AND lifecycle IN ({})", lifecycles(expected));
        Ok(self.exec(&sql, [id])? == 1)
    }
    fn count_live_sandboxes(&mut self) -> StoreResult<u64> {
        let conn = &*self.0;
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM sandboxes WHERE lifecycle IN ('warming', 'ready', 'claimed', 'draining')",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }
    fn count_sandboxes(&mut self, account_id: &str) -> StoreResult<(u64, u64)> {
        count_sandboxes(self.0, account_id)
    }

    /// Runs on the writer, the only connection that writes: nothing changes between the count and the insert.
    fn insert_owned_sandbox(&mut self, row: &SandboxRow, max_owned: u64) -> StoreResult<()> {
        within_quota(self.0, &row.account_id, max_owned)?;
        self.insert_sandbox(row)
    }

    fn claim_ready(
        &mut self,
        pool_id: &str,
        prefer_build: Option<&str>,
        claim: &ClaimUpdate,
    ) -> StoreResult<Option<SandboxRow>> {
        let conn = &mut *self.0;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if let Some(max) = claim.max_owned {
            within_quota(&tx, &claim.account_id, max)?;
        }
        let picked: Option<String> = tx
            .query_row(
                "SELECT json FROM sandboxes WHERE pool_id = ?1 AND lifecycle = 'ready'
                 ORDER BY (build_id = ?2) DESC, ready_at LIMIT 1",
                params![pool_id, prefer_build.unwrap_or("")],
                |r| r.get(0),
            )
            .optional()?;
        let Some(text) = picked else { return Ok(None) };
        let row = claim.apply(pool_id, &from_json(text)?)?;
        let json = serde_json::to_string(&row)?;
        let changed = tx.execute(
            "UPDATE sandboxes SET account_id = ?2, pool_id = NULL, lifecycle = 'claimed', claimed_from = ?3,
             json = ?4 WHERE id = ?1 AND lifecycle = 'ready'",
            params![row.sandbox.id.as_str(), row.account_id.as_str(), pool_id, json],
        )?;
        if changed != 1 {
            return Ok(None);
        }
        tx.commit()?;
        Ok(Some(row))
    }
}

/// An account's own sandboxes (warming or claimed, not pool inventory) and its warm pool inventory.
fn count_sandboxes(conn: &Connection, account_id: &str) -> StoreResult<(u64, u64)> {
    let (owned, warm): (i64, i64) = conn.query_row(
        "SELECT COALESCE(SUM(pool_id IS NULL AND lifecycle IN ('warming', 'claimed')), 0),
                COALESCE(SUM(pool_id IS NOT NULL AND lifecycle IN ('warming', 'ready')), 0)
         FROM sandboxes WHERE account_id = ?1",
        [account_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((owned as u64, warm as u64))
}

/// [`StoreError::OverQuota`] when the account already owns `max` sandboxes.
fn within_quota(conn: &Connection, account_id: &str, max: u64) -> StoreResult<()> {
    let (owned, _) = count_sandboxes(conn, account_id)?;
    if owned >= max {
        return Err(StoreError::OverQuota { owned, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn survives_reopen_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warmpool.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store.insert_sandbox(&crate::store::contract::sandbox("sbx_a", "twp_1")).await.unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.get_sandbox("sbx_a").await.unwrap().unwrap().sandbox.id, "sbx_a");
    }

    #[tokio::test]
    async fn the_database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warmpool.db");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = SqliteStore::open(&path).unwrap();
        store.check_writable().await.unwrap();
        for file in ["warmpool.db", "warmpool.db-wal", "warmpool.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
    }
}
