//! Wiring a sandbox's network namespace from inside the server, with a handful of netlink messages instead of the
//! CNI `loopback`, `bridge` and `host-local` plugin processes and an `ip` process per sandbox (five processes, a
//! Go runtime each: most of a start's cost that was not runc's own).
//!
//! What a sandbox gets is what the plugins gave it: `lo` up; a veth pair whose host end is a port of the
//! `warmpool0` bridge, made *isolated* before the container starts, and whose other end is `eth0` in the sandbox's
//! namespace with the next free address of `10.88.0.0/16` and a default route through the bridge's `10.88.0.1`.
//! Addresses are allocated as `host-local` allocates them, in the same host-wide directory and under the same
//! lock (`<dir>/lock`, `flock`), one file per address naming its owner, so servers of either kind on one host
//! never hand out the same address, and an address is released by its owner's id.
//!
//! The namespace belongs to the container's user namespace (runc made it); the server, root of the host's, may
//! enter it. Work inside it runs on a thread of its own that ends afterwards (a thread's network namespace is its
//! own; a pooled thread must never keep one).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::super::RuntimeError;

/// The gateway: the bridge's own address.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const PREFIX_LEN: u8 = 16;

// Netlink (`linux/netlink.h`, `linux/rtnetlink.h`, `linux/if_link.h`, `linux/veth.h`).
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;

/// One netlink request being built: a header, a fixed part, then attributes (nested ones through `nest`).
struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Message {
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Message {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `bytes`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
        buf.extend_from_slice(fixed);
        Message { buf, nests: Vec::new() }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    fn name(&mut self, kind: u16, name: &str) -> &mut Self {
        let mut bytes = name.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes)
    }

    fn nest(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.attr(kind | NLA_F_NESTED, &[])
    }

    /// Raw bytes inside the innermost open nest (a fixed part, as `VETH_INFO_PEER` has).
    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    fn end(&mut self) -> &mut Self {
        let start = self.nests.pop().expect("an open nest");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    fn bytes(&mut self) -> &[u8] {
        assert!(self.nests.is_empty(), "unclosed nest");
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        &self.buf
    }
}

/// `struct ifinfomsg`: a link by index (0: by `IFLA_IFNAME`), with flags to change.
fn ifinfomsg(index: i32, up: bool) -> Vec<u8> {
    let mut b = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    b.extend_from_slice(&index.to_ne_bytes());
    let flags = if up { libc::IFF_UP as u32 } else { 0 };
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes()); // change: only what is set
    b
}

