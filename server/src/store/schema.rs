//! The one description of the store's tables, from which both stores create a new database, and the shape a live
//! database is compared against ([`Shape`]), so the SQLite and PostgreSQL schemas cannot drift apart.
//!
//! Rows keep the columns the store queries or orders by as columns and the whole object as JSON (`json`), so the
//! wire types stay the single definition of a resource. Databases made by earlier versions reach the same shape
//! through each store's migrations; a test checks that a new and an upgraded database of either store match
//! [`TABLES`].

use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Text,
    Int,
    Bool,
    /// A serialized object: `TEXT` on SQLite, `JSONB` on PostgreSQL.
    Json,
}

pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
    pub nullable: bool,
}

pub struct Table {
    pub name: &'static str,
    pub columns: &'static [Column],
    pub primary_key: &'static [&'static str],
    pub unique: &'static [&'static [&'static str]],
    /// Named secondary indexes: `(name, columns)`.
    pub indexes: &'static [(&'static str, &'static [&'static str])],
}

const fn col(name: &'static str, kind: Kind) -> Column {
    Column { name, kind, nullable: false }
}

const fn null(name: &'static str, kind: Kind) -> Column {
    Column { name, kind, nullable: true }
}

use Kind::*;

pub const TABLES: &[Table] = &[
    Table {
        name: "accounts",
        columns: &[col("id", Text), col("name", Text), col("json", Json)],
        primary_key: &["id"],
        unique: &[&["name"]],
        indexes: &[],
    },
    Table {
        name: "tokens",
        columns: &[col("id", Text), col("hash", Text), col("admin", Bool), col("json", Json)],
        primary_key: &["id"],
        unique: &[&["hash"]],
        indexes: &[],
    },
    Table {
        name: "trust_policies",
        columns: &[
            col("id", Text),
            col("account_id", Text),
            col("name", Text),
            col("issuer", Text),
            col("json", Json),
        ],
        primary_key: &["id"],
        unique: &[&["account_id", "name"]],
        indexes: &[("trust_policies_by_issuer", &["issuer", "id"])],
    },
    Table {
        name: "templates",
        columns: &[col("id", Text), col("account_id", Text), col("name", Text), col("json", Json)],
        primary_key: &["id"],
        unique: &[&["account_id", "name"]],
        indexes: &[],
    },
    Table {
        name: "builds",
        columns: &[
            col("id", Text),
            col("template_id", Text),
            col("status", Text),
            col("created_at", Text),
            col("json", Json),
        ],
        primary_key: &["id"],
        unique: &[],
        indexes: &[("builds_by_template", &["template_id", "created_at"])],
    },
    Table {
        name: "tags",
        columns: &[
            col("template_id", Text),
            col("name", Text),
            col("build_id", Text),
            col("updated_at", Text),
        ],
        primary_key: &["template_id", "name"],
        unique: &[],
        indexes: &[],
    },
    Table {
        name: "pools",
        columns: &[
            col("id", Text),
            col("account_id", Text),
            col("name", Text),
            // Bumped by every write; a write names the revision it read (see `Store::update_pool`).
            col("rev", Int),
            col("json", Json),
        ],
        primary_key: &["id"],
        unique: &[&["account_id", "name"]],
        indexes: &[],
    },
    Table {
        name: "leases",
        columns: &[col("pool_id", Text), col("key", Text), col("json", Json)],
        primary_key: &["pool_id", "key"],
        unique: &[],
        indexes: &[],
    },
    Table {
        name: "sandboxes",
        columns: &[
            col("id", Text),
            col("account_id", Text),
            null("pool_id", Text),
            col("lifecycle", Text),
            null("claimed_from", Text),
            col("build_id", Text),
            col("state", Text),
            null("ready_at", Text),
            col("json", Json),
        ],
        primary_key: &["id"],
        unique: &[],
        indexes: &[
            ("sandboxes_by_pool", &["pool_id", "lifecycle", "ready_at"]),
            ("sandboxes_by_account", &["account_id"]),
            ("sandboxes_claimed_from", &["claimed_from"]),
        ],
    },
    // Demand: each checkout that named a pool, and each pool sandbox's start-to-ready time.
    Table {
        name: "pool_claims",
        columns: &[col("id", Text), col("pool_id", Text), col("at_ms", Int), col("hit", Bool)],
        primary_key: &["id"],
        unique: &[],
        indexes: &[("pool_claims_by_pool", &["pool_id", "at_ms"])],
    },
    Table {
        name: "pool_warmups",
        columns: &[col("sandbox_id", Text), col("pool_id", Text), col("at_ms", Int), col("warm_ms", Int)],
        primary_key: &["sandbox_id"],
        unique: &[],
        indexes: &[("pool_warmups_by_pool", &["pool_id", "at_ms"])],
    },
    Table {
        name: "health",
        columns: &[col("id", Int), col("at", Text)],
        primary_key: &["id"],
        unique: &[],
        indexes: &[],
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Kind {
    fn sql(self, dialect: Dialect) -> &'static str {
        match (self, dialect) {
            (Text, _) => "TEXT",
            (Int, Dialect::Sqlite) | (Bool, Dialect::Sqlite) => "INTEGER",
            (Json, Dialect::Sqlite) => "TEXT",
            (Int, Dialect::Postgres) => "BIGINT",
            (Bool, Dialect::Postgres) => "BOOLEAN",
            (Json, Dialect::Postgres) => "JSONB",
        }
    }
}

/// The statements that create every table and index of a new database.
pub fn create(dialect: Dialect) -> String {
    let mut sql = String::new();
    for table in TABLES {
        let mut parts: Vec<String> = table
            .columns
            .iter()
            .map(|c| {
                format!("{} {}{}", c.name, c.kind.sql(dialect), if c.nullable { "" } else { " NOT NULL" })
            })
            .collect();
        parts.push(format!("PRIMARY KEY ({})", table.primary_key.join(", ")));
        parts.extend(table.unique.iter().map(|u| format!("UNIQUE ({})", u.join(", "))));
        sql += &format!("CREATE TABLE {} ({});\n", table.name, parts.join(", "));
        for (name, columns) in table.indexes {
            sql += &format!("CREATE INDEX {name} ON {} ({});\n", table.name, columns.join(", "));
        }
    }
    sql
}

/// What a database's tables look like, in terms both stores can be compared in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape(pub BTreeMap<String, TableShape>);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableShape {
    /// Column → (kind, nullable). Primary key columns count as not nullable (SQLite allows NULL in some).
    pub columns: BTreeMap<String, (Kind, bool)>,
    pub primary_key: Vec<String>,
    pub unique: BTreeSet<Vec<String>>,
    pub indexes: BTreeMap<String, Vec<String>>,
}

