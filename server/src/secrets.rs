//! The server's secret key (`<data-dir>/secret.key`, mode 0600) and what is derived from it. procd tokens are
//! never stored: each is `HMAC-SHA256(key, sandbox id)`, computed when the runtime starts procd and when the server
//! calls it, so the database holds nothing that lets a reader talk to a sandbox. Replicas sharing a data dir share
//! the key.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub struct Secrets {
    key: Vec<u8>,
}

impl Secrets {
    /// Reads the key, or creates it (32 random bytes) on first start.
    pub fn load_or_create(path: &Path) -> std::io::Result<Secrets> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let key = hex::decode(text.trim()).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
                })?;
                Ok(Secrets { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use rand::RngCore;
                let mut key = vec![0u8; 32];
                rand::thread_rng().fill_bytes(&mut key);
                let mut f =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
                f.write_all(hex::encode(&key).as_bytes())?;
                f.sync_all()?;
                Ok(Secrets { key })
            }
            Err(e) => Err(e),
        }
    }

    /// A fixed key, for tests.
    pub fn from_key(key: &[u8]) -> Secrets {
        Secrets { key: key.to_vec() }
    }

    fn mac(&self, purpose: &[u8], text: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(purpose);
        mac.update(text.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The token procd of sandbox (or build) `id` accepts.
    pub fn procd_token(&self, id: &str) -> String {
        self.mac(b"procd-token:", id)
    }

    /// A token that downloads build `build_id`'s artifact, and nothing else, until `expires` (Unix seconds):
    /// `wpa_<build>.<expires>.<mac>`. Handed to the init container that unpacks the artifact into a new pod.
    pub fn artifact_token(&self, build_id: &str, expires: i64) -> String {
        let claim = format!("{build_id}.{expires}");
        format!("{ARTIFACT_TOKEN_PREFIX}{claim}.{}", self.mac(b"artifact-token:", &claim))
    }

    /// Whether `token` is an unexpired artifact token of `build_id`.
    pub fn check_artifact_token(&self, token: &str, build_id: &str, now: i64) -> bool {
        let Some((claim, mac)) = token.strip_prefix(ARTIFACT_TOKEN_PREFIX).and_then(|t| t.rsplit_once('.'))
        else {
            return false;
        };
        let Some((build, expires)) = claim.rsplit_once('.') else { return false };
        let expected = self.mac(b"artifact-token:", claim);
        build == build_id
            && expires.parse::<i64>().is_ok_and(|e| e >= now)
            && expected.len() == mac.len()
            && expected.bytes().zip(mac.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// How artifact tokens start (so the API tells them from account tokens).
pub const ARTIFACT_TOKEN_PREFIX: &str = "wpa_";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_per_sandbox_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let a = Secrets::load_or_create(&path).unwrap();
        let b = Secrets::load_or_create(&path).unwrap();
        assert_eq!(a.procd_token("sbx_1"), b.procd_token("sbx_1"));
        assert_ne!(a.procd_token("sbx_1"), a.procd_token("sbx_2"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn artifact_tokens_name_one_build_and_expire() {
        let s = Secrets::from_key(b"k");
        let t = s.artifact_token("bld_1", 100);
        assert!(s.check_artifact_token(&t, "bld_1", 100));
        assert!(!s.check_artifact_token(&t, "bld_1", 101), "expired");
        assert!(!s.check_artifact_token(&t, "bld_2", 50), "another build");
        assert!(!s.check_artifact_token(&t.replace(".100.", ".999."), "bld_1", 50), "extended by hand");
        assert!(!Secrets::from_key(b"other").check_artifact_token(&t, "bld_1", 50), "another server's key");
    }
}