/// A netlink route socket in the calling thread's network namespace.
struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> std::io::Result<Netlink> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
        Ok(Netlink { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Sends a request and waits for its acknowledgement (the kernel's error, if any).
    fn call(&self, message: &mut Message) -> std::io::Result<()> {
        let bytes = message.bytes();
        // SAFETY: sends `bytes`, alive for the call, on an open socket (to the kernel: no address needed).
        if unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut reply = [0u8; 8192];
        loop {
            // SAFETY: receives into `reply`, a buffer of the given length alive for the call.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let reply = &reply[..n as usize];
            if reply.len() < 20 {
                return Err(std::io::Error::other("short netlink reply"));
            }
            let kind = u16::from_ne_bytes([reply[4], reply[5]]);
            if kind == NLMSG_ERROR {
                let code = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
                return if code == 0 { Ok(()) } else { Err(std::io::Error::from_raw_os_error(-code)) };
            }
        }
    }
}

/// The index of interface `name` in the calling thread's network namespace.
fn index(name: &str) -> std::io::Result<i32> {
    let c =
        std::ffi::CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a NUL-terminated name alive for the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        i => Ok(i as i32),
    }
}

/// Wires the namespace of the container whose init is `pid`: `lo` up, and for a bridge port a veth pair named
/// `host_port` (host end, on `bridge`, isolated) and `eth0` (inside, `address`/16, default route to the gateway).
/// Runs on a thread of its own (it enters the namespace).
pub async fn wire(
    pid: u32,
    bridge_port: Option<(String, Ipv4Addr)>,
    bridge: &'static str,
) -> Result<(), RuntimeError> {
    let netns = File::open(format!("/proc/{pid}/ns/net"))
        .map_err(RuntimeError::io(format!("opening the network namespace of process {pid}")))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("warmpool-wire".into())
        .spawn(move || {
            let _ = tx.send(wire_on_this_thread(&netns, bridge_port.as_ref(), bridge));
        })
        .map_err(RuntimeError::io("starting the wiring thread"))?;
    rx.await.map_err(|_| RuntimeError::Failed("the wiring thread ended without an answer".into()))?
}

fn wire_on_this_thread(
    netns: &File,
    bridge_port: Option<&(String, Ipv4Addr)>,
    bridge: &str,
) -> Result<(), RuntimeError> {
    let io = |what: &str| RuntimeError::io(what.to_string());
    if let Some((port, _)) = bridge_port {
        let host = Netlink::open().map_err(io("opening a netlink socket"))?;
        let master = index(bridge).map_err(io("finding the sandbox bridge"))?;
        // One message: the pair, its host end up on the bridge, its other end as eth0 in the sandbox (brought up
        // in there: a veth end cannot come up before its peer exists).
        let mut create = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &ifinfomsg(0, true));
        create
            .name(IFLA_IFNAME, port)
            .attr(IFLA_MASTER, &(master as u32).to_ne_bytes())
            .nest(IFLA_LINKINFO)
            .name(IFLA_INFO_KIND, "veth")
            .nest(IFLA_INFO_DATA)
            .nest(VETH_INFO_PEER)
            .raw(&ifinfomsg(0, false))
            .name(IFLA_IFNAME, "eth0")
            .attr(IFLA_NET_NS_FD, &(netns.as_raw_fd() as u32).to_ne_bytes())
            .end()
            .end()
            .end();
        host.call(&mut create).map_err(io("creating the sandbox's veth pair"))?;
        // The kernel forwards nothing between two isolated ports: no sandbox reaches another.
        std::fs::write(format!("/sys/class/net/{port}/brport/isolated"), "1")
            .map_err(io("isolating the sandbox's bridge port"))?;
    }
    // SAFETY: setns(2) on an open namespace descriptor; it changes this thread only, which ends after this call.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io("entering the sandbox's network namespace")(std::io::Error::last_os_error()));
    }
    let inside = Netlink::open().map_err(io("opening a netlink socket in the sandbox's namespace"))?;
    let lo = index("lo").map_err(io("finding lo"))?;
    inside.call(&mut Message::new(RTM_NEWLINK, 0, &ifinfomsg(lo, true))).map_err(io("bringing lo up"))?;
    if let Some((_, address)) = bridge_port {
        let eth0 = index("eth0").map_err(io("finding eth0"))?;
        let mut ifaddrmsg = vec![libc::AF_INET as u8, PREFIX_LEN, 0, 0];
        ifaddrmsg.extend_from_slice(&(eth0 as u32).to_ne_bytes());
        let mut add = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &ifaddrmsg);
        add.attr(IFA_LOCAL, &address.octets()).attr(IFA_ADDRESS, &address.octets());
        inside.call(&mut add).map_err(io("addressing eth0"))?;
        inside
            .call(&mut Message::new(RTM_NEWLINK, 0, &ifinfomsg(eth0, true)))
            .map_err(io("bringing eth0 up"))?;
        // rtmsg: the default route (dst_len 0) of the main table, through the gateway on eth0.
        let rtmsg = [libc::AF_INET as u8, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNICAST, 0, 0, 0, 0];
        let mut route = Message::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &rtmsg);
        route.attr(RTA_GATEWAY, &GATEWAY.octets()).attr(RTA_OIF, &(eth0 as u32).to_ne_bytes());
        inside.call(&mut route).map_err(io("routing eth0"))?;
    }
    Ok(())
}

/// Makes the bridge `name` (if missing), gives it the gateway address and brings it up, and lets the host
/// forward (what the CNI `bridge` plugin with `isGateway` did at every add). Idempotent; in the calling thread's
/// namespace, the host's.
pub fn ensure_bridge(name: &str) -> std::io::Result<()> {
    let host = Netlink::open()?;
    let mut create = Message::new(RTM_NEWLINK, NLM_F_CREATE, &ifinfomsg(0, true));
    create.name(IFLA_IFNAME, name).nest(IFLA_LINKINFO).name(IFLA_INFO_KIND, "bridge").end();
    match host.call(&mut create) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
        _ => {}
    }
    let bridge = index(name)?;
    let mut ifaddrmsg = vec![libc::AF_INET as u8, PREFIX_LEN, 0, 0];
    ifaddrmsg.extend_from_slice(&(bridge as u32).to_ne_bytes());
    let mut add = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &ifaddrmsg);
    add.attr(IFA_LOCAL, &GATEWAY.octets()).attr(IFA_ADDRESS, &GATEWAY.octets());
    match host.call(&mut add) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
        _ => {}
    }
    host.call(&mut Message::new(RTM_NEWLINK, 0, &ifinfomsg(bridge, true)))?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
}

/// A host end name for sandbox `id`'s veth pair: unique enough on a host (random), within the 15 bytes a name
/// may have.
pub fn port_name() -> String {
    format!("wp{:08x}", rand::random::<u32>())
}

