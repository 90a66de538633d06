//! procd end to end: the real `procd` binary, its gRPC service over a Unix socket, its exit codes and its log
//! mirror.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warmpool_procd::config::Listen;
use warmpool_procd::convert;
use warmpool_procd::proto::procd_client::ProcdClient;
use warmpool_procd::proto::*;

const TOKEN: &str = "test-token";

struct Procd {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Procd {
    fn start(warm_processes: serde_json::Value, env: &[(&str, &str)]) -> Procd {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("procd.sock");
        let listen = format!("unix://{}", socket.display());
        let p = Procd::spawn(dir, &listen, warm_processes, env, None);
        wait_for(Duration::from_secs(10), || p.socket.exists());
        p
    }

    /// procd serving a listening socket this test binds and hands over as fd 3, as the local runtime does.
    fn start_inherited(warm_processes: serde_json::Value) -> Procd {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("procd.sock")).unwrap();
        Procd::spawn(dir, "fd://3", warm_processes, &[], Some(std::os::fd::OwnedFd::from(listener)))
    }

    fn spawn(
        dir: tempfile::TempDir,
        listen: &str,
        warm_processes: serde_json::Value,
        env: &[(&str, &str)],
        inherit: Option<std::os::fd::OwnedFd>,
    ) -> Procd {
        let socket = dir.path().join("procd.sock");
        std::fs::write(dir.path().join("token"), TOKEN).unwrap();
        let config = serde_json::json!({
            "listen": listen,
            "token_file": dir.path().join("token"),
            "warm_processes": warm_processes,
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let out = std::fs::File::create(dir.path().join("stdout")).unwrap();
        let err = std::fs::File::create(dir.path().join("stderr")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_procd"));
        cmd.arg("--config").arg(dir.path().join("config.json")).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(fd) = &inherit {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            // SAFETY: the hook only duplicates a descriptor (see `as_fd3`).
            unsafe { cmd.pre_exec(warmpool_procd::as_fd3(fd.as_raw_fd())) };
        }
        let child = cmd.spawn().unwrap();
        Procd { child, dir, socket }
    }

    fn client(&self) -> ProcdClient<tonic::transport::Channel> {
        warmpool_procd::connect(&Listen::Unix(self.socket.clone())).unwrap()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn stdout_lines(&self) -> Vec<serde_json::Value> {
        read_json_lines(&self.path("stdout"))
    }

    /// Waits for procd to exit and returns its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "procd did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> i32 {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Procd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("process").is_some())
        .collect()
}

fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn probe(client: &mut ProcdClient<tonic::transport::Channel>, kind: &str) -> warmpool_api::ProbeResult {
    let kind = convert::kind_to_proto(kind.parse().unwrap()).into();
    convert::probe_result_from_proto(client.probe(ProbeRequest { kind }).await.unwrap().into_inner())
}

async fn wait_probe(p: &Procd, kind: &str, status: &str, timeout: Duration) -> warmpool_api::ProbeResult {
    let mut client = p.client();
    let deadline = Instant::now() + timeout;
    loop {
        let r = probe(&mut client, kind).await;
        if r.status.as_str() == status {
            return r;
        }
        assert!(Instant::now() < deadline, "{kind} never became {status}: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An exec's streamed events, collected.
#[derive(Debug, Default)]
struct Ran {
    exit: ExecExit,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

async fn exec(
    client: &mut ProcdClient<tonic::transport::Channel>,
    req: ExecRequest,
) -> Result<Ran, tonic::Status> {
    let mut events = client.exec(warmpool_procd::authorized(req, Some(TOKEN))).await?.into_inner();
    let mut ran = Ran::default();
    let mut chunks = 0;
    while let Some(event) = events.message().await? {
        match event.event.expect("an event") {
            exec_event::Event::Output(o) => {
                chunks += 1;
                assert!(o.data.len() <= 64 * 1024, "chunks are at most 64 KiB");
                match Stream::try_from(o.stream).unwrap() {
                    Stream::Stderr => ran.stderr.extend(o.data),
                    _ => ran.stdout.extend(o.data),
                }
            }
            exec_event::Event::Exit(e) => ran.exit = e,
        }
    }
    assert!(chunks <= 1000, "{chunks} chunks");
    Ok(ran)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn http_get_readiness_becomes_ready() {
    let port = free_port();
    let mut p = Procd::start(
        serde_json::json!([{
            "name": "web", "type": "cmd",
            "command": ["python3", "-m", "http.server", port.to_string(), "--bind", "127.0.0.1"],
            "probes": {"readiness": {"http_get": {"port": port, "path": "/"}}}
        }]),
        &[],
    );
    let before = probe(&mut p.client(), "readiness").await;
    assert_eq!(before.checks[0].name, "procd", "procd's own check comes first");
    let ready = wait_probe(&p, "readiness", "passed", Duration::from_secs(15)).await;
    assert_eq!(ready.checks[1].name, "web");
    assert!(ready.checks[1].message.contains("200"), "{ready:?}");
    // The same result for humans and scripts: `procd probe` prints it as JSON and exits 0 when it passed.
    let out = Command::new(env!("CARGO_BIN_EXE_procd"))
        .args(["probe", "--listen", &format!("unix://{}", p.socket.display()), "--kind", "readiness"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((json["kind"].as_str(), json["status"].as_str()), (Some("readiness"), Some("passed")));
    assert_eq!(json["checks"][1]["name"], "web");
    assert_eq!(p.terminate(), 0, "SIGTERM is a graceful stop, not a crash");
}

#[tokio::test]
async fn warm_process_exit_makes_procd_exit_nonzero() {
    let mut p = Procd::start(
        serde_json::json!([
            {"name": "short", "type": "cmd", "command": ["sh", "-c", "echo bye; sleep 0.3; exit 0"]},
            {"name": "long", "type": "cmd", "command": ["sleep", "100"]}
        ]),
        &[],
    );
    assert_eq!(p.wait_exit(Duration::from_secs(10)), warmpool_procd::EXIT_WARM_PROCESS_EXITED);
    let lines = p.stdout_lines();
    assert!(lines.iter().any(|l| l["process"] == "short" && l["data"] == "bye"), "output flushed: {lines:?}");
}

#[tokio::test]
async fn failing_liveness_answers_then_exits() {
    let mut p = Procd::start(
        serde_json::json!([{
            "name": "app", "type": "cmd", "command": ["sleep", "100"],
            "probes": {"liveness": {"exec": {"command": ["sh", "-c", "test -f alive"]}, "initial_delay_ms": 300,
                "period_ms": 50, "failure_threshold": 2}}
        }]),
        &[],
    );
    // Inside the initial delay liveness passes.
    let early = probe(&mut p.client(), "liveness").await;
    assert_eq!(early.status.as_str(), "passed", "{early:?}");
    let failed = wait_probe(&p, "liveness", "failed", Duration::from_secs(10)).await;
    assert_eq!(failed.checks[1].reason, "exit_code", "{failed:?}");
    assert_eq!(p.wait_exit(Duration::from_secs(10)), warmpool_procd::EXIT_LIVENESS_FAILED);
}

#[tokio::test]
async fn log_mirror_lines_are_exact_and_truncated_on_utf8_boundary() {
    let mut p = Procd::start(
        serde_json::json!([{
            "name": "talker", "type": "cmd", "alias": "t",
            "command": ["sh", "-c", "printf 'héllo wörld\\nshort\\n'; printf 'to stderr\\n' >&2; printf 'partial'; exec sleep 100"]
        }]),
        &[("WARMPOOL_PROCESS_LOG_MAX_BYTES", "5")],
    );
    wait_for(Duration::from_secs(5), || p.stdout_lines().len() >= 2);
    assert_eq!(p.terminate(), 0);
    let lines = p.stdout_lines();
    let raw = std::fs::read_to_string(p.path("stdout")).unwrap();
    let first = raw.lines().find(|l| l.contains("\"process\":\"talker\"")).unwrap();
    let positions: Vec<usize> = ["ts", "process", "alias", "pid", "stream", "data", "truncated"]
        .iter()
        .map(|k| first.find(&format!("\"{k}\":")).unwrap_or_else(|| panic!("{k} missing in {first}")))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "documented field order: {first}");
    assert_eq!(lines[0]["data"], "héll", "5 bytes cut back to a character boundary");
    assert_eq!(lines[0]["truncated"], true);
    assert_eq!(lines[1]["data"], "short");
    assert!(lines[1].get("truncated").is_none());
    assert_eq!(lines[1]["alias"], "t");
    assert_eq!(lines[2]["data"], "parti", "the partial line is flushed at exit, truncated");
    let stderr = read_json_lines(&p.path("stderr"));
    assert!(stderr.iter().any(|l| l["stream"] == "stderr" && l["data"] == "to st"), "{stderr:?}");
}

#[tokio::test]
async fn log_mirror_can_be_switched_off() {
    let mut p = Procd::start(
        serde_json::json!([{"name": "talker", "type": "cmd", "command": ["sh", "-c", "echo hello; exec sleep 100"]}]),
        &[("SANDBOX0_PROCESS_LOGS", "false")],
    );
    // The ring buffer still has the output.
    let mut client = p.client();
    let req = warmpool_procd::authorized(
        ReadOutputRequest {
            process: "talker".into(),
            stream: Stream::Stdout.into(),
            offset: 0,
            follow: false,
        },
        Some(TOKEN),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut data = Vec::new();
        let mut s = client
            .read_output(warmpool_procd::authorized(req.get_ref().clone(), Some(TOKEN)))
            .await
            .unwrap()
            .into_inner();
        while let Some(chunk) = s.message().await.unwrap() {
            data.extend(chunk.data);
        }
        if data == b"hello\n" {
            break;
        }
        assert!(Instant::now() < deadline, "output never arrived: {data:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(p.terminate(), 0);
    assert!(p.stdout_lines().is_empty());
}

#[tokio::test]
async fn read_output_from_an_offset_returns_exactly_the_bytes_written() {
    let p = Procd::start(
        serde_json::json!([{"name": "w", "type": "cmd", "command": ["sh", "-c", "printf '0123456789abcdef'; exec sleep 100"]}]),
        &[],
    );
    let mut client = p.client();
    let read = |offset| ReadOutputRequest {
        process: "w".into(),
        stream: Stream::Stdout.into(),
        offset,
        follow: false,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // procd serves before its warm processes have started: until then the process is not found.
        let mut s = match client.read_output(warmpool_procd::authorized(read(10), Some(TOKEN))).await {
            Ok(s) => s.into_inner(),
            Err(e) if e.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let mut data = Vec::new();
        let mut first_offset = None;
        while let Some(chunk) = s.message().await.unwrap() {
            first_offset.get_or_insert(chunk.offset);
            data.extend(chunk.data);
        }
        if !data.is_empty() {
            assert_eq!(first_offset, Some(10));
            assert_eq!(data, b"abcdef");
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn calls_without_the_token_are_refused_but_probe_is_open() {
    let p = Procd::start(serde_json::json!([{"name": "a", "type": "cmd", "command": ["sleep", "100"]}]), &[]);
    let mut client = p.client();
    let err = client.list_processes(ListProcessesRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client
        .exec(warmpool_procd::authorized(
            ExecRequest { command: vec!["true".into()], ..Default::default() },
            Some("wrong"),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(probe(&mut client, "startup").await.kind.as_str(), "startup");
    // With the token: exec runs to completion and returns output and exit code.
    let r = exec(
        &mut client,
        ExecRequest {
            command: vec!["sh".into(), "-c".into(), "echo out; echo err >&2; exit 3".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!((r.exit.exit_code, r.stdout, r.stderr), (3, b"out\n".to_vec(), b"err\n".to_vec()));
    // Warm processes cannot be signalled through the API.
    let err = client
        .signal(warmpool_procd::authorized(
            SignalRequest { process: "a".into(), signal: Signal::Kill.into() },
            Some(TOKEN),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn exec_timeout_kills_the_process_group() {
    let p = Procd::start(serde_json::json!([{"name": "a", "type": "cmd", "command": ["sleep", "100"]}]), &[]);
    let marker = p.path("grandchild-survived");
    let script = format!("(sleep 1; touch {}) & sleep 100", marker.display());
    let r = exec(
        &mut p.client(),
        ExecRequest {
            command: vec!["sh".into(), "-c".into(), script],
            timeout_ms: 200,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(r.exit.timed_out);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!marker.exists(), "the whole process group was killed");
}

#[test]
fn invalid_config_exits_2_naming_the_field() {
    for (cwd, expected) in [
        ("/config", "warm_processes[1].cwd uses reserved path \"/config\""),
        ("relative/dir", "warm_processes[1].cwd must be an absolute path"),
        ("/procd/bin/x", "warm_processes[1].cwd uses reserved path \"/procd/bin\""),
    ] {
        let procs = serde_json::json!([
            {"type": "cmd", "command": ["true"]},
            {"type": "cmd", "command": ["true"], "cwd": cwd}
        ]);
        let out = Command::new(env!("CARGO_BIN_EXE_procd"))
            .args(["--listen", "unix:///tmp/never-used.sock"])
            .env("WARMPOOL_WARM_PROCESSES", procs.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_procd"))
        .args(["--listen", "unix:///tmp/never-used.sock"])
        .env("WARMPOOL_WARM_PROCESSES", r#"[{"type":"repl","language":"python","command":["python3"]}]"#)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("warm_processes[0].command is not allowed for type \"repl\""));
}

#[tokio::test]
async fn repl_takes_stdin() {
    let p = Procd::start(
        serde_json::json!([{"name": "sh", "type": "repl", "language": "bash"}]),
        &[("WARMPOOL_PROCESS_LOGS", "false")],
    );
    let mut client = p.client();
    client
        .write_stdin(warmpool_procd::authorized(
            WriteStdinRequest { process: "sh".into(), data: b"echo from-repl\n".to_vec(), close: false },
            Some(TOKEN),
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let req = ReadOutputRequest {
            process: "sh".into(),
            stream: Stream::Stdout.into(),
            offset: 0,
            follow: false,
        };
        let mut s =
            client.read_output(warmpool_procd::authorized(req, Some(TOKEN))).await.unwrap().into_inner();
        let mut data = Vec::new();
        while let Some(c) = s.message().await.unwrap() {
            data.extend(c.data);
        }
        if String::from_utf8_lossy(&data).contains("from-repl") {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", String::from_utf8_lossy(&data));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Nobody reads procd's stdout: the mirror drops lines (and counts them) instead of stalling the process, and the
/// ring buffer still has every byte's offset.
#[tokio::test]
async fn a_blocked_stdout_never_stalls_a_process() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("procd.sock");
    let marker = dir.path().join("done");
    let script = format!(
        "head -c 20000000 /dev/zero | tr '\\0' 'x' | fold -w 100; touch {}; exec sleep 100",
        marker.display()
    );
    let config = serde_json::json!({
        "listen": format!("unix://{}", socket.display()),
        "warm_processes": [{"name": "loud", "type": "cmd", "command": ["sh", "-c", script]}]
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    // stdout is a pipe that is never read (it fills after 64 KiB).
    let mut child = Command::new(env!("CARGO_BIN_EXE_procd"))
        .arg("--config")
        .arg(dir.path().join("config.json"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(60), || marker.exists());
    let mut client = warmpool_procd::connect(&Listen::Unix(socket.clone())).unwrap();
    let req =
        ReadOutputRequest { process: "loud".into(), stream: Stream::Stdout.into(), offset: 0, follow: false };
    let mut s = client.read_output(req).await.unwrap().into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(
        first.dropped > 0 && first.dropped == first.offset,
        "the ring kept the newest bytes and says what it dropped"
    );
    assert!(first.offset >= 20_000_000 - (1 << 20), "offsets count every byte written: {}", first.offset);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn exec_names_the_field_of_a_command_that_cannot_start_and_cuts_output_at_8_mib() {
    let p = Procd::start(serde_json::json!([{"name": "a", "type": "cmd", "command": ["sleep", "100"]}]), &[]);
    let mut client = p.client();
    let field = |status: &tonic::Status| {
        status.metadata().get(convert::FIELD_METADATA).map(|v| v.to_str().unwrap().to_string())
    };
    let missing = ExecRequest { command: vec!["/no/such/binary".into()], ..Default::default() };
    let err = exec(&mut client, missing).await.unwrap_err();
    assert_eq!(
        (err.code(), field(&err).as_deref()),
        (tonic::Code::InvalidArgument, Some("command")),
        "{err:?}"
    );
    let bad_cwd =
        ExecRequest { command: vec!["true".into()], cwd: "/no/such/dir".into(), ..Default::default() };
    let err = exec(&mut client, bad_cwd).await.unwrap_err();
    assert_eq!((err.code(), field(&err).as_deref()), (tonic::Code::InvalidArgument, Some("cwd")), "{err:?}");
    assert!(err.message().contains("/no/such/dir"), "{err:?}");
    // 20 MiB on stdout, 1 KiB on stderr: stdout is cut at exactly 8 MiB and flagged; nothing fails.
    let big = ExecRequest {
        command: vec![
            "sh".into(),
            "-c".into(),
            "head -c 20971520 /dev/zero; head -c 1024 /dev/zero >&2".into(),
        ],
        ..Default::default()
    };
    let r = exec(&mut client, big).await.unwrap();
    assert_eq!((r.stdout.len(), r.stderr.len()), (8 << 20, 1024));
    assert!(r.exit.stdout_truncated && !r.exit.stderr_truncated, "{:?}", r.exit);
    assert_eq!(r.exit.exit_code, 0);
}

#[tokio::test]
async fn watch_probe_reports_readiness_changes_as_they_happen() {
    let flags = tempfile::tempdir().unwrap();
    let flag = flags.path().join("ready");
    let p = Procd::start(
        serde_json::json!([{
            "name": "app", "type": "cmd", "command": ["sleep", "100"],
            "probes": {"readiness": {"exec": {"command": ["test", "-f", flag]}, "period_ms": 50}}
        }]),
        &[],
    );
    let mut watch = p
        .client()
        .watch_probe(ProbeRequest { kind: ProbeKind::Readiness.into() })
        .await
        .unwrap()
        .into_inner();
    async fn next(watch: &mut tonic::Streaming<ProbeResult>) -> warmpool_api::ProbeStatus {
        let r =
            tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
        convert::probe_result_from_proto(r).status
    }
    assert_eq!(next(&mut watch).await, warmpool_api::ProbeStatus::Failed);
    std::fs::write(&flag, "").unwrap();
    assert_eq!(next(&mut watch).await, warmpool_api::ProbeStatus::Passed);
    std::fs::remove_file(&flag).unwrap();
    assert_eq!(next(&mut watch).await, warmpool_api::ProbeStatus::Failed);
}

#[tokio::test]
async fn serves_an_inherited_listener_that_its_processes_never_hold() {
    let p = Procd::start_inherited(
        serde_json::json!([{"name": "a", "type": "cmd", "command": ["sleep", "100"]}]),
    );
    let r = wait_probe(&p, "readiness", "passed", Duration::from_secs(10)).await;
    assert_eq!(r.status.as_str(), "passed");
    // procd's listener is close-on-exec: a command it runs holds no socket (it could accept the server's calls).
    let r = exec(
        &mut p.client(),
        ExecRequest {
            command: vec!["sh".into(), "-c".into(), "ls -l /proc/$$/fd".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let listing = String::from_utf8_lossy(&r.stdout);
    assert_eq!(r.exit.exit_code, 0, "{listing}");
    assert!(!listing.contains("socket:"), "an exec inherited a socket:\n{listing}");
}

#[test]
fn an_inherited_descriptor_that_is_not_a_listening_unix_socket_is_refused() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::create(dir.path().join("plain")).unwrap();
    for (fd, what) in [
        (std::os::fd::OwnedFd::from(file), "is not a socket"),
        (std::os::fd::OwnedFd::from(tcp), "is not a Unix socket"),
    ] {
        let mut p =
            Procd::spawn(tempfile::tempdir().unwrap(), "fd://3", serde_json::json!([]), &[], Some(fd));
        assert_ne!(p.wait_exit(Duration::from_secs(10)), 0);
        let stderr = std::fs::read_to_string(p.path("stderr")).unwrap();
        assert!(stderr.contains(what), "{stderr}");
    }
    // Nothing inherited at all.
    let mut p = Procd::spawn(tempfile::tempdir().unwrap(), "fd://7", serde_json::json!([]), &[], None);
    assert_ne!(p.wait_exit(Duration::from_secs(10)), 0);
}

#[tokio::test]
async fn an_exec_whose_caller_goes_away_is_killed() {
    let p = Procd::start(serde_json::json!([{"name": "a", "type": "cmd", "command": ["sleep", "100"]}]), &[]);
    let mut client = p.client();
    let req = ExecRequest {
        command: vec!["sh".into(), "-c".into(), "echo $$; exec sleep 1000".into()],
        timeout_ms: 600_000,
        ..Default::default()
    };
    let mut events = client.exec(warmpool_procd::authorized(req, Some(TOKEN))).await.unwrap().into_inner();
    let first = events.message().await.unwrap().unwrap();
    let Some(exec_event::Event::Output(o)) = first.event else { panic!("{first:?}") };
    let pid: i32 = String::from_utf8_lossy(&o.data).trim().parse().unwrap();
    // SAFETY: kill with signal 0 only checks that the process exists.
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "sleep runs");
    drop(events);
    drop(client);
    // Polled on this runtime, which also runs the client's connection (it sends the reset when the call drops).
    let gone = || std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone() {
        assert!(Instant::now() < deadline, "sleep {pid} outlived its caller");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
