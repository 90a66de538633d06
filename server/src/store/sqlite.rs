//! The embedded store: one SQLite file in the data dir, WAL mode, schema migrations on open. A `kill -9` of the
//! server loses no committed write (WAL with `synchronous=NORMAL` is durable across process crashes).

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Params};
use serde::de::DeserializeOwned;
use warmpool_api::{Account, Tag, TrustPolicy};

use super::*;

/// Schema versions, applied in order; each runs once.
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
CREATE TABLE pool_claims (pool_id TEXT NOT NULL, at_ms INTEGER NOT NULL, hit INTEGER NOT NULL);
CREATE INDEX pool_claims_by_pool ON pool_claims (pool_id, at_ms);
CREATE TABLE pool_warmups (pool_id TEXT NOT NULL, at_ms INTEGER NOT NULL, seconds REAL NOT NULL);
CREATE INDEX pool_warmups_by_pool ON pool_warmups (pool_id, at_ms);
"#,
];

pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: String,
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

impl SqliteStore {
    /// Opens (or creates) the database. The file and its WAL are readable by the owner only: the database holds
    /// every token hash and pool of every account.
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        // Created private, so it is never readable by others, not even for a moment.
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(cannot_open)?;
        restrict_to_owner(path)?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let store = SqliteStore { conn: Mutex::new(conn), path: path.display().to_string() };
        store.migrate()?;
        for suffix in ["-wal", "-shm"] {
            let mut companion = path.as_os_str().to_owned();
            companion.push(suffix);
            restrict_to_owner(Path::new(&companion))?;
        }
        Ok(store)
    }

    fn migrate(&self) -> StoreResult<()> {
        let mut conn = self.conn.lock().expect("store lock");
        let tx = conn.transaction()?;
        let version: usize = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn exec(&self, sql: &str, params: impl Params) -> StoreResult<usize> {
        Ok(self.conn.lock().expect("store lock").execute(sql, params)?)
    }

    fn one<T: DeserializeOwned>(&self, sql: &str, params: impl Params) -> StoreResult<Option<T>> {
        let conn = self.conn.lock().expect("store lock");
        let text: Option<String> = conn.query_row(sql, params, |r| r.get(0)).optional()?;
        text.map(from_json).transpose()
    }

    fn many<T: DeserializeOwned>(&self, sql: &str, params: impl Params) -> StoreResult<Vec<T>> {
        let conn = self.conn.lock().expect("store lock");
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params, |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for text in rows {
            out.push(from_json(text?)?);
        }
        Ok(out)
    }
}

