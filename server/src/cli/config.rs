//! The CLI's own configuration: the endpoint and token `warmpool login` saved (and `warmpool serve` on a machine
//! that has none yet), in `$XDG_CONFIG_HOME/warmpool/config.json` (default `~/.config/warmpool/config.json`,
//! `WARMPOOL_CONFIG` overrides), mode 0600, so the CLI works from any directory.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserConfig {
    pub endpoint: String,
    pub token: String,
}

/// Where the configuration lives (None without a home directory).
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WARMPOOL_CONFIG") {
        return Some(p.into());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("warmpool").join("config.json"))
}

pub fn load() -> Option<UserConfig> {
    serde_json::from_slice(&std::fs::read(path()?).ok()?).ok()
}

/// Writes the configuration (directory 0700, file 0600, replaced atomically).
pub fn save(config: &UserConfig) -> std::io::Result<PathBuf> {
    let path = path().ok_or_else(|| std::io::Error::other("no home directory: set WARMPOOL_CONFIG"))?;
    let dir = path.parent().expect("a file path");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let part = path.with_extension("json.part");
    let mut f =
        std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&part)?;
    f.write_all(serde_json::to_string_pretty(config).expect("json").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&part, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_config_is_private_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/config.json");
        // SAFETY (test): the variable is read by this test only; no other test sets or reads it.
        unsafe { std::env::set_var("WARMPOOL_CONFIG", &file) };
        let config = UserConfig { endpoint: "http://h:7070".into(), token: "wp_x".into() };
        assert_eq!(save(&config).unwrap(), file);
        assert_eq!(load(), Some(config));
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        unsafe { std::env::remove_var("WARMPOOL_CONFIG") };
    }
}
