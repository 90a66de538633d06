//! Talking to procd, the same on every runtime: one gRPC client per address (a Unix socket on the local runtime, the
//! pod IP on Kubernetes), every call but the probes carrying the sandbox's token.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use tonic::transport::Channel;
use warmpool_api::{
    ExecRequest, ExecResult, ProbeKind, ProbeResult, ProbeStatus, TemplateSpec, EXEC_OUTPUT_LIMIT,
};
use warmpool_procd::config::Listen;
use warmpool_procd::convert;
use warmpool_procd::proto::procd_client::ProcdClient;
use warmpool_procd::proto::{self, exec_event};

use super::{RuntimeError, RuntimeHandle, WORKSPACE};
use crate::secrets::Secrets;

/// How long a build step may run.
const BUILD_STEP_TIMEOUT_MS: u64 = 60 * 60 * 1000;
/// A build log's size, at most: the steps' output past it is left out (the steps still run), and a line says so.
pub const BUILD_LOG_MAX: u64 = 16 << 20;
/// An exec's timeout when the request names none.
const DEFAULT_EXEC_TIMEOUT_MS: u64 = 60_000;
/// How long past its timeout an exec may take to answer (procd kills the command at the timeout, then drains its
/// pipes and sends up to 8 MiB per stream).
const EXEC_GRACE: Duration = Duration::from_secs(5);

pub struct Procd {
    secrets: Arc<Secrets>,
    clients: Mutex<HashMap<String, ProcdClient<Channel>>>,
}

impl Procd {
    pub fn new(secrets: Arc<Secrets>) -> Procd {
        Procd { secrets, clients: Default::default() }
    }

    /// The token procd of sandbox (or build) `id` accepts.
    pub fn token(&self, id: &str) -> String {
        self.secrets.procd_token(id)
    }

    fn authorized<T>(&self, id: &str, message: T) -> tonic::Request<T> {
        warmpool_procd::authorized(message, Some(&self.token(id)))
    }