/// The columns of a sandbox row besides its ids: (json, pool_id, lifecycle, state, ready_at).
type SandboxColumns = (String, Option<String>, &'static str, String, Option<String>);

fn sandbox_params(row: &SandboxRow) -> StoreResult<SandboxColumns> {
    Ok((
        serde_json::to_string(row)?,
        row.pool_id.clone(),
        row.lifecycle.as_str(),
        row.sandbox.state.as_str().to_string(),
        row.ready_at.as_ref().map(ts),
    ))
}

impl Store for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite:{}", self.path)
    }

    fn check_writable(&self) -> StoreResult<()> {
        self.exec(
            "INSERT INTO health (id, at) VALUES (1, ?1) ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            [ts(&Utc::now())],
        )?;
        Ok(())
    }

    fn insert_account(&self, a: &Account) -> StoreResult<()> {
        self.exec(
            "INSERT INTO accounts (id, name, json) VALUES (?1, ?2, ?3)",
            params![a.id, a.name, serde_json::to_string(a)?],
        )?;
        Ok(())
    }
    fn get_account(&self, id: &str) -> StoreResult<Option<Account>> {
        self.one("SELECT json FROM accounts WHERE id = ?1", [id])
    }
    fn list_accounts(&self, page: &Page) -> StoreResult<Vec<Account>> {
        self.many(
            "SELECT json FROM accounts WHERE id > ?1 ORDER BY id LIMIT ?2",
            params![page.after(), page.limit],
        )
    }
    fn update_account(&self, a: &Account) -> StoreResult<()> {
        self.exec(
            "UPDATE accounts SET name = ?2, json = ?3 WHERE id = ?1",
            params![a.id, a.name, serde_json::to_string(a)?],
        )?;
        Ok(())
    }

    fn insert_token(&self, t: &TokenRow) -> StoreResult<()> {
        self.exec(
            "INSERT INTO tokens (id, hash, admin, json) VALUES (?1, ?2, ?3, ?4)",
            params![t.id, t.hash, t.admin, serde_json::to_string(t)?],
        )?;
        Ok(())
    }
    fn token_by_hash(&self, hash: &str) -> StoreResult<Option<TokenRow>> {
        self.one("SELECT json FROM tokens WHERE hash = ?1", [hash])
    }
    fn has_admin_token(&self) -> StoreResult<bool> {
        let conn = self.conn.lock().expect("store lock");
        Ok(conn.query_row("SELECT COUNT(*) FROM tokens WHERE admin = 1", [], |r| r.get::<_, i64>(0))? > 0)
    }
    fn delete_token(&self, id: &str) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM tokens WHERE id = ?1", [id])? > 0)
    }

    fn insert_trust_policy(&self, p: &TrustPolicy) -> StoreResult<()> {
        self.exec(
            "INSERT INTO trust_policies (id, account_id, name, issuer, json) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![p.id, p.account_id, p.name, p.issuer, serde_json::to_string(p)?],
        )
        .map_err(conflict_as(format!("trust policy {:?}", p.name)))?;
        Ok(())
    }
    fn get_trust_policy(&self, account_id: &str, id: &str) -> StoreResult<Option<TrustPolicy>> {
        self.one("SELECT json FROM trust_policies WHERE account_id = ?1 AND id = ?2", [account_id, id])
    }
    fn list_trust_policies(&self, account_id: &str, page: &Page) -> StoreResult<Vec<TrustPolicy>> {
        self.many(
            "SELECT json FROM trust_policies WHERE account_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![account_id, page.after(), page.limit],
        )
    }
    fn trust_policies_for_issuer(&self, issuer: &str) -> StoreResult<Vec<TrustPolicy>> {
        self.many("SELECT json FROM trust_policies WHERE issuer = ?1 ORDER BY id", [issuer])
    }
    fn delete_trust_policy(&self, account_id: &str, id: &str) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM trust_policies WHERE account_id = ?1 AND id = ?2", [account_id, id])? > 0)
    }

    fn insert_template(&self, row: &TemplateRow) -> StoreResult<()> {
        let t = &row.template;
        self.exec(
            "INSERT INTO templates (id, account_id, name, json) VALUES (?1, ?2, ?3, ?4)",
            params![t.id, row.account_id, t.name, serde_json::to_string(row)?],
        )
        .map_err(conflict_as(format!("template {:?}", t.name)))?;
        Ok(())
    }
    fn get_template(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<TemplateRow>> {
        self.one(
            "SELECT json FROM templates WHERE account_id = ?1 AND (id = ?2 OR name = ?2)",
            [account_id, id_or_name],
        )
    }
    fn list_templates(&self, account_id: &str, page: &Page) -> StoreResult<Vec<TemplateRow>> {
        self.many(
            "SELECT json FROM templates WHERE account_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![account_id, page.after(), page.limit],
        )
    }
    fn update_template(&self, row: &TemplateRow) -> StoreResult<()> {
        let t = &row.template;
        self.exec(
            "UPDATE templates SET name = ?2, json = ?3 WHERE id = ?1",
            params![t.id, t.name, serde_json::to_string(row)?],
        )
        .map_err(conflict_as(format!("template {:?}", t.name)))?;
        Ok(())
    }
    fn delete_template(&self, id: &str) -> StoreResult<()> {
        let mut conn = self.conn.lock().expect("store lock");
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM tags WHERE template_id = ?1", [id])?;
        tx.execute("DELETE FROM builds WHERE template_id = ?1", [id])?;
        tx.execute("DELETE FROM templates WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    fn insert_build(&self, row: &BuildRow) -> StoreResult<()> {
        let b = &row.build;
        self.exec(
            "INSERT INTO builds (id, template_id, status, created_at, json) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![b.id, b.template_id, b.status.as_str(), ts(&b.created_at), serde_json::to_string(row)?],
        )?;
        Ok(())
    }
    fn get_build(&self, id: &str) -> StoreResult<Option<BuildRow>> {
        self.one("SELECT json FROM builds WHERE id = ?1", [id])
    }
    fn list_builds(&self, template_id: &str) -> StoreResult<Vec<BuildRow>> {
        self.many("SELECT json FROM builds WHERE template_id = ?1 ORDER BY created_at", [template_id])
    }
    fn page_builds(&self, template_id: &str, page: &Page) -> StoreResult<Vec<BuildRow>> {
        self.many(
            "SELECT json FROM builds WHERE template_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![template_id, page.after(), page.limit],
        )
    }
    fn list_builds_in(&self, statuses: &[&str]) -> StoreResult<Vec<BuildRow>> {
        let all: Vec<BuildRow> = self.many("SELECT json FROM builds ORDER BY created_at", [])?;
        Ok(all.into_iter().filter(|b| statuses.contains(&b.build.status.as_str())).collect())
    }
    fn update_build(&self, row: &BuildRow) -> StoreResult<()> {
        let b = &row.build;
        self.exec(
            "UPDATE builds SET status = ?2, json = ?3 WHERE id = ?1",
            params![b.id, b.status.as_str(), serde_json::to_string(row)?],
        )?;
        Ok(())
    }
    fn latest_ready_build(&self, template_id: &str) -> StoreResult<Option<BuildRow>> {
        self.one(
            "SELECT json FROM builds WHERE template_id = ?1 AND status = 'ready' ORDER BY created_at DESC LIMIT 1",
            [template_id],
        )
    }

    fn put_tag(&self, template_id: &str, tag: &str, build_id: &str, at: DateTime<Utc>) -> StoreResult<()> {
        self.exec(
            "INSERT INTO tags (template_id, name, build_id, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (template_id, name) DO UPDATE SET build_id = excluded.build_id, updated_at = excluded.updated_at",
            params![template_id, tag, build_id, ts(&at)],
        )?;
        Ok(())
    }
    fn get_tag(&self, template_id: &str, tag: &str) -> StoreResult<Option<Tag>> {
        Ok(self.list_tags(template_id)?.into_iter().find(|t| t.name == tag))
    }
    fn list_tags(&self, template_id: &str) -> StoreResult<Vec<Tag>> {
        let conn = self.conn.lock().expect("store lock");
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
            out.push(Tag { name, template_id: template_id.to_string(), build_id, updated_at });
        }
        Ok(out)
    }
    fn delete_tag(&self, template_id: &str, tag: &str) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM tags WHERE template_id = ?1 AND name = ?2", [template_id, tag])? > 0)
    }

    fn insert_pool(&self, row: &PoolRow) -> StoreResult<()> {
        let p = &row.pool;
        self.exec(
            "INSERT INTO pools (id, account_id, name, json) VALUES (?1, ?2, ?3, ?4)",
            params![p.id, row.account_id, p.name, serde_json::to_string(row)?],
        )
        .map_err(conflict_as(format!("warm pool {:?}", p.name)))?;
        Ok(())
    }
    fn get_pool(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<PoolRow>> {
        self.one(
            "SELECT json FROM pools WHERE account_id = ?1 AND (id = ?2 OR name = ?2)",
            [account_id, id_or_name],
        )
    }
    fn get_pool_by_id(&self, id: &str) -> StoreResult<Option<PoolRow>> {
        self.one("SELECT json FROM pools WHERE id = ?1", [id])
    }
    fn list_pools(&self, account_id: Option<&str>) -> StoreResult<Vec<PoolRow>> {
        match account_id {
            Some(a) => self.many("SELECT json FROM pools WHERE account_id = ?1 ORDER BY name", [a]),
            None => self.many("SELECT json FROM pools ORDER BY id", []),
        }
    }
    fn page_pools(&self, account_id: &str, page: &Page) -> StoreResult<Vec<PoolRow>> {
        self.many(
            "SELECT json FROM pools WHERE account_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            params![account_id, page.after(), page.limit],
        )
    }
    fn update_pool(&self, row: &PoolRow) -> StoreResult<bool> {
        let p = &row.pool;
        let next = PoolRow { rev: row.rev + 1, ..row.clone() };
        let changed = self
            .exec(
                "UPDATE pools SET name = ?2, json = ?3 WHERE id = ?1 AND COALESCE(json_extract(json, '$.rev'), 0) = ?4",
                params![p.id, p.name, serde_json::to_string(&next)?, row.rev as i64],
            )
            .map_err(conflict_as(format!("warm pool {:?}", p.name)))?;
        Ok(changed == 1)
    }
    fn list_pool_ids(&self) -> StoreResult<Vec<String>> {
        let conn = self.conn.lock().expect("store lock");
        let mut stmt = conn.prepare_cached("SELECT id FROM pools ORDER BY id")?;
        let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }
    fn delete_pool(&self, id: &str) -> StoreResult<()> {
        let mut conn = self.conn.lock().expect("store lock");
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM leases WHERE pool_id = ?1", [id])?;
        tx.execute("DELETE FROM pool_claims WHERE pool_id = ?1", [id])?;
        tx.execute("DELETE FROM pool_warmups WHERE pool_id = ?1", [id])?;
        tx.execute("DELETE FROM pools WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    fn put_lease(&self, row: &LeaseRow) -> StoreResult<()> {
        self.exec(
            "INSERT INTO leases (pool_id, key, json) VALUES (?1, ?2, ?3)
             ON CONFLICT (pool_id, key) DO UPDATE SET json = excluded.json",
            params![row.lease.pool_id, row.lease.key, serde_json::to_string(row)?],
        )?;
        Ok(())
    }
    fn delete_lease(&self, pool_id: &str, key: &str) -> StoreResult<bool> {
        Ok(self.exec("DELETE FROM leases WHERE pool_id = ?1 AND key = ?2", [pool_id, key])? > 0)
    }
    fn list_leases(&self, pool_id: &str) -> StoreResult<Vec<LeaseRow>> {
        self.many("SELECT json FROM leases WHERE pool_id = ?1 ORDER BY key", [pool_id])
    }

    fn record_claims(&self, claims: &[ClaimEvent]) -> StoreResult<()> {
        let mut conn = self.conn.lock().expect("store lock");
        let tx = conn.transaction()?;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO pool_claims (pool_id, at_ms, hit) VALUES (?1, ?2, ?3)")?;
            for c in claims {
                insert.execute(params![c.pool_id, c.at.timestamp_millis(), c.hit])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
    fn record_warmup(&self, pool_id: &str, at: DateTime<Utc>, seconds: f64) -> StoreResult<()> {
        self.exec(
            "INSERT INTO pool_warmups (pool_id, at_ms, seconds) VALUES (?1, ?2, ?3)",
            params![pool_id, at.timestamp_millis(), seconds],
        )?;
        Ok(())
    }
    fn demand_sample(
        &self,
        pool_id: &str,
        since: DateTime<Utc>,
        recent: DateTime<Utc>,
        warmups: u32,
    ) -> StoreResult<DemandSample> {
        let conn = self.conn.lock().expect("store lock");
        let (claims, hits, recent_claims, last): (u64, u64, u64, Option<i64>) = conn
            .prepare_cached(
                "SELECT COUNT(*) FILTER (WHERE at_ms >= ?2), COUNT(*) FILTER (WHERE at_ms >= ?2 AND hit),
                        COUNT(*) FILTER (WHERE at_ms >= ?3), MAX(at_ms)
                 FROM pool_claims WHERE pool_id = ?1",
            )?
            .query_row(params![pool_id, since.timestamp_millis(), recent.timestamp_millis()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
        let warm_seconds = conn
            .prepare_cached(
                "SELECT seconds FROM pool_warmups WHERE pool_id = ?1 ORDER BY at_ms DESC LIMIT ?2",
            )?
            .query_map(params![pool_id, warmups], |r| r.get(0))?
            .collect::<Result<Vec<f64>, _>>()?;
        Ok(DemandSample {
            claims,
            hits,
            recent_claims,
            last_claim_at: last.and_then(DateTime::from_timestamp_millis),
            warm_seconds,
        })
    }
    fn prune_demand(&self, pool_id: &str, before: DateTime<Utc>, keep_warmups: u32) -> StoreResult<()> {
        let mut conn = self.conn.lock().expect("store lock");
        let tx = conn.transaction()?;
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

    fn insert_sandbox(&self, row: &SandboxRow) -> StoreResult<()> {
        let (json, pool_id, lifecycle, state, ready_at) = sandbox_params(row)?;
        self.exec(
            "INSERT INTO sandboxes (id, account_id, pool_id, lifecycle, claimed_from, build_id, state, ready_at, json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![row.sandbox.id, row.account_id, pool_id, lifecycle, row.claimed_from, row.sandbox.build_id, state, ready_at, json],
        )?;
        Ok(())
    }
    fn get_sandbox(&self, id: &str) -> StoreResult<Option<SandboxRow>> {
        self.one("SELECT json FROM sandboxes WHERE id = ?1", [id])
    }
    fn list_sandboxes(&self, account_id: &str, page: &Page) -> StoreResult<Vec<SandboxRow>> {
        self.many(
            "SELECT json FROM sandboxes WHERE account_id = ?1 AND pool_id IS NULL AND id > ?2 ORDER BY id LIMIT ?3",
            params![account_id, page.after(), page.limit],
        )
    }
    fn list_all_sandboxes(&self) -> StoreResult<Vec<SandboxRow>> {
        self.many("SELECT json FROM sandboxes ORDER BY id", [])
    }
    fn list_pool_sandboxes(&self, pool_id: &str) -> StoreResult<Vec<SandboxRow>> {
        self.many("SELECT json FROM sandboxes WHERE pool_id = ?1 OR claimed_from = ?1 ORDER BY id", [pool_id])
    }
    fn update_sandbox_if(&self, row: &SandboxRow, expected: &[Lifecycle]) -> StoreResult<bool> {
        let (json, pool_id, lifecycle, state, ready_at) = sandbox_params(row)?;
        let changed = self.exec(
            &format!(
                "UPDATE sandboxes SET account_id = ?2, pool_id = ?3, lifecycle = ?4, claimed_from = ?5, state = ?6,
                 ready_at = ?7, json = ?8 WHERE id = ?1 AND lifecycle IN ({})",
                lifecycles(expected)
            ),
            params![row.sandbox.id, row.account_id, pool_id, lifecycle, row.claimed_from, state, ready_at, json],
        )?;
        Ok(changed == 1)
    }
    fn delete_sandbox_if(&self, id: &str, expected: &[Lifecycle]) -> StoreResult<bool> {
        let sql = format!("DELETE FROM sandboxes WHERE id = ?1 AND lifecycle IN ({})", lifecycles(expected));
        Ok(self.exec(&sql, [id])? == 1)
    }
    fn count_live_sandboxes(&self) -> StoreResult<u64> {
        let conn = self.conn.lock().expect("store lock");
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM sandboxes WHERE lifecycle IN ('warming', 'ready', 'claimed', 'draining')",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }
    fn count_sandboxes(&self, account_id: &str) -> StoreResult<(u64, u64)> {
        let conn = self.conn.lock().expect("store lock");
        let (owned, warm): (i64, i64) = conn.query_row(
            "SELECT COALESCE(SUM(pool_id IS NULL AND lifecycle IN ('warming', 'claimed')), 0),
                    COALESCE(SUM(pool_id IS NOT NULL AND lifecycle IN ('warming', 'ready')), 0)
             FROM sandboxes WHERE account_id = ?1",
            [account_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((owned as u64, warm as u64))
    }

    fn claim_ready(
        &self,
        pool_id: &str,
        prefer_build: Option<&str>,
        claim: &ClaimUpdate,
    ) -> StoreResult<Option<SandboxRow>> {
        let mut conn = self.conn.lock().expect("store lock");
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let picked: Option<String> = tx
            .query_row(
                "SELECT json FROM sandboxes WHERE pool_id = ?1 AND lifecycle = 'ready'
                 ORDER BY (build_id = ?2) DESC, ready_at LIMIT 1",
                params![pool_id, prefer_build.unwrap_or("")],
                |r| r.get(0),
            )
            .optional()?;
        let Some(text) = picked else { return Ok(None) };
        let mut row: SandboxRow = from_json(text)?;
        row.account_id = claim.account_id.clone();
        row.pool_id = None;
        row.lifecycle = Lifecycle::Claimed;
        row.claimed_from = Some(pool_id.to_string());
        row.sandbox.labels = claim.labels.clone();
        row.sandbox.warm_pool_checkout = Some(claim.checkout.clone());
        row.sandbox.created_at = claim.created_at;
        row.sandbox.expires_at = claim.expires_at;
        row.timeout_policy = claim.timeout_policy.clone();
        let (json, _, _, _, _) = sandbox_params(&row)?;
        let changed = tx.execute(
            "UPDATE sandboxes SET account_id = ?2, pool_id = NULL, lifecycle = 'claimed', claimed_from = ?3,
             json = ?4 WHERE id = ?1 AND lifecycle = 'ready'",
            params![row.sandbox.id, row.account_id, pool_id, json],
        )?;
        if changed != 1 {
            return Ok(None);
        }
        tx.commit()?;
        Ok(Some(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_migrates_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warmpool.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store.insert_sandbox(&crate::store::contract::sandbox("sbx_a", "twp_1")).unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.get_sandbox("sbx_a").unwrap().unwrap().sandbox.id, "sbx_a");
    }

    #[test]
    fn the_database_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warmpool.db");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = SqliteStore::open(&path).unwrap();
        store.check_writable().unwrap();
        for file in ["warmpool.db", "warmpool.db-wal", "warmpool.db-shm"] {
            let mode = std::fs::metadata(dir.path().join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
    }
}
