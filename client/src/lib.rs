//! The typed REST client for the Warmpool control plane, used by the CLI, the Terraform provider, the GitHub
//! Action and the tests, so the wire format is written once. Errors carry the server's code and message.

mod io;

use std::time::Duration;

pub use io::{decode, ByteStream, ChannelReader, ChannelWriter, EventStream};

use reqwest::Method;
use serde::de::DeserializeOwned;
use warmpool_api::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error body.
    #[error("{code}: {message}")]
    Api { status: u16, code: String, message: String, details: serde_json::Value },
    #[error("cannot reach {endpoint}")]
    Transport {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("unexpected response from the server: {0}")]
    Decode(String),
    #[error("invalid endpoint {0:?}")]
    Endpoint(String),
    #[error("timed out after {0:?}: {1}")]
    Timeout(Duration, String),
    /// A wait that cannot succeed: the pool stopped filling for a reason that waiting does not clear.
    #[error("warm pool {pool} stopped filling ({reason}){}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    PoolStuck { pool: String, reason: String, detail: String },
}

impl Error {
    /// The API error code (`not_found`, `warm_pool_unavailable`, …), if the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone)]
pub struct Client {
    base: reqwest::Url,
    token: Option<String>,
    http: reqwest::Client,
}

/// `timeout` from now; one too long to represent waits for a year instead of overflowing.
fn deadline_after(timeout: Duration) -> std::time::Instant {
    let now = std::time::Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

impl Client {
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Client> {
        let base = reqwest::Url::parse(endpoint).map_err(|_| Error::Endpoint(endpoint.into()))?;
        if base.cannot_be_a_base() {
            return Err(Error::Endpoint(endpoint.into()));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("warmpool-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| Error::Transport { endpoint: endpoint.into(), source })?;
        Ok(Client { base, token, http })
    }

    pub fn endpoint(&self) -> &str {
        self.base.as_str()
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        {
            let mut path = url.path_segments_mut().expect("base URL");
            path.pop_if_empty();
            for s in segments {
                path.push(s);
            }
        }
        url
    }

    async fn raw(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&dyn erased::Body>,
    ) -> Result<reqwest::Response> {
        let mut req = self.http.request(method, self.url(segments));
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body.to_json());
        }
        self.send(req).await
    }

    /// Sends a request; an answer that is not a success becomes [`Error::Api`].
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req
            .send()
            .await
            .map_err(|source| Error::Transport { endpoint: self.base.to_string(), source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => {
                Error::Api { status, code: b.error.code, message: b.error.message, details: b.error.details }
            }
            Err(_) => Error::Api {
                status,
                code: "http".into(),
                message: format!("HTTP {status}: {text}"),
                details: Default::default(),
            },
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&dyn erased::Body>,
    ) -> Result<T> {
        let resp = self.raw(method, segments, &[], body).await?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| Error::Transport { endpoint: self.base.to_string(), source })?;
        let bytes: &[u8] =
            if status == reqwest::StatusCode::NO_CONTENT || bytes.is_empty() { b"{}" } else { &bytes };
        serde_json::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    /// Every item of a list, following `next_cursor` page by page (routes that do not page answer one page).
    async fn list<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<Vec<T>> {
        let limit = LIST_LIMIT_MAX.to_string();
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("limit", limit.as_str())];
            if let Some(c) = &cursor {
                query.push(("cursor", c.as_str()));
            }
            let resp = self.raw(Method::GET, segments, &query, None).await?;
            let bytes = resp
                .bytes()
                .await
                .map_err(|source| Error::Transport { endpoint: self.base.to_string(), source })?;
            let page: List<T> = serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))?;
            items.extend(page.items);
            match page.next_cursor {
                Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
                _ => return Ok(items),
            }
        }
    }

    async fn text(&self, segments: &[&str]) -> Result<String> {
        let resp = self.raw(Method::GET, segments, &[], None).await?;
        resp.text().await.map_err(|source| Error::Transport { endpoint: self.base.to_string(), source })
    }

    async fn delete(&self, segments: &[&str]) -> Result<()> {
        self.raw(Method::DELETE, segments, &[], None).await.map(|_| ())
    }

    // Health.
    pub async fn readyz(&self) -> Result<serde_json::Value> {
        self.call(Method::GET, &["readyz"], None).await
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        self.text(&["metrics"]).await
    }

    // Accounts and tokens (admin).
    pub async fn create_account(&self, req: &AccountCreate) -> Result<Account> {
        self.call(Method::POST, &["v1", "accounts"], Some(req)).await
    }
    pub async fn list_accounts(&self) -> Result<Vec<Account>> {
        self.list::<Account>(&["v1", "accounts"]).await
    }
    pub async fn update_account(&self, id: &str, patch: &AccountPatch) -> Result<Account> {
        self.call(Method::PATCH, &["v1", "accounts", id], Some(patch)).await
    }
    pub async fn create_token(&self, req: &TokenCreate) -> Result<TokenCreated> {
        self.call(Method::POST, &["v1", "tokens"], Some(req)).await
    }
    pub async fn delete_token(&self, id: &str) -> Result<()> {
        self.delete(&["v1", "tokens", id]).await
    }

    // Trust policies and the OIDC exchange.
    pub async fn create_trust_policy(&self, account: &str, req: &TrustPolicyCreate) -> Result<TrustPolicy> {
        self.call(Method::POST, &["v1", "accounts", account, "trust-policies"], Some(req)).await
    }
    pub async fn list_trust_policies(&self, account: &str) -> Result<Vec<TrustPolicy>> {
        self.list::<TrustPolicy>(&["v1", "accounts", account, "trust-policies"]).await
    }
    pub async fn get_trust_policy(&self, account: &str, id: &str) -> Result<TrustPolicy> {
        self.call(Method::GET, &["v1", "accounts", account, "trust-policies", id], None).await
    }
    pub async fn delete_trust_policy(&self, account: &str, id: &str) -> Result<()> {
        self.delete(&["v1", "accounts", account, "trust-policies", id]).await
    }
    /// Exchanges an OIDC identity token for a short-lived token (needs no token of its own).
    pub async fn exchange_oidc(&self, id_token: &str) -> Result<OidcToken> {
        let req = OidcExchange { token: id_token.to_string() };
        self.call(Method::POST, &["v1", "auth", "oidc"], Some(&req)).await
    }

    // Templates, builds, tags.
    pub async fn create_template(&self, spec: &TemplateSpec) -> Result<Template> {
        self.call(Method::POST, &["v1", "templates"], Some(spec)).await
    }
    pub async fn list_templates(&self) -> Result<Vec<Template>> {
        self.list::<Template>(&["v1", "templates"]).await
    }
    pub async fn get_template(&self, id_or_name: &str) -> Result<Template> {
        self.call(Method::GET, &["v1", "templates", id_or_name], None).await
    }
    pub async fn update_template(&self, id_or_name: &str, patch: &TemplatePatch) -> Result<Template> {
        self.call(Method::PATCH, &["v1", "templates", id_or_name], Some(patch)).await
    }
    pub async fn delete_template(&self, id_or_name: &str) -> Result<()> {
        self.delete(&["v1", "templates", id_or_name]).await
    }
    pub async fn create_build(&self, template: &str, tags: &[String]) -> Result<Build> {
        let req = BuildCreate { tags: tags.to_vec() };
        self.call(Method::POST, &["v1", "templates", template, "builds"], Some(&req)).await
    }
    /// A template's builds, oldest first (the API pages them by id).
    pub async fn list_builds(&self, template: &str) -> Result<Vec<Build>> {
        let mut builds = self.list::<Build>(&["v1", "templates", template, "builds"]).await?;
        builds.sort_by_key(|b| b.created_at);
        Ok(builds)
    }
    pub async fn get_build(&self, id: &str) -> Result<Build> {
        self.call(Method::GET, &["v1", "builds", id], None).await
    }
    pub async fn build_logs(&self, id: &str) -> Result<String> {
        self.text(&["v1", "builds", id, "logs"]).await
    }
    /// Polls a build until it is ready or failed (or `timeout`), calling `progress` on each poll.
    pub async fn wait_build(
        &self,
        id: &str,
        timeout: Duration,
        mut progress: impl FnMut(&Build),
    ) -> Result<Build> {
        let deadline = deadline_after(timeout);
        loop {
            let build = self.get_build(id).await?;
            progress(&build);
            if build.status.is_terminal() {
                return Ok(build);
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout(
                    timeout,
                    format!("build {id} is still {}", build.status.as_str()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    pub async fn put_tag(&self, template: &str, tag: &str, build_id: &BuildId) -> Result<Tag> {
        let req = TagPut { build_id: build_id.clone() };
        self.call(Method::PUT, &["v1", "templates", template, "tags", tag], Some(&req)).await
    }
    pub async fn list_tags(&self, template: &str) -> Result<Vec<Tag>> {
        self.list::<Tag>(&["v1", "templates", template, "tags"]).await
    }
    pub async fn delete_tag(&self, template: &str, tag: &str) -> Result<()> {
        self.delete(&["v1", "templates", template, "tags", tag]).await
    }

    // Warm pools.
    pub async fn create_pool(&self, spec: &WarmPoolSpec) -> Result<WarmPool> {
        self.call(Method::POST, &["v1", "template-warm-pools"], Some(spec)).await
    }
    pub async fn list_pools(&self) -> Result<Vec<WarmPool>> {
        self.list::<WarmPool>(&["v1", "template-warm-pools"]).await
    }
    pub async fn get_pool(&self, id_or_name: &str) -> Result<WarmPool> {
        self.call(Method::GET, &["v1", "template-warm-pools", id_or_name], None).await
    }
    pub async fn update_pool(&self, id_or_name: &str, patch: &WarmPoolPatch) -> Result<WarmPool> {
        self.call(Method::PATCH, &["v1", "template-warm-pools", id_or_name], Some(patch)).await
    }
    pub async fn delete_pool(&self, id_or_name: &str) -> Result<()> {
        self.delete(&["v1", "template-warm-pools", id_or_name]).await
    }
    pub async fn pool_status(&self, id_or_name: &str) -> Result<PoolStatus> {
        self.call(Method::GET, &["v1", "template-warm-pools", id_or_name, "status"], None).await
    }
    /// `enable`, `disable`, `drain` or `reconcile`.
    pub async fn pool_action(&self, id_or_name: &str, action: &str) -> Result<WarmPool> {
        self.call(Method::POST, &["v1", "template-warm-pools", id_or_name, action], None).await
    }
    pub async fn put_lease(&self, pool: &str, key: &str, spec: &LeaseSpec) -> Result<Lease> {
        self.call(Method::PUT, &["v1", "template-warm-pools", pool, "leases", key], Some(spec)).await
    }
    pub async fn release_lease(&self, pool: &str, key: &str, drain_if_last: bool) -> Result<LeaseRelease> {
        let q = [("drain_if_last", if drain_if_last { "true" } else { "false" })];
        let resp =
            self.raw(Method::DELETE, &["v1", "template-warm-pools", pool, "leases", key], &q, None).await?;
        resp.json().await.map_err(|e| Error::Decode(e.to_string()))
    }
    pub async fn list_leases(&self, pool: &str) -> Result<Vec<Lease>> {
        self.list::<Lease>(&["v1", "template-warm-pools", pool, "leases"]).await
    }
    /// Polls a pool's status until `ready >= n` (or `timeout`), calling `progress` on each poll.
    pub async fn wait_pool_ready(
        &self,
        pool: &str,
        n: u32,
        timeout: Duration,
        mut progress: impl FnMut(&PoolStatus),
    ) -> Result<PoolStatus> {
        let deadline = deadline_after(timeout);
        loop {
            let status = self.pool_status(pool).await?;
            progress(&status);
            if status.ready >= n {
                return Ok(status);
            }
            if let Some((reason, detail)) = status.stuck() {
                return Err(Error::PoolStuck { pool: pool.into(), reason: reason.into(), detail });
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout(
                    timeout,
                    format!("pool {pool} has {} of {n} ready", status.ready),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Sandboxes.
    pub async fn create_sandbox(&self, req: &SandboxCreate) -> Result<Sandbox> {
        self.call(Method::POST, &["v1", "sandboxes"], Some(req)).await
    }
    pub async fn list_sandboxes(&self) -> Result<Vec<Sandbox>> {
        self.list::<Sandbox>(&["v1", "sandboxes"]).await
    }
    pub async fn get_sandbox(&self, id: &str) -> Result<Sandbox> {
        self.call(Method::GET, &["v1", "sandboxes", id], None).await
    }
    pub async fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.delete(&["v1", "sandboxes", id]).await
    }
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult> {
        self.call(Method::POST, &["v1", "sandboxes", id, "exec"], Some(req)).await
    }
    pub async fn probe(&self, id: &str, kind: ProbeKind) -> Result<ProbeResult> {
        self.call(Method::GET, &["v1", "sandboxes", id, "probes", kind.as_str()], None).await
    }
    /// The last lines of a sandbox's mirrored output (the server's default count).
    pub async fn logs(&self, id: &str) -> Result<Vec<LogLine>> {
        self.list::<LogLine>(&["v1", "sandboxes", id, "logs"]).await
    }
    /// The last `tail` lines of a sandbox's mirrored output.
    pub async fn logs_tail(&self, id: &str, tail: u32) -> Result<Vec<LogLine>> {
        let q = [("tail", tail.to_string())];
        let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let resp = self.raw(Method::GET, &["v1", "sandboxes", id, "logs"], &q, None).await?;
        let list: List<LogLine> = resp.json().await.map_err(|e| Error::Decode(e.to_string()))?;
        Ok(list.items)
    }
}

/// `TemplateWarmPool::create(&client, spec)`: the pool resource, by the name the docs use.
pub struct TemplateWarmPool;

impl TemplateWarmPool {
    pub async fn create(client: &Client, spec: &WarmPoolSpec) -> Result<WarmPool> {
        client.create_pool(spec).await
    }
}

/// `template.create_warm_pool(&client, "api-pool", 2, 10)`: a pool of this template's newest ready build.
#[allow(async_fn_in_trait)]
pub trait TemplateExt {
    async fn create_warm_pool(
        &self,
        client: &Client,
        name: &str,
        min_ready: u32,
        max_ready: u32,
    ) -> Result<WarmPool>;
}

impl TemplateExt for Template {
    async fn create_warm_pool(
        &self,
        client: &Client,
        name: &str,
        min_ready: u32,
        max_ready: u32,
    ) -> Result<WarmPool> {
        let spec = WarmPoolSpec {
            name: name.into(),
            template: self.name.clone(),
            min_ready,
            max_ready,
            ..Default::default()
        };
        TemplateWarmPool::create(client, &spec).await
    }
}

mod erased {
    /// A serializable request body behind a trait object, so `raw` is not generic.
    pub trait Body: Sync {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize + Sync> Body for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("request bodies serialize")
        }
    }
}
