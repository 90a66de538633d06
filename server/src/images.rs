//! Where a template's `image` may come from, decided here and nowhere else. A tenant names the image, and the
//! server itself fetches it (skopeo connects to the registry; umoci reads a local layout), so an unchecked name
//! lets a tenant make the server connect to any address it can reach (the host's loopback services, the cloud
//! metadata address) or read any path on the host.
//!
//! - A registry reference is pulled only from a registry listed in `--allowed-registries` (default: none). A
//!   registry on a loopback, link-local or private address (an IP literal, or `localhost`) must be listed exactly,
//!   port included.
//! - A local OCI layout (an absolute path) must be under `--image-dir` once symlinks are resolved.
//!
//! Checked when a template is created or changed (400 naming `image`), and again right before the local runtime
//! pulls or unpacks (the policy may have changed since; a path may have become a symlink since).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use warmpool_api::FieldError;

/// The image sources this server accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePolicy {
    /// Registries as `host` or `host:port`.
    pub allowed_registries: Vec<String>,
    /// Local OCI layouts must be under this directory.
    pub image_dir: PathBuf,
}

/// The registry of references that name none (`python:3.12-slim`), as Docker has it.
pub const DEFAULT_REGISTRY: &str = "docker.io";

impl ImagePolicy {
    /// Refuses an image this policy does not allow, as `field`; returns what to fetch: the reference as given, or
    /// a local layout's resolved path (with its tag), so what was checked is what is read.
    pub fn check(&self, field: &str, image: &str) -> Result<String, FieldError> {
        let refuse = |why: String| FieldError::new(field, why);
        if image.starts_with('/') {
            return self.check_layout(image).map_err(refuse);
        }
        let allowed_chars = |c: char| c.is_ascii_alphanumeric() || "._-/:@[]".contains(c);
        if image.is_empty()
            || image.starts_with('-')
            || image.contains("://")
            || !image.chars().all(allowed_chars)
        {
            return Err(refuse(format!("{image:?} is neither an absolute path nor an image reference")));
        }
        // An uppercase first component is a registry host to skopeo (`LOCALHOST/x`, `Metadata/x`), where a
        // lowercase one without '.' or ':' is a Docker Hub namespace; repository names are lowercase anyway.
        let name = image.split(['@', ':']).next().unwrap_or(image);
        if name.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(refuse(format!("{image:?}: registry hosts and repository names are lowercase")));
        }
        let registry = registry_of(image);
        let host = host_of(registry);
        let listed = |entry: &str| entry == registry || (!entry.contains(':') && entry == host);
        if is_internal(host) {
            if self.allowed_registries.iter().any(|e| e == registry) {
                return Ok(image.to_string());
            }
            return Err(refuse(format!(
                "registry {registry:?} is a loopback, link-local or private address: the server pulls from it only \
                 when --allowed-registries lists it exactly"
            )));
        }
        if self.allowed_registries.iter().any(|e| listed(e)) {
            return Ok(image.to_string());
        }
        Err(refuse(format!(
            "registry {registry:?} is not in the server's --allowed-registries ({}); use a registry it lists, or a \
             local OCI layout under its --image-dir",
            if self.allowed_registries.is_empty() { "none".to_string() } else { self.allowed_registries.join(", ") }
        )))
    }

    /// `path` or `path:tag` (a tag never holds '/'), resolved, under the image dir.
    fn check_layout(&self, image: &str) -> Result<String, String> {
        let (path, tag) = match image.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')) {
            Some((path, tag)) => (path, Some(tag)),
            None => (image, None),
        };
        let outside =
            || format!("local images must be OCI layouts under the server's --image-dir (got {path:?})");
        let dir = self.image_dir.canonicalize().map_err(|_| outside())?;
        let resolved = Path::new(path).canonicalize().map_err(|_| outside())?;
        if !resolved.starts_with(&dir) || resolved == dir {
            return Err(outside());
        }
        let resolved = resolved.to_str().ok_or_else(outside)?;
        Ok(match tag {
            Some(tag) => format!("{resolved}:{tag}"),
            None => resolved.to_string(),
        })
    }
}