    fn client(&self, at: &Listen) -> Result<ProcdClient<Channel>, RuntimeError> {
        let key = at.to_string();
        let mut clients = self.clients.lock().expect("clients");
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let client = warmpool_procd::connect(at).map_err(|e| RuntimeError::Unreachable(e.to_string()))?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// An authorized connection to procd of sandbox `id` at `at`, for the sandbox I/O routes.
    pub fn connection(&self, id: &str, at: &Listen) -> Result<ProcdConn, RuntimeError> {
        Ok(ProcdConn { client: self.client(at)?, token: self.token(id) })
    }

    /// Drops the cached client of an address that is going away.
    pub fn forget(&self, at: &Listen) {
        self.clients.lock().expect("clients").remove(&at.to_string());
    }

    pub async fn exec(
        &self,
        id: &str,
        at: &Listen,
        req: ExecRequest,
        base_cwd: Option<&str>,
        env: BTreeMap<String, String>,
    ) -> Result<ExecResult, RuntimeError> {
        let base = Path::new(base_cwd.unwrap_or(WORKSPACE));
        let cwd = match req.cwd.as_deref() {
            Some(c) => base.join(c),
            None => base.to_path_buf(),
        };
        let mut full_env = env;
        full_env.extend(req.env.unwrap_or_default());
        let timeout_ms = req.timeout_ms.unwrap_or(DEFAULT_EXEC_TIMEOUT_MS);
        let msg = proto::ExecRequest {
            command: req.command,
            cwd: cwd.display().to_string(),
            env: full_env.into_iter().collect(),
            timeout_ms,
            stdin: req.stdin.unwrap_or_default().into_bytes(),
            unlimited: false,
        };
        // procd ends the command at its timeout; a procd that does not answer by then (frozen, wedged) must not
        // keep the caller waiting forever.
        let bound = Duration::from_millis(timeout_ms) + EXEC_GRACE;
        match tokio::time::timeout(bound, self.exec_call(id, at, msg)).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(sandbox = %id, timeout_ms, "procd did not answer an exec in time");
                Err(RuntimeError::Unreachable(format!(
                    "procd did not answer within {} ms (the command's timeout plus {} s)",
                    bound.as_millis(),
                    EXEC_GRACE.as_secs()
                )))
            }
        }
    }

    async fn exec_call(
        &self,
        id: &str,
        at: &Listen,
        msg: proto::ExecRequest,
    ) -> Result<ExecResult, RuntimeError> {
        let mut client = self.client(at)?;
        let mut events = client.exec(self.authorized(id, msg)).await.map_err(exec_error)?.into_inner();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut exit = None;
        while let Some(event) = events.message().await.map_err(unreachable)? {
            match event.event {
                Some(exec_event::Event::Output(o)) => {
                    let buf = match convert::stream_from_proto(o.stream) {
                        Some(warmpool_procd::output::StreamName::Stderr) => &mut stderr,
                        _ => &mut stdout,
                    };
                    // procd already cuts each stream; this only guards the server's memory.
                    let room = EXEC_OUTPUT_LIMIT.saturating_sub(buf.len());
                    buf.extend_from_slice(&o.data[..o.data.len().min(room)]);
                }
                Some(exec_event::Event::Exit(e)) => exit = Some(e),
                None => {}
            }
        }
        let exit =
            exit.ok_or_else(|| RuntimeError::Unreachable("procd ended the exec without an exit".into()))?;
        Ok(ExecResult {
            exit_code: exit.exit_code,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            stdout_truncated: exit.stdout_truncated,
            stderr_truncated: exit.stderr_truncated,
            duration_ms: exit.duration_ms,
            timed_out: exit.timed_out,
        })
    }

    pub async fn probe(&self, at: &Listen, kind: ProbeKind) -> Result<ProbeResult, RuntimeError> {
        let mut client = self.client(at)?;
        let msg = proto::ProbeRequest { kind: convert::kind_to_proto(kind).into() };
        let r = client.probe(msg).await.map_err(unreachable)?;
        Ok(convert::probe_result_from_proto(r.into_inner()))
    }

    /// Whether readiness passes now (or procd answers at all, for a sandbox without warm processes); the
    /// message says why not.
    pub async fn ready(&self, at: &Listen, handle: &RuntimeHandle) -> Result<bool, String> {
        match self.probe(at, ProbeKind::Readiness).await {
            Ok(r) if r.status == ProbeStatus::Passed => Ok(true),
            Ok(_) if !handle.has_warm_processes => Ok(true),
            Ok(r) => Err(r.message),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn watch_readiness(
        &self,
        at: &Listen,
    ) -> Result<BoxStream<'static, ProbeStatus>, RuntimeError> {
        let mut client = self.client(at)?;
        let msg = proto::ProbeRequest { kind: convert::kind_to_proto(ProbeKind::Readiness).into() };
        let stream = client.watch_probe(msg).await.map_err(unreachable)?.into_inner();
        Ok(stream
            .take_while(|r| std::future::ready(r.is_ok()))
            .filter_map(|r| std::future::ready(r.ok().map(|r| convert::probe_result_from_proto(r).status)))
            .boxed())
    }

    pub async fn pause(&self, id: &str, at: &Listen, paused: bool) -> Result<(), RuntimeError> {
        let mut client = self.client(at)?;
        client.pause(self.authorized(id, proto::PauseRequest { paused })).await.map_err(unreachable)?;
        Ok(())
    }

    /// Writes `path` inside the sandbox as a zstd tar to `out` (through `out.part`, so `out` is whole or absent).
    pub async fn archive(&self, id: &str, at: &Listen, path: &str, out: &Path) -> Result<u64, RuntimeError> {
        use tokio::io::AsyncWriteExt;
        let part = out.with_extension("part");
        let io = |what: &str| RuntimeError::io(format!("{what} {}", part.display()));
        let mut client = self.client(at)?;
        let msg = proto::ArchiveRequest { path: path.to_string() };
        let mut chunks = client.archive(self.authorized(id, msg)).await.map_err(unreachable)?.into_inner();
        let mut file = tokio::fs::File::create(&part).await.map_err(io("creating"))?;
        let mut size = 0;
        while let Some(chunk) = chunks
            .message()
            .await
            .map_err(|s| RuntimeError::Failed(format!("packing {path} in {id}: {}", s.message())))?
        {
            size += chunk.data.len() as u64;
            file.write_all(&chunk.data).await.map_err(io("writing"))?;
        }
        file.sync_all().await.map_err(io("syncing"))?;
        tokio::fs::rename(&part, out).await.map_err(io("renaming"))?;
        Ok(size)
    }

    /// Runs a template's build steps one after another in a build sandbox, appending their output to `log`.
    pub async fn run_steps(
        &self,
        build_id: &str,
        at: &Listen,
        spec: &TemplateSpec,
        log: &Path,
    ) -> Result<(), RuntimeError> {
        let mut log_file =
            CappedLog::open(log, BUILD_LOG_MAX).map_err(RuntimeError::io("opening the build log"))?;
        let mut env = spec.build.env.clone();
        env.insert("WARMPOOL_BUILD_ID".into(), build_id.into());
        env.insert("WARMPOOL_SANDBOX_ID".into(), build_id.into());
        for (i, step) in spec.build.steps.iter().enumerate() {
            log_file.write(format!("==> step {} of {}: {step}\n", i + 1, spec.build.steps.len()).as_bytes());
            let req = ExecRequest {
                command: vec!["/bin/sh".into(), "-c".into(), step.clone()],
                timeout_ms: Some(BUILD_STEP_TIMEOUT_MS),
                ..Default::default()
            };
            let r = self.exec(build_id, at, req, spec.cwd.as_deref(), env.clone()).await?;
            log_file.write(r.stdout.as_bytes());
            log_file.write(r.stderr.as_bytes());
            if r.exit_code != 0 {
                return Err(RuntimeError::Failed(format!(
                    "build step {} ({step:?}) exited with code {}",
                    i + 1,
                    r.exit_code
                )));
            }
        }
        Ok(())
    }
}

