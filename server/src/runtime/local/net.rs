//! Sandbox networking on the local runtime, and the one place that decides what a sandbox may reach.
//!
//! Every container but a `host`-mode one gets a network namespace of its own, created by runc inside the
//! container's user namespace (so the container's root can bind low ports and mount its own sysfs, and nothing
//! named is left behind when it dies). Between `runc create` and `runc start` the runtime wires it from inside
//! the server with netlink (see `wire`): `lo` always, and for `isolated` a veth pair whose host end is a port of
//! the host bridge `warmpool0` and whose other end is `eth0` with an address of `10.88.0.0/16`. Addresses are
//! allocated in one host-wide directory (`/run/warmpool/ipam`, in the CNI `host-local` plugin's format), so two
//! servers on one host never hand out the same one.
//!
//! No sandbox reaches another, of any account: every sandbox's port on the bridge is an *isolated* bridge port
//! (the kernel forwards nothing between two isolated ports), set when it is wired. The rest is one nftables
//! ruleset the runtime owns (table `inet warmpool`, replaced whole and atomically at every start, so applying it
//! is idempotent and never adds a rule per sandbox):
//! - nothing from the bridge reaches the host itself (its gateway address, its other addresses, its loopback),
//!   but DNS (port 53) to the resolvers in the host's `/etc/resolv.conf`;
//! - forwarded traffic from the bridge to link-local (the cloud metadata address), private, shared, loopback,
//!   multicast and reserved ranges is dropped unless `--sandbox-allow-cidr` lists the range; the rest of the
//!   internet is reached through one masquerade rule for the whole subnet;
//! - nothing from outside starts a connection into a sandbox (nor from another sandbox, where `br_netfilter`
//!   passes bridged traffic through these chains too).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::super::RuntimeError;
use super::wire::{self, Ipam};

const BRIDGE: &str = "warmpool0";
pub const SUBNET: &str = "10.88.0.0/16";
/// The host-wide address allocations (one file per address, named by it, holding the owner).
const IPAM_DIR: &str = "/run/warmpool/ipam";
const NETWORK_NAME: &str = "warmpool";

/// Ranges a sandbox never reaches unless the operator allows them: RFC 1918, shared address space, link-local
/// (169.254.169.254 is every cloud's metadata service), loopback, "this network", multicast and reserved.
const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

pub struct Net {
    /// Ranges listed with `--sandbox-allow-cidr`.
    pub allow: Vec<String>,
}

/// How a sandbox's own namespace is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wiring {
    /// `lo` only (`network.mode: none`).
    Loopback,
    /// `lo`, and `eth0` on the bridge (`isolated`).
    Bridge,
}

impl Net {
    fn ipam() -> Ipam {
        Ipam { dir: Path::new(IPAM_DIR).join(NETWORK_NAME) }
    }

    /// Checks and normalizes `--sandbox-allow-cidr` values (`a.b.c.d/n`).
    pub fn parse_cidr(s: &str) -> Result<String, String> {
        let (addr, len) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let len: u8 =
            len.parse().ok().filter(|l| *l <= 32).ok_or_else(|| format!("bad prefix length in {s:?}"))?;
        Ok(format!("{addr}/{len}"))
    }

    /// Makes the bridge (with the gateway address) and applies the ruleset: no sandbox starts before both hold.
    pub async fn prepare(&self) -> Result<(), RuntimeError> {
        wire::ensure_bridge(BRIDGE)
            .map_err(RuntimeError::io(format!("preparing the sandbox bridge {BRIDGE}")))?;
        self.apply_firewall().await
    }

    /// Wires the namespace of the created container whose init process is `pid` (see `wire`).
    pub async fn add(&self, id: &str, pid: u32, wiring: Wiring) -> Result<(), RuntimeError> {
        if wiring == Wiring::Loopback {
            return wire::wire(pid, None, BRIDGE).await;
        }
        let owner = id.to_string();
        let address = tokio::task::spawn_blocking(move || Self::ipam().allocate(&owner, "eth0"))
            .await
            .map_err(|e| RuntimeError::Failed(format!("allocating an address: {e}")))?
            .map_err(RuntimeError::io(format!("allocating an address for {id}")))?;
        let wired = wire::wire(pid, Some((wire::port_name(), address)), BRIDGE).await;
        if wired.is_err() {
            self.remove(id).await;
        }
        wired
    }