/// The registry part of a reference: the first component when it looks like a host (has a '.' or a ':', is
/// `localhost`, or is an IPv6 literal), else Docker Hub.
fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.starts_with('[') =>
        {
            first
        }
        _ => DEFAULT_REGISTRY,
    }
}

/// `host` of `host`, `host:port`, `[v6]` or `[v6]:port`.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    registry.rsplit_once(':').map_or(registry, |(host, _)| host)
}

/// Loopback, link-local, private, shared (CGNAT) and unspecified addresses, and `localhost` names.
fn is_internal(host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
        }
        Ok(IpAddr::V6(v6)) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_internal(&v4.to_string()))
        }
        Err(_) => false,
    }
}

static POLICY: RwLock<Option<Arc<ImagePolicy>>> = RwLock::new(None);

/// Makes `policy` the one [`before_pull`] checks (`warmpool serve` installs its flags' policy at start).
pub fn install(policy: ImagePolicy) {
    *POLICY.write().expect("image policy") = Some(Arc::new(policy));
}

/// The installed policy's verdict right before the runtime fetches `image`: what to fetch, or why not. Without an
/// installed policy nothing is fetched.
pub fn before_pull(image: &str) -> Result<String, crate::runtime::RuntimeError> {
    let policy = POLICY.read().expect("image policy").clone();
    let refused = |message: String| crate::runtime::RuntimeError::Invalid { field: "image", message };
    let policy = policy.ok_or_else(|| refused("no image policy is installed".into()))?;
    policy.check("image", image).map_err(|e| refused(e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(registries: &[&str], dir: &Path) -> ImagePolicy {
        ImagePolicy {
            allowed_registries: registries.iter().map(|s| s.to_string()).collect(),
            image_dir: dir.to_path_buf(),
        }
    }

    #[test]
    fn registries_must_be_listed_and_internal_ones_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let none = policy(&[], dir.path());
        for image in ["python:3.12-slim", "ghcr.io/org/img:tag", "127.0.0.1:5000/x", "localhost/x"] {
            assert_eq!(none.check("image", image).unwrap_err().field, "image", "{image}");
        }
        let p = policy(&["docker.io", "ghcr.io", "127.0.0.1:5000", "10.0.0.1"], dir.path());
        for image in [
            "python:3.12-slim",
            "library/python",
            "ghcr.io/org/img:tag",
            "ghcr.io:443/o/i",
            "127.0.0.1:5000/x",
        ] {
            assert_eq!(p.check("image", image).unwrap(), image);
        }
        for image in [
            "127.0.0.1:5001/x",
            "127.0.0.1/x",
            "10.0.0.1:5000/x",
            "localhost:5000/x",
            "registry.localhost/x",
            "[::1]:5000/x",
            "[fe80::1]/x",
            "LOCALHOST/x",
            "Metadata/latest",
            "REGISTRY/x:tag",
            "[::ffff:127.0.0.1]/x",
            "169.254.169.254/latest",
            "192.168.1.1/x",
            "172.16.0.1/x",
            "100.64.0.1/x",
            "0.0.0.0/x",
            "quay.io/x",
            "docker://ghcr.io/x",
            "-x",
            "a b",
            "",
        ] {
            assert!(p.check("image", image).is_err(), "{image} was allowed");
        }
    }

    #[test]
    fn local_layouts_must_be_under_the_image_dir_after_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("layouts");
        std::fs::create_dir_all(dir.join("tiny")).unwrap();
        std::fs::create_dir_all(tmp.path().join("secret")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), dir.join("escape")).unwrap();
        let p = policy(&[], &dir);
        let tiny = dir.canonicalize().unwrap().join("tiny");
        assert_eq!(
            p.check("image", &format!("{}:v1", dir.join("tiny").display())).unwrap(),
            format!("{}:v1", tiny.display())
        );
        for image in [
            format!("{}", dir.join("escape").display()),
            format!("{}/../secret", dir.display()),
            format!("{}", dir.display()),
            format!("{}", tmp.path().join("secret").display()),
            "/etc".to_string(),
            format!("{}", dir.join("missing").display()),
        ] {
            assert_eq!(p.check("image", &image).unwrap_err().field, "image", "{image} was allowed");
        }
    }
}