/// Address allocation compatible with the CNI `host-local` plugin's disk store: in `dir`, one file per address
/// (named by it, holding `<owner>\r\n<ifname>`), `last_reserved_ip.0` for round-robin, all under `flock(lock)`.
pub struct Ipam {
    pub dir: PathBuf,
}

impl Ipam {
    fn locked<T>(&self, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        std::fs::create_dir_all(&self.dir)?;
        let lock = File::options().create(true).truncate(false).write(true).open(self.dir.join("lock"))?;
        // SAFETY: flock on an open descriptor; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        f()
    }

    /// Reserves the next free address after the last one reserved (the gateway and the subnet's network and
    /// broadcast addresses are never handed out).
    pub fn allocate(&self, owner: &str, ifname: &str) -> std::io::Result<Ipv4Addr> {
        self.locked(|| {
            let last_file = self.dir.join("last_reserved_ip.0");
            let last =
                std::fs::read_to_string(&last_file).ok().and_then(|s| s.trim().parse::<Ipv4Addr>().ok());
            let first = u32::from(GATEWAY) + 1;
            let end = u32::from(GATEWAY) - 1 + (1 << (32 - PREFIX_LEN)) - 2; // 10.88.255.254
            let count = end - first + 1;
            let start =
                last.map(u32::from).filter(|l| (first..=end).contains(l)).map_or(0, |l| l - first + 1);
            for i in 0..count {
                let address = Ipv4Addr::from(first + (start + i) % count);
                let path = self.dir.join(address.to_string());
                match File::options().write(true).create_new(true).open(&path) {
                    Ok(mut f) => {
                        f.write_all(format!("{owner}\r\n{ifname}").as_bytes())?;
                        let mut last =
                            File::options().create(true).truncate(true).write(true).open(&last_file)?;
                        last.write_all(address.to_string().as_bytes())?;
                        return Ok(address);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(std::io::Error::other(format!("no free address left in {}", self.dir.display())))
        })
    }

    /// Releases every address `owner` holds (idempotent).
    pub fn release(&self, owner: &str) -> std::io::Result<()> {
        self.locked(|| {
            for (path, holder) in self.allocations() {
                if holder == owner {
                    std::fs::remove_file(&path)?;
                }
            }
            Ok(())
        })
    }

    /// Every allocation: the address file and its owner.
    pub fn allocations(&self) -> Vec<(PathBuf, String)> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok())
            .filter_map(|e| Some((e.path(), owner(&e.path())?)))
            .collect()
    }
}

fn owner(path: &Path) -> Option<String> {
    let mut text = String::new();
    let mut f = File::open(path).ok()?;
    f.rewind().ok()?;
    f.read_to_string(&mut text).ok()?;
    Some(text.lines().next()?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_handed_out_once_round_robin_and_released_by_owner() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam { dir: dir.path().join("warmpool") };
        let a = ipam.allocate("sbx_a", "eth0").unwrap();
        let b = ipam.allocate("sbx_b", "eth0").unwrap();
        assert_eq!((a, b), (Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 3)));
        assert_eq!(std::fs::read_to_string(ipam.dir.join("10.88.0.2")).unwrap(), "sbx_a\r\neth0");
        ipam.release("sbx_a").unwrap();
        // Round robin: a released address is not handed out again at once.
        assert_eq!(ipam.allocate("sbx_c", "eth0").unwrap(), Ipv4Addr::new(10, 88, 0, 4));
        let owners: Vec<String> = ipam.allocations().into_iter().map(|(_, o)| o).collect();
        assert!(owners.contains(&"sbx_b".to_string()) && !owners.contains(&"sbx_a".to_string()));
        // The range wraps after 10.88.255.254, past the gateway.
        std::fs::write(ipam.dir.join("last_reserved_ip.0"), "10.88.255.254").unwrap();
        assert_eq!(ipam.allocate("sbx_d", "eth0").unwrap(), Ipv4Addr::new(10, 88, 0, 2));
    }

    #[test]
    fn nested_attributes_carry_their_length() {
        let mut m = Message::new(RTM_NEWLINK, 0, &ifinfomsg(0, true));
        m.nest(IFLA_LINKINFO).name(IFLA_INFO_KIND, "veth").end();
        let bytes = m.bytes().to_vec();
        assert_eq!(u32::from_ne_bytes(bytes[..4].try_into().unwrap()) as usize, bytes.len());
        // header 16 + ifinfomsg 16, then the nest: 4 + ("veth\0" padded to 8 + 4).
        assert_eq!(u16::from_ne_bytes([bytes[32], bytes[33]]), 16);
        assert_eq!(bytes.len(), 48);
    }
}
