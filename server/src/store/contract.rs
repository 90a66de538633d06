//! One suite for every store: what the domain relies on, run against the embedded SQLite store and a real
//! PostgreSQL started by the test. Each test opens two handles on one database (for PostgreSQL: two replicas),
//! so races cross connections as they do in production.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;
use warmpool_api::{
    CheckoutMode, CheckoutSource, PoolState, Resources, SandboxState, TimeoutAction, TimeoutPolicy,
    VersionPolicy, WarmPool, WarmPoolCheckout,
};

use super::*;
use warmpool_testkit::typed;

/// A database and a way to open handles on it.
#[async_trait::async_trait]
pub trait Backend: Sync {
    async fn open(&self) -> Arc<dyn Store>;
}

pub struct Sqlite(tempfile::TempDir);

impl Sqlite {
    pub fn temp() -> Sqlite {
        Sqlite(tempfile::tempdir().unwrap())
    }
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(super::sqlite::SqliteStore::open(&self.0.path().join("warmpool.db")).unwrap())
    }
}

pub struct Postgres {
    _server: warmpool_testkit::postgres::Postgres,
    pub url: String,
}

impl Postgres {
    pub fn start() -> Postgres {
        let server = warmpool_testkit::postgres::Postgres::start();
        let url = server.database();
        Postgres { _server: server, url }
    }
}

#[async_trait::async_trait]
impl Backend for Postgres {
    async fn open(&self) -> Arc<dyn Store> {
        Arc::new(super::postgres::PgStore::open(&self.url).await.unwrap())
    }
}

/// Instantiates each test of the suite once per store.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
               async fn $name() { super::$name(&super::Sqlite::temp()).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
               async fn $name() { super::$name(&super::Postgres::start()).await } )*
        }
    };
}

contract!(
    concurrent_claims_never_share_a_sandbox,
    a_claim_and_a_stop_never_both_win,
    a_claim_writes_the_whole_row,
    duplicate_names_are_conflicts,
    pool_writes_never_lose_a_change,
    every_resource_round_trips,
    lists_page_in_id_order,
    demand_is_shared_counted_and_pruned,
    concurrent_claims_and_creates_never_pass_the_quota_together,
);

pub fn sandbox(id: &str, pool: &str) -> SandboxRow {
    SandboxRow {
        account_id: typed("acc_1"),
        sandbox: warmpool_api::Sandbox {
            id: typed(id),
            template: "t".into(),
            template_id: typed("tpl_1"),
            build_id: typed("bld_1"),
            state: SandboxState::Running,
            labels: Default::default(),
            created_at: Utc::now(),
            expires_at: None,
            warm_pool_checkout: None,
        },
        pool_id: Some(typed(pool)),
        lifecycle: Lifecycle::Ready,
        claimed_from: None,
        pool_generation: 0,
        ready_at: Some(Utc::now()),
        timeout_policy: None,
        claim_env: Default::default(),
        handle: Default::default(),
        error: None,
        owner: None,
    }
}

fn claim() -> ClaimUpdate {
    ClaimUpdate {
        account_id: typed("acc_1"),
        max_owned: None,
        labels: Default::default(),
        checkout: WarmPoolCheckout {
            source: CheckoutSource::WarmPool,
            hit: true,
            id: typed("twp_1"),
            mode: CheckoutMode::Require,
            waited_ms: 0,
            fallback_reason: None,
        },
        timeout_policy: None,
        expires_at: None,
        created_at: Utc::now(),
    }
}

pub fn pool(id: &str, name: &str) -> PoolRow {
    let now = Utc::now();
    PoolRow {
        account_id: typed("acc_1"),
        pool: WarmPool {
            id: typed(id),
            name: name.into(),
            template: "t".into(),
            template_id: typed("tpl_1"),
            version_policy: VersionPolicy::PinnedBuild,
            track_tag: None,
            min_ready: 1,
            max_ready: 4,
            resources: Resources::default(),
            checkout_policy: None,
            idle_timeout_seconds: None,
            labels: Default::default(),
            state: PoolState::Enabled,
            rollout_generation: 1,
            resolved_build_id: None,
            previous_build_id: None,
            created_at: now,
            updated_at: now,
            autoscale: Default::default(),
            max_starts_per_second: None,
        },
        ctl: PoolControl::default(),
        rev: 0,
    }
}

