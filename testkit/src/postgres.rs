//! A real PostgreSQL for tests: `initdb` and `pg_ctl` on a temporary directory, listening on a free loopback port,
//! stopped and removed when dropped (also when the test panics). The server binaries are found on `PATH` or under
//! `/usr/lib/postgresql/*/bin` (`scripts/host-deps.sh` installs them). As root they run as the `postgres` user:
//! `initdb` refuses root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    databases: AtomicUsize,
}

/// The directory holding `initdb`, `pg_ctl` and `createdb`.
fn server_bin_dir() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("initdb")).find(|p| p.exists()))
        .and_then(|p| p.canonicalize().ok())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .filter(|d| d.join("pg_ctl").exists() && d.join("createdb").exists());
    let mut packaged: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").exists())
        .collect();
    packaged.sort();
    on_path.or_else(|| packaged.pop()).expect(
        "the PostgreSQL server binaries (initdb, pg_ctl) are not installed: run scripts/host-deps.sh \
         (Debian: apt-get install postgresql)",
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL tool (as `postgres` when we are root); panics with its output when it fails.
fn run(bin: &Path, tool: &str, args: &[&str]) -> Output {
    let program = bin.join(tool);
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&program);
        c
    } else {
        Command::new(&program)
    };
    let out = command.args(args).current_dir("/").output().unwrap_or_else(|e| panic!("running {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

impl Postgres {
    /// Initializes and starts a new cluster (about a second).
    pub fn start() -> Postgres {
        let bin = server_bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "warmpool-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("postgres dir");
        if is_root() {
            let out = Command::new("chown").arg("postgres:").arg(&dir).output().expect("chown");
            assert!(out.status.success(), "chown postgres {}: {out:?}", dir.display());
        }
        let data = dir.join("data");
        let data = data.to_str().expect("utf-8 path");
        run(&bin, "initdb", &["-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]);
        let port = free_port();
        let options = format!(
            "-k {} -c listen_addresses=127.0.0.1 -p {port} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off",
            dir.display()
        );
        let log = dir.join("postgres.log");
        run(&bin, "pg_ctl", &["-D", data, "-l", log.to_str().expect("utf-8"), "-o", &options, "-w", "start"]);
        Postgres { dir, bin, port, databases: AtomicUsize::new(0) }
    }

    /// Runs `sql` with `psql` in database `name` (the last part of a [`Postgres::database`] URL) and returns what it
    /// printed, unaligned and without headers.
    pub fn sql(&self, name: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let out = run(
            &self.bin,
            "psql",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", name, "-XAtc", sql],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops every process of the cluster (the postmaster and its backends) with SIGSTOP, as a database that hangs
    /// would; they continue when the returned guard is dropped, even if the test fails.
    pub fn freeze(&self) -> Frozen {
        let pidfile = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).expect("postmaster.pid");
        let postmaster: i32 =
            pidfile.lines().next().and_then(|l| l.trim().parse().ok()).expect("postmaster pid");
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // The parent pid is the second field after the command name, which ends at the last ')'.
            let ppid =
                stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        for pid in &pids {
            // SAFETY: kill has no memory preconditions; these are the cluster's own processes.
            unsafe { libc::kill(*pid, libc::SIGSTOP) };
        }
        Frozen(pids)
    }

    /// Creates a new empty database and returns its URL.
    pub fn database(&self) -> String {
        let name = format!("warmpool{}", self.databases.fetch_add(1, Ordering::SeqCst));
        let port = self.port.to_string();
        run(&self.bin, "createdb", &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", &name]);
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let program = self.bin.join("pg_ctl");
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let _ = command.arg("-D").arg(&data).args(["-m", "immediate", "stop"]).current_dir("/").output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A cluster stopped by [`Postgres::freeze`]; dropping it lets the processes continue.
pub struct Frozen(Vec<i32>);

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in &self.0 {
            // SAFETY: as in `freeze`.
            unsafe { libc::kill(*pid, libc::SIGCONT) };
        }
    }
}
