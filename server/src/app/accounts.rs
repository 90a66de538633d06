//! Accounts, tokens and authentication. The first start creates the `default` account and an admin token for it,
//! written to `<data-dir>/admin.token` (mode 0600). Tokens are stored as SHA-256 hashes only.

use chrono::Utc;
use sha2::{Digest, Sha256};
use warmpool_api::{
    validate_name, Account, AccountCreate, AccountId, AccountPatch, FieldError, List, TokenCreate,
    TokenCreated, TokenId,
};

use super::{new_id, not_found, App, AppError, AppResult, Caller};
use crate::store::{Credential, Page, TokenRow};

/// The admin's own account, which every server has.
pub fn default_account() -> AccountId {
    AccountId::from_suffix("default")
}

pub(super) fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_secret() -> String {
    secret_with_prefix("wp_")
}

/// 24 random bytes in hex behind `prefix` (`wp_` for tokens an admin makes, `wpt_` for exchanged ones).
pub(super) fn secret_with_prefix(prefix: &str) -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

impl App {
    /// Creates the default account and the admin token on first start; returns the token file's path.
    pub async fn bootstrap_admin(&self) -> AppResult<std::path::PathBuf> {
        let path = self.config.data_dir.join("admin.token");
        if self.store.get_account(&default_account()).await?.is_none() {
            let account = Account {
                id: default_account(),
                name: "default".into(),
                // The admin's own account: no quotas, and no host networking until an admin sets it
                // (`PATCH /v1/accounts/acc_default {"allow_host_network": true}`).
                quotas: Default::default(),
                allow_host_network: false,
                created_at: Utc::now(),
            };
            self.store.insert_account(&account).await?;
        }
        if !self.store.has_admin_token().await? || !path.exists() {
            let secret = new_secret();
            write_secret(&path, &secret)
                .map_err(|e| AppError::Internal(format!("writing {}: {e}", path.display())))?;
            self.store
                .insert_token(&TokenRow {
                    id: new_id(TokenId::from_suffix),
                    account_id: Some(default_account()),
                    name: Some("admin".into()),
                    hash: hash(&secret),
                    admin: true,
                    created_at: Utc::now(),
                    expires_at: None,
                    trust_policy: None,
                })
                .await?;
        }
        Ok(path)
    }

    pub async fn authenticate(&self, token: Option<&str>) -> AppResult<Caller> {
        let token = token.ok_or(AppError::Unauthorized)?;
        let found = self.store.credential(&hash(token), &default_account()).await?;
        let Credential { token: row, account } = found.ok_or(AppError::Unauthorized)?;
        // An exchanged token past its lifetime is refused exactly like a revoked one.
        if row.expires_at.is_some_and(|at| at <= Utc::now()) {
            return Err(AppError::Unauthorized);
        }
        Ok(Caller {
            account_id: row.account_id.unwrap_or_else(default_account),
            admin: row.admin,
            quotas: account.map(|a| a.quotas).unwrap_or_default(),
        })
    }

    pub(super) fn require_admin(caller: &Caller) -> AppResult<()> {
        if caller.admin {
            Ok(())
        } else {
            Err(AppError::Forbidden { field: None, message: "this call needs an admin token".into() })
        }
    }

    pub async fn create_account(&self, caller: &Caller, req: AccountCreate) -> AppResult<Account> {
        Self::require_admin(caller)?;
        validate_name("name", &req.name)?;
        req.quotas.validate()?;
        // A quota left out takes the server's default, so a new account never runs unbounded by accident.
        let defaults = &self.config.default_quotas;
        let quotas = warmpool_api::Quotas {
            max_sandboxes: req.quotas.max_sandboxes.or(defaults.max_sandboxes),
            max_warm_sandboxes: req.quotas.max_warm_sandboxes.or(defaults.max_warm_sandboxes),
        };
        let account = Account {
            id: new_id(AccountId::from_suffix),
            name: req.name,
            quotas,
            allow_host_network: req.allow_host_network,
            created_at: Utc::now(),
        };
        self.store.insert_account(&account).await?;
        Ok(account)
    }

    pub async fn list_accounts(&self, caller: &Caller, page: &Page) -> AppResult<List<Account>> {
        Self::require_admin(caller)?;
        super::paged(page, async |p| self.store.list_accounts(p).await, |a: &Account| &a.id, |a| a).await
    }

    pub async fn update_account(&self, caller: &Caller, id: &str, patch: AccountPatch) -> AppResult<Account> {
        Self::require_admin(caller)?;
        let mut account = self.store.get_account(id).await?.ok_or_else(|| not_found("account", id))?;
        if let Some(name) = patch.name {
            validate_name("name", &name)?;
            account.name = name;
        }
        if let Some(q) = patch.quotas {
            q.validate()?;
            account.quotas = q;
        }
        if let Some(allow) = patch.allow_host_network {
            account.allow_host_network = allow;
        }
        self.store.update_account(&account).await?;
        Ok(account)
    }

    pub async fn create_token(&self, caller: &Caller, req: TokenCreate) -> AppResult<TokenCreated> {
        Self::require_admin(caller)?;
        if self.store.get_account(&req.account_id).await?.is_none() {
            return Err(FieldError::new("account_id", format!("no account {:?}", req.account_id)).into());
        }
        let secret = new_secret();
        let row = TokenRow {
            id: new_id(TokenId::from_suffix),
            account_id: Some(req.account_id.clone()),
            name: req.name.clone(),
            hash: hash(&secret),
            admin: false,
            created_at: Utc::now(),
            expires_at: None,
            trust_policy: None,
        };
        self.store.insert_token(&row).await?;
        Ok(TokenCreated { id: row.id, token: secret, account_id: req.account_id, name: req.name })
    }

    pub async fn delete_token(&self, caller: &Caller, id: &str) -> AppResult<()> {
        Self::require_admin(caller)?;
        if self.store.delete_token(id).await? {
            Ok(())
        } else {
            Err(not_found("token", id))
        }
    }

    /// Refuses `network.mode: host` to an account an admin did not allow it (`forbidden`), before anything
    /// starts: the host's network namespace reaches every service on the host's loopback.
    pub async fn check_host_network(&self, account_id: &str) -> AppResult<()> {
        let allowed = self.store.get_account(account_id).await?.is_some_and(|a| a.allow_host_network);
        if allowed {
            return Ok(());
        }
        Err(AppError::Forbidden {
            field: Some("network.mode".into()),
            message: "network.mode \"host\" needs an account whose allow_host_network an admin set".into(),
        })
    }

    /// The account's quotas (none for unknown accounts).
    pub async fn quotas(&self, account_id: &str) -> AppResult<warmpool_api::Quotas> {
        Ok(self.store.get_account(account_id).await?.map(|a| a.quotas).unwrap_or_default())
    }
}

fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(f, "{secret}")
}
