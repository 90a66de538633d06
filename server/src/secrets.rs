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

    /// The token procd of sandbox (or build) `id` accepts.
    pub fn procd_token(&self, id: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"procd-token:");
        mac.update(id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

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
}