impl Shape {
    /// The shape [`TABLES`] describes.
    pub fn described() -> Shape {
        let owned = |cols: &[&str]| cols.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        Shape(
            TABLES
                .iter()
                .map(|t| {
                    let shape = TableShape {
                        columns: t
                            .columns
                            .iter()
                            .map(|c| (c.name.to_string(), (c.kind, c.nullable)))
                            .collect(),
                        primary_key: owned(t.primary_key),
                        unique: t.unique.iter().map(|u| owned(u)).collect(),
                        indexes: t.indexes.iter().map(|(n, c)| (n.to_string(), owned(c))).collect(),
                    };
                    (t.name.to_string(), shape)
                })
                .collect(),
        )
    }

    /// The kind a column's declared SQL type stands for in `table` (the description says which text columns hold
    /// JSON and which integers are booleans, which SQLite's types cannot).
    pub fn kind_of(table: &str, column: &str, sql_type: &str) -> Kind {
        let described = TABLES
            .iter()
            .find(|t| t.name == table)
            .and_then(|t| t.columns.iter().find(|c| c.name == column))
            .map(|c| c.kind);
        match sql_type.to_ascii_lowercase().as_str() {
            "jsonb" | "json" => Json,
            "boolean" | "bool" => Bool,
            "bigint" | "integer" | "int" | "int8" | "int4" => match described {
                Some(Bool) => Bool,
                _ => Int,
            },
            _ => match described {
                Some(Json) => Json,
                _ => Text,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both stores' live schemas, new and upgraded from the first released version, are the described one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn both_stores_have_the_described_schema() {
        let described = Shape::described();
        let dir = tempfile::tempdir().unwrap();
        let new = super::super::sqlite::SqliteStore::open(&dir.path().join("new.db")).unwrap();
        assert_eq!(new.shape().await.unwrap(), described, "a new SQLite database");
        let old = dir.path().join("old.db");
        super::super::sqlite::create_first_version(&old);
        let upgraded = super::super::sqlite::SqliteStore::open(&old).unwrap();
        assert_eq!(upgraded.shape().await.unwrap(), described, "an upgraded SQLite database");

        let pg = warmpool_testkit::postgres::Postgres::start();
        let store = super::super::postgres::PgStore::open(&pg.database()).await.unwrap();
        assert_eq!(store.shape().await.unwrap(), described, "a new PostgreSQL database");
        let old = pg.database();
        super::super::postgres::create_first_version(&old).await;
        let upgraded = super::super::postgres::PgStore::open(&old).await.unwrap();
        assert_eq!(upgraded.shape().await.unwrap(), described, "an upgraded PostgreSQL database");
    }
}