/// An append-only log that takes at most `max` bytes in all; what comes after is left out, once said so.
struct CappedLog {
    file: std::fs::File,
    room: u64,
    truncated: bool,
}

impl CappedLog {
    fn open(path: &Path, max: u64) -> std::io::Result<CappedLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let room = max.saturating_sub(file.metadata()?.len());
        Ok(CappedLog { file, room, truncated: false })
    }

    fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let take = bytes.len().min(usize::try_from(self.room).unwrap_or(usize::MAX));
        let _ = self.file.write_all(&bytes[..take]);
        self.room -= take as u64;
        if take < bytes.len() && !self.truncated {
            self.truncated = true;
            let _ = writeln!(
                self.file,
                "\n==> the build log reached {BUILD_LOG_MAX} bytes: later output is left out"
            );
        }
    }
}

/// procd of one sandbox, with the token its calls carry.
#[derive(Clone)]
pub struct ProcdConn {
    pub client: ProcdClient<Channel>,
    token: String,
}

impl ProcdConn {
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        warmpool_procd::authorized(message, Some(&self.token))
    }
}

fn unreachable(status: tonic::Status) -> RuntimeError {
    RuntimeError::Unreachable(status.message().to_string())
}

/// A command that cannot start is the caller's mistake, named by the field procd reports.
fn exec_error(status: tonic::Status) -> RuntimeError {
    let field = status.metadata().get(convert::FIELD_METADATA).and_then(|v| v.to_str().ok());
    match (status.code(), field) {
        (tonic::Code::InvalidArgument, Some("cwd")) => {
            RuntimeError::Invalid { field: "cwd", message: status.message().to_string() }
        }
        (tonic::Code::InvalidArgument, Some(_)) => {
            RuntimeError::Invalid { field: "command", message: status.message().to_string() }
        }
        _ => unreachable(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_log_keeps_its_first_bytes_and_says_it_left_the_rest_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("build.log");
        std::fs::write(&path, "1234").unwrap();
        let mut log = CappedLog::open(&path, 10).unwrap();
        log.write(b"abc");
        log.write(b"defghij");
        log.write(b"klm");
        let text = std::fs::read_to_string(&path).unwrap();
        let (kept, note) = text.split_at(10);
        assert_eq!(kept, "1234abcdef");
        assert_eq!(note.matches("left out").count(), 1, "said once: {note:?}");
    }
}