    /// Releases the sandbox's address (idempotent). The namespace, and with it the veth pair, died with the
    /// container; nothing else was created for it.
    pub async fn remove(&self, id: &str) {
        let owner = id.to_string();
        let released = tokio::task::spawn_blocking(move || Self::ipam().release(&owner)).await;
        if let Ok(Err(e)) = released {
            tracing::warn!(sandbox = %id, error = &e as &dyn std::error::Error, "Cannot release an address");
        }
    }

    /// Releases addresses whose sandbox no longer runs on this host (a server killed before it could release
    /// them). `running` says whether a container id still has processes; allocations younger than a minute are
    /// spared (a start on another server of this host may be between allocation and its first process).
    pub async fn release_orphans(&self, running: impl Fn(&str) -> bool) {
        for (path, owner) in Self::ipam().allocations() {
            let young = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < Duration::from_secs(60)));
            if !young && !running(&owner) {
                tracing::info!(sandbox = %owner, "Releasing the address of a sandbox that no longer runs");
                self.remove(&owner).await;
            }
        }
    }

    /// Applies the ruleset (see the module doc) in one atomic `nft` transaction.
    pub async fn apply_firewall(&self) -> Result<(), RuntimeError> {
        let script = ruleset(&self.allow, &host_resolvers());
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(RuntimeError::io("running nft (Debian: apt-get install nftables)"))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(script.as_bytes()).await;
        }
        let out = child.wait_with_output().await.map_err(RuntimeError::io("nft"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(RuntimeError::Failed(format!(
                "applying the sandbox network rules failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

/// The IPv4 resolvers of the host's `/etc/resolv.conf` (sandboxes without an image read the same file).
fn host_resolvers() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

/// The nftables script: the table is declared, deleted and declared again in one transaction, so the result is
/// the same whatever was there before.
fn ruleset(allow: &[String], resolvers: &[Ipv4Addr]) -> String {
    let set = |items: Vec<String>| items.join(", ");
    let dns = if resolvers.is_empty() {
        String::new()
    } else {
        let ips = set(resolvers.iter().map(|r| r.to_string()).collect());
        format!(
            "        iifname \"{BRIDGE}\" ip daddr {{ {ips} }} udp dport 53 accept\n        iifname \"{BRIDGE}\" ip \
             daddr {{ {ips} }} tcp dport 53 accept\n"
        )
    };
    let allowed = if allow.is_empty() {
        String::new()
    } else {
        format!("        iifname \"{BRIDGE}\" ip daddr {{ {} }} accept\n", set(allow.to_vec()))
    };
    let blocked = set(BLOCKED.iter().map(|s| s.to_string()).collect());
    format!(
        "table inet warmpool {{}}
delete table inet warmpool
table inet warmpool {{
    chain input {{
        type filter hook input priority -10; policy accept;
        iifname \"{BRIDGE}\" ct state established,related accept
        iifname \"{BRIDGE}\" drop
    }}
    chain forward {{
        type filter hook forward priority -10; policy accept;
        oifname \"{BRIDGE}\" ct state established,related accept
        oifname \"{BRIDGE}\" drop
{dns}{allowed}        iifname \"{BRIDGE}\" ip daddr {{ {blocked} }} drop
        iifname \"{BRIDGE}\" meta nfproto ipv6 drop
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        ip saddr {SUBNET} oifname != \"{BRIDGE}\" masquerade
    }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_ranges_come_before_the_blocked_ones() {
        let script = ruleset(&["10.1.0.0/16".into()], &["10.255.255.53".parse().unwrap()]);
        let allow = script.find("ip daddr { 10.1.0.0/16 } accept").unwrap();
        let dns = script.find("udp dport 53 accept").unwrap();
        let block = script.find("169.254.0.0/16").unwrap();
        assert!(dns < block && allow < block, "{script}");
        assert!(script.starts_with("table inet warmpool {}\ndelete table inet warmpool"));
    }

    #[test]
    fn cidrs_are_checked() {
        assert_eq!(Net::parse_cidr("10.1.2.3/8").unwrap(), "10.1.2.3/8");
        for bad in ["10.1.2.3", "10.1.2/8", "10.1.2.3/33", "fe80::/10"] {
            assert!(Net::parse_cidr(bad).is_err(), "{bad}");
        }
    }
}