/// 64 threads on two handles claim from 20 ready sandboxes: exactly 20 succeed, each with a different sandbox.
async fn concurrent_claims_never_share_a_sandbox(db: &dyn Backend) {
    let (a, b) = (db.open().await, db.open().await);
    for i in 0..20 {
        a.insert_sandbox(&sandbox(&format!("sbx_{i:02}"), "twp_1")).await.unwrap();
    }
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { store.claim_ready("twp_1", Some("bld_1"), &claim()).await.unwrap() })
        })
        .collect();
    let mut ids = Vec::new();
    for h in handles {
        ids.extend(h.await.unwrap().map(|r| r.sandbox.id));
    }
    assert_eq!(ids.len(), 20);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    assert_eq!(a.count_sandboxes("acc_1").await.unwrap(), (20, 0));
}

/// An account at 2 of its 6 sandboxes: 40 claims and 40 creates at once, through two handles (two replicas on
/// PostgreSQL), take exactly the 4 left; the rest are refused as over the quota and write nothing.
async fn concurrent_claims_and_creates_never_pass_the_quota_together(db: &dyn Backend) {
    let (a, b) = (db.open().await, db.open().await);
    for i in 0..20 {
        a.insert_sandbox(&sandbox(&format!("sbx_p{i:02}"), "twp_1")).await.unwrap();
    }
    for i in 0..2 {
        let own = SandboxRow {
            pool_id: None,
            lifecycle: Lifecycle::Claimed,
            ..sandbox(&format!("sbx_own{i}"), "twp_1")
        };
        a.insert_sandbox(&own).await.unwrap();
    }
    let handles: Vec<_> = (0..80)
        .map(|i| {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                if i < 40 {
                    let claim = ClaimUpdate { max_owned: Some(6), ..claim() };
                    store.claim_ready("twp_1", None, &claim).await.map(|r| r.is_some())
                } else {
                    let row = SandboxRow {
                        pool_id: None,
                        lifecycle: Lifecycle::Warming,
                        ..sandbox(&format!("sbx_new{i}"), "twp_1")
                    };
                    store.insert_owned_sandbox(&row, 6).await.map(|()| true)
                }
            })
        })
        .collect();
    let (mut taken, mut refused) = (0, 0);
    for h in handles {
        match h.await.unwrap() {
            Ok(true) => taken += 1,
            Ok(false) => panic!("a claim found no ready sandbox with 20 ready"),
            Err(StoreError::OverQuota { owned, max }) => {
                assert_eq!((owned, max), (6, 6));
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((taken, refused), (4, 76));
    assert_eq!(a.count_sandboxes("acc_1").await.unwrap().0, 6);

    // A write within a quota that fails (a duplicate id) leaves its connection clean: the writes after it, on every
    // pooled connection, still count and write.
    let owned =
        |id: &str| SandboxRow { pool_id: None, lifecycle: Lifecycle::Warming, ..sandbox(id, "twp_1") };
    for _ in 0..40 {
        assert!(a.insert_owned_sandbox(&owned("sbx_own0"), 100).await.is_err());
    }
    for i in 0..20 {
        a.insert_owned_sandbox(&owned(&format!("sbx_after{i}")), 100).await.unwrap();
    }
    assert_eq!(a.count_sandboxes("acc_1").await.unwrap().0, 26);
}

/// A claim and a stop race for the same ready sandbox: exactly one of the two conditional writes wins.
async fn a_claim_and_a_stop_never_both_win(db: &dyn Backend) {
    let (a, b) = (db.open().await, db.open().await);
    for round in 0..200 {
        let id = format!("sbx_{round:03}");
        a.insert_sandbox(&sandbox(&id, "twp_1")).await.unwrap();
        let claimer = tokio::spawn({
            let a = a.clone();
            async move { a.claim_ready("twp_1", None, &claim()).await.unwrap().is_some() }
        });
        let mut draining = sandbox(&id, "twp_1");
        draining.lifecycle = Lifecycle::Draining;
        let stopped = b.update_sandbox_if(&draining, &[Lifecycle::Warming, Lifecycle::Ready]).await.unwrap();
        let claimed = claimer.await.unwrap();
        assert!(claimed != stopped, "round {round}: claimed {claimed}, stopped {stopped}");
        let stored = a.get_sandbox(&id).await.unwrap().unwrap().lifecycle;
        assert_eq!(stored, if claimed { Lifecycle::Claimed } else { Lifecycle::Draining });
    }
}

/// What a claim returns is what is stored, with every field of the claim applied and the rest kept.
async fn a_claim_writes_the_whole_row(db: &dyn Backend) {
    let store = db.open().await;
    let mut ready = sandbox("sbx_1", "twp_1");
    ready.handle.id = "sbx_1".into();
    ready.handle.socket = "/run/procd.sock".into();
    ready.owner = Some("rep_1".into());
    ready.pool_generation = 3;
    store.insert_sandbox(&ready).await.unwrap();
    let mut other_build = sandbox("sbx_0", "twp_1");
    other_build.sandbox.build_id = typed("bld_0");
    other_build.ready_at = Some(Utc::now() - chrono::Duration::seconds(60));
    store.insert_sandbox(&other_build).await.unwrap();

    let mut update = claim();
    update.account_id = typed("acc_2");
    update.labels = BTreeMap::from([("job".to_string(), "ci".to_string())]);
    update.timeout_policy = Some(TimeoutPolicy { timeout_seconds: 60, action: TimeoutAction::Pause });
    update.expires_at = Some(Utc::now() + chrono::Duration::seconds(60));
    // The resolved build first, though the other sandbox has been ready longer.
    let claimed = store.claim_ready("twp_1", Some("bld_1"), &update).await.unwrap().unwrap();
    let mut expected = ready.clone();
    expected.account_id = typed("acc_2");
    expected.pool_id = None;
    expected.lifecycle = Lifecycle::Claimed;
    expected.claimed_from = Some(typed("twp_1"));
    expected.sandbox.labels = update.labels.clone();
    expected.sandbox.warm_pool_checkout = Some(update.checkout.clone());
    expected.sandbox.created_at = update.created_at;
    expected.sandbox.expires_at = update.expires_at;
    expected.timeout_policy = update.timeout_policy.clone();
    assert_eq!(claimed, expected);
    assert_eq!(store.get_sandbox("sbx_1").await.unwrap().unwrap(), expected);
    assert_eq!(store.list_sandboxes("acc_2", &Page::ALL).await.unwrap(), vec![expected]);
    assert_eq!(store.count_sandboxes("acc_2").await.unwrap(), (1, 0));
    assert_eq!(
        store.list_pool_sandboxes("twp_1").await.unwrap().len(),
        2,
        "claimed_from keeps it the pool's"
    );
}

async fn duplicate_names_are_conflicts(db: &dyn Backend) {
    let store = db.open().await;
    let spec = warmpool_api::TemplateSpec { name: "api".into(), ..Default::default() };
    let row = |id: &str| TemplateRow {
        account_id: typed("acc_1"),
        template: warmpool_api::Template::from_spec(typed(id), spec.clone(), Utc::now(), Utc::now()),
    };
    store.insert_template(&row("tpl_1")).await.unwrap();
    assert!(matches!(store.insert_template(&row("tpl_2")).await, Err(StoreError::Conflict(_))));
    assert_eq!(store.list_templates("acc_1", &Page::ALL).await.unwrap().len(), 1);
    store.insert_pool(&pool("twp_1", "api")).await.unwrap();
    assert!(matches!(store.insert_pool(&pool("twp_2", "api")).await, Err(StoreError::Conflict(_))));
}

/// Two read-modify-writes of one pool from two handles: the second, made over a stale read, is refused, so
/// neither change is lost.
async fn pool_writes_never_lose_a_change(db: &dyn Backend) {
    let (a, b) = (db.open().await, db.open().await);
    a.insert_pool(&pool("twp_1", "api")).await.unwrap();
    let mut first = a.get_pool_by_id("twp_1").await.unwrap().unwrap();
    let mut second = b.get_pool_by_id("twp_1").await.unwrap().unwrap();
    first.pool.min_ready = 3;
    second.ctl.failed_total = 7;
    assert!(a.update_pool(&first).await.unwrap());
    assert!(!b.update_pool(&second).await.unwrap(), "a write over a stale read must be refused");
    let mut again = b.get_pool_by_id("twp_1").await.unwrap().unwrap();
    again.ctl.failed_total = 7;
    assert!(b.update_pool(&again).await.unwrap());
    let stored = a.get_pool_by_id("twp_1").await.unwrap().unwrap();
    assert_eq!((stored.pool.min_ready, stored.ctl.failed_total, stored.rev), (3, 7, 2));
    assert_eq!(a.list_pool_ids().await.unwrap(), vec!["twp_1".to_string()]);
    a.delete_pool("twp_1").await.unwrap();
    assert!(!b.update_pool(&stored).await.unwrap(), "a deleted pool is not written");
}

async fn every_resource_round_trips(db: &dyn Backend) {
    let store = db.open().await;
    let now = Utc::now();
    let account = warmpool_api::Account {
        id: typed("acc_1"),
        name: "team".into(),
        quotas: warmpool_api::Quotas { max_sandboxes: Some(50), max_warm_sandboxes: Some(50) },
        allow_host_network: true,
        created_at: now,
    };
    store.insert_account(&account).await.unwrap();
    assert_eq!(store.get_account("acc_1").await.unwrap(), Some(account.clone()));
    assert_eq!(store.list_accounts(&Page::ALL).await.unwrap(), vec![account.clone()]);
    // An admin takes host networking away again: the store keeps what was written, not a default.
    let account = warmpool_api::Account { allow_host_network: false, ..account };
    store.update_account(&account).await.unwrap();
    assert_eq!(store.get_account("acc_1").await.unwrap(), Some(account.clone()));
    assert_eq!(store.list_accounts(&Page::ALL).await.unwrap(), vec![account.clone()]);

    let token = TokenRow {
        id: typed("tok_1"),
        account_id: Some(typed("acc_1")),
        name: None,
        hash: "abc".into(),
        admin: true,
        created_at: now,
        expires_at: None,
        trust_policy: None,
    };
    assert!(!store.has_admin_token().await.unwrap());
    store.insert_token(&token).await.unwrap();
    assert!(store.has_admin_token().await.unwrap());
    let with_account = |token: &TokenRow, account: Option<&warmpool_api::Account>| {
        Some(Credential { token: token.clone(), account: account.cloned() })
    };
    assert_eq!(store.credential("abc", "acc_none").await.unwrap(), with_account(&token, Some(&account)));
    assert_eq!(store.credential("xyz", "acc_1").await.unwrap(), None);
    assert!(store.delete_token("tok_1").await.unwrap());
    assert!(!store.delete_token("tok_1").await.unwrap());
    // An exchanged token keeps its expiry and the policy it came from.
    let exchanged = TokenRow {
        id: typed("tok_2"),
        hash: "def".into(),
        admin: false,
        expires_at: Some(now + chrono::Duration::seconds(60)),
        trust_policy: Some(typed("trp_1")),
        ..token.clone()
    };
    store.insert_token(&exchanged).await.unwrap();
    assert_eq!(store.credential("def", "acc_none").await.unwrap(), with_account(&exchanged, Some(&account)));
    // A token that names no account acts for the default one, whose row may not exist.
    let unnamed = TokenRow { id: typed("tok_3"), hash: "ghi".into(), account_id: None, ..token.clone() };
    store.insert_token(&unnamed).await.unwrap();
    assert_eq!(store.credential("ghi", "acc_1").await.unwrap(), with_account(&unnamed, Some(&account)));
    assert_eq!(store.credential("ghi", "acc_none").await.unwrap(), with_account(&unnamed, None));

    let policy = |id: &str, account: &str, name: &str, issuer: &str| warmpool_api::TrustPolicy {
        id: typed(id),
        account_id: typed(account),
        name: name.into(),
        issuer: issuer.into(),
        audience: "warmpool".into(),
        claims: [("repository".to_string(), "octo/app".to_string())].into(),
        token_ttl_seconds: 900,
        created_at: now,
    };
    let gh = "https://token.actions.githubusercontent.com";
    let p1 = policy("trp_1", "acc_1", "ci", gh);
    let p2 = policy("trp_2", "acc_2", "ci", gh);
    let p3 = policy("trp_3", "acc_1", "other", "https://issuer.example");
    for p in [&p1, &p2, &p3] {
        store.insert_trust_policy(p).await.unwrap();
    }
    assert!(matches!(
        store.insert_trust_policy(&policy("trp_4", "acc_1", "ci", gh)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get_trust_policy("acc_1", "trp_1").await.unwrap(), Some(p1.clone()));
    assert_eq!(
        store.get_trust_policy("acc_2", "trp_1").await.unwrap(),
        None,
        "another account's policy is not found"
    );
    assert_eq!(store.list_trust_policies("acc_1", &Page::ALL).await.unwrap(), vec![p1.clone(), p3.clone()]);
    assert_eq!(store.trust_policies_for_issuer(gh).await.unwrap(), vec![p1.clone(), p2.clone()]);
    assert!(!store.delete_trust_policy("acc_2", "trp_1").await.unwrap());
    assert!(store.delete_trust_policy("acc_1", "trp_1").await.unwrap());
    assert_eq!(store.trust_policies_for_issuer(gh).await.unwrap(), vec![p2]);

    let build = |id: &str, status: warmpool_api::BuildStatus, at| BuildRow {
        account_id: typed("acc_1"),
        build: warmpool_api::Build {
            id: typed(id),
            template_id: typed("tpl_1"),
            status,
            tags: vec![],
            error: None,
            created_at: at,
            finished_at: None,
        },
        spec: Default::default(),
        runner: Some("rep_1".into()),
    };
    use warmpool_api::BuildStatus::*;
    store.insert_build(&build("bld_1", Ready, now - chrono::Duration::seconds(2))).await.unwrap();
    store.insert_build(&build("bld_2", Building, now - chrono::Duration::seconds(1))).await.unwrap();
    store.insert_build(&build("bld_3", Ready, now)).await.unwrap();
    assert_eq!(store.latest_ready_build("tpl_1").await.unwrap().unwrap().build.id, "bld_3");
    let building: Vec<String> = store
        .list_builds_in(&["queued", "building"])
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.build.id.into())
        .collect();
    assert_eq!(building, vec!["bld_2"]);
    let page: Vec<String> = store
        .page_builds("tpl_1", &Page { after: Some("bld_1".into()), limit: 1 })
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.build.id.into())
        .collect();
    assert_eq!(page, vec!["bld_2"], "builds page by id");
    store.update_build(&build("bld_2", Failed, now)).await.unwrap();
    assert_eq!(store.get_build("bld_2").await.unwrap().unwrap().build.status, Failed);
    assert_eq!(store.list_builds("tpl_1").await.unwrap().len(), 3);

    store.put_tag("tpl_1", "stable", "bld_1", now).await.unwrap();
    store.put_tag("tpl_1", "stable", "bld_3", now).await.unwrap();
    assert_eq!(store.get_tag("tpl_1", "stable").await.unwrap().unwrap().build_id, "bld_3");
    assert!(store.delete_tag("tpl_1", "stable").await.unwrap());
    assert!(store.list_tags("tpl_1").await.unwrap().is_empty());

    store.insert_pool(&pool("twp_1", "api")).await.unwrap();
    let lease = LeaseRow {
        account_id: typed("acc_1"),
        lease: warmpool_api::Lease {
            pool_id: typed("twp_1"),
            key: "ci/1".into(),
            count: 2,
            ttl_seconds: 60,
            expires_at: now + chrono::Duration::seconds(60),
            updated_at: now,
        },
    };
    store.put_lease(&lease).await.unwrap();
    store.put_lease(&lease).await.unwrap();
    assert_eq!(store.list_leases("twp_1").await.unwrap(), vec![lease]);
    assert!(store.delete_lease("twp_1", "ci/1").await.unwrap());

    let mut warming = sandbox("sbx_1", "twp_1");
    warming.lifecycle = Lifecycle::Warming;
    store.insert_sandbox(&warming).await.unwrap();
    assert_eq!(store.count_live_sandboxes().await.unwrap(), 1);
    assert_eq!(store.count_sandboxes("acc_1").await.unwrap(), (0, 1));
    assert!(!store.delete_sandbox_if("sbx_1", &[Lifecycle::Draining]).await.unwrap());
    assert!(store.delete_sandbox_if("sbx_1", &[Lifecycle::Warming]).await.unwrap());
    assert!(store.list_all_sandboxes().await.unwrap().is_empty());
    store.check_writable().await.unwrap();
}

/// Lists are pages keyset on id: a page holds at most `limit` rows above `after`, in id order, so a client that
/// passes the last id of a page gets the next one, whatever was inserted meanwhile.
async fn lists_page_in_id_order(db: &dyn Backend) {
    let store = db.open().await;
    for (id, name) in [("acc_c", "a"), ("acc_a", "c"), ("acc_b", "b")] {
        let account = warmpool_api::Account {
            id: typed(id),
            name: name.into(),
            quotas: Default::default(),
            allow_host_network: false,
            created_at: Utc::now(),
        };
        store.insert_account(&account).await.unwrap();
    }
    let ids = async |page: &Page| -> Vec<String> {
        store.list_accounts(page).await.unwrap().into_iter().map(|a| a.id.into()).collect()
    };
    assert_eq!(ids(&Page::ALL).await, ["acc_a", "acc_b", "acc_c"]);
    assert_eq!(ids(&Page { after: None, limit: 2 }).await, ["acc_a", "acc_b"]);
    assert_eq!(ids(&Page { after: Some("acc_b".into()), limit: 2 }).await, ["acc_c"]);
    assert!(ids(&Page { after: Some("acc_c".into()), limit: 2 }).await.is_empty());
    for (id, name) in [("twp_2", "a"), ("twp_1", "b"), ("twp_3", "c")] {
        store.insert_pool(&pool(id, name)).await.unwrap();
    }
    let pools = async |page: &Page| -> Vec<String> {
        store.page_pools("acc_1", page).await.unwrap().into_iter().map(|p| p.pool.id.into()).collect()
    };
    assert_eq!(pools(&Page { after: None, limit: 2 }).await, ["twp_1", "twp_2"]);
    assert_eq!(pools(&Page { after: Some("twp_2".into()), limit: 2 }).await, ["twp_3"]);
    assert!(store.page_pools("acc_2", &Page::ALL).await.unwrap().is_empty(), "another account's pools");
    for id in ["sbx_b", "sbx_a"] {
        store.insert_sandbox(&SandboxRow { pool_id: None, ..sandbox(id, "twp_1") }).await.unwrap();
    }
    let page = store.list_sandboxes("acc_1", &Page { after: Some("sbx_a".into()), limit: 5 }).await.unwrap();
    assert_eq!(page.into_iter().map(|s| s.sandbox.id).collect::<Vec<_>>(), ["sbx_b"]);
}

/// Claims recorded through one handle are counted through the other (replicas share demand), by window, with the
/// earliest recent one; warm-up times come back newest first; pruning keeps the window and the latest warm-ups;
/// deleting the pool forgets them.
async fn demand_is_shared_counted_and_pruned(db: &dyn Backend) {
    let (a, b) = (db.open().await, db.open().await);
    a.insert_pool(&pool("twp_d", "d")).await.unwrap();
    let now = Utc::now();
    let ago = |s: i64| now - chrono::Duration::seconds(s);
    let claims: Vec<ClaimEvent> = [(300, true), (100, false), (50, true), (10, true), (5, false)]
        .into_iter()
        .map(|(s, hit)| ClaimEvent { id: format!("clm_{s}"), pool_id: "twp_d".into(), at: ago(s), hit })
        .chain([ClaimEvent { id: "clm_o".into(), pool_id: "twp_other".into(), at: ago(1), hit: true }])
        .collect();
    a.record_claims(&claims).await.unwrap();
    for (i, s) in [3.0, 1.0, 2.0].into_iter().enumerate() {
        a.record_warmup("twp_d", &format!("sbx_{i}"), ago(30 - i as i64), s).await.unwrap();
    }
    let sample = b.demand_sample("twp_d", ago(200), ago(60), 10).await.unwrap();
    assert_eq!((sample.claims, sample.hits, sample.recent_claims), (4, 2, 3));
    let last = sample.last_claim_at.unwrap();
    assert!((last - ago(5)).num_milliseconds().abs() <= 1, "{last} vs {}", ago(5));
    let first = sample.recent_first_at.unwrap();
    assert!((first - ago(50)).num_milliseconds().abs() <= 1, "{first} vs {}", ago(50));
    assert_eq!(sample.warm_seconds, vec![2.0, 1.0, 3.0]);
    assert_eq!(b.demand_sample("twp_d", ago(200), ago(60), 2).await.unwrap().warm_seconds, vec![2.0, 1.0]);

    b.prune_demand("twp_d", ago(75), 2).await.unwrap();
    let pruned = a.demand_sample("twp_d", ago(1000), ago(1000), 10).await.unwrap();
    assert_eq!((pruned.claims, pruned.hits), (3, 2));
    assert_eq!(pruned.warm_seconds, vec![2.0, 1.0]);
    assert_eq!(a.demand_sample("twp_other", ago(1000), ago(1000), 10).await.unwrap().claims, 1);

    a.delete_pool("twp_d").await.unwrap();
    assert_eq!(b.demand_sample("twp_d", ago(1000), ago(1000), 10).await.unwrap(), DemandSample::default());
}
