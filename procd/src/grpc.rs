//! The gRPC service `warmpool.procd.v1.Procd`: parses each request into a supervisor call. Every call but `Probe`
//! needs the sandbox token; `Probe` only reads state and is rate-limited.

// Handlers return `tonic::Status`, a large error; boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use warmpool_api::ProbeKind;

use crate::output::StreamName;
use crate::probes::Probes;
use crate::proto::procd_server::Procd;
use crate::proto::*;
use crate::supervisor::{parse_signal, Process, SpawnRequest, Supervisor, SupervisorError};

/// Probe calls allowed per second (a token bucket with this capacity).
const PROBE_RATE: f64 = 200.0;

pub struct ProcdService {
    pub sup: Arc<Supervisor>,
    pub probes: Arc<Probes>,
    pub token: Option<String>,
    bucket: Mutex<(f64, Instant)>,
}

impl ProcdService {
    pub fn new(sup: Arc<Supervisor>, probes: Arc<Probes>, token: Option<String>) -> Self {
        ProcdService { sup, probes, token, bucket: Mutex::new((PROBE_RATE, Instant::now())) }
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else { return Ok(()) };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("invalid sandbox token")),
            None => Err(Status::unauthenticated("missing sandbox token (authorization: Bearer …)")),
        }
    }

    fn take_probe_token(&self) -> bool {
        let mut bucket = self.bucket.lock().expect("bucket");
        let now = Instant::now();
        let refill = now.duration_since(bucket.1).as_secs_f64() * PROBE_RATE;
        bucket.0 = (bucket.0 + refill).min(PROBE_RATE);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn status_of(err: SupervisorError) -> Status {
    match &err {
        SupervisorError::NoSuchProcess(_) => Status::not_found(err.to_string()),
        SupervisorError::Exists(_) | SupervisorError::WarmProcess(_) => {
            Status::failed_precondition(err.to_string())
        }
        SupervisorError::EmptyCommand | SupervisorError::NoStdin(_) => {
            Status::invalid_argument(err.to_string())
        }
        SupervisorError::Spawn { source, .. } => Status::invalid_argument(format!("{err}: {source}")),
        SupervisorError::Stdin { source, .. } => Status::unavailable(format!("{err}: {source}")),
    }
}

pub fn probe_result_to_proto(r: warmpool_api::ProbeResult) -> ProbeResult {
    ProbeResult {
        kind: r.kind.as_str().into(),
        status: r.status.as_str().into(),
        reason: r.reason,
        message: r.message,
        checks: r
            .checks
            .into_iter()
            .map(|c| ProbeCheck {
                name: c.name,
                target: c.target,
                status: c.status.as_str().into(),
                reason: c.reason,
                message: c.message,
            })
            .collect(),
    }
}

fn info(p: &Process) -> ProcessInfo {
    ProcessInfo {
        name: p.name.clone(),
        alias: p.alias.clone().unwrap_or_default(),
        pid: p.pid,
        warm: p.warm,
        running: p.running(),
        exit_code: p.exit_code(),
        command: p.argv.clone(),
    }
}

fn parse_stream(s: &str) -> Result<StreamName, Status> {
    match s {
        "" | "stdout" => Ok(StreamName::Stdout),
        "stderr" => Ok(StreamName::Stderr),
        other => Err(Status::invalid_argument(format!("stream must be stdout or stderr (got {other:?})"))),
    }
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<OutputChunk, Status>> + Send>>;

/// Largest chunk sent in one `ReadOutput` message.
const CHUNK: usize = 64 * 1024;

#[tonic::async_trait]
impl Procd for ProcdService {
    async fn probe(&self, req: Request<ProbeRequest>) -> Result<Response<ProbeResult>, Status> {
        if !self.take_probe_token() {
            return Err(Status::resource_exhausted("probe rate limit exceeded"));
        }
        let kind: ProbeKind = req.get_ref().kind.parse().map_err(Status::invalid_argument)?;
        Ok(Response::new(probe_result_to_proto(self.probes.result(kind))))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn start_process(
        &self,
        req: Request<StartProcessRequest>,
    ) -> Result<Response<ProcessInfo>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name must not be empty"));
        }
        let spawn = SpawnRequest {
            name: r.name,
            alias: None,
            argv: r.command,
            cwd: (!r.cwd.is_empty()).then(|| r.cwd.into()),
            env: r.env.into_iter().collect(),
            warm: false,
            stdin: r.stdin,
        };
        let process = self.sup.spawn(spawn).map_err(status_of)?;
        Ok(Response::new(info(&process)))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn list_processes(
        &self,
        req: Request<ListProcessesRequest>,
    ) -> Result<Response<ListProcessesResponse>, Status> {
        self.authorize(&req)?;
        let processes = self.sup.processes().iter().map(|p| info(p)).collect();
        Ok(Response::new(ListProcessesResponse { processes }))
    }

    type ReadOutputStream = OutputStream;

    #[tracing::instrument(skip_all, level = "debug")]
    async fn read_output(&self, req: Request<ReadOutputRequest>) -> Result<Response<OutputStream>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let stream_name = parse_stream(&r.stream)?;
        let process = self.sup.get(&r.process).map_err(status_of)?;
        let out = process.stream(stream_name).clone();
        let follow = r.follow;
        let mut offset = r.offset;
        let stream = async_stream::try_stream! {
            loop {
                let changed = out.changed.notified();
                let closed = out.is_closed();
                let chunk = out.read(offset, CHUNK);
                if !chunk.data.is_empty() || chunk.dropped > 0 {
                    offset = chunk.offset + chunk.data.len() as u64;
                    yield OutputChunk { offset: chunk.offset, data: chunk.data, dropped: chunk.dropped, eof: false };
                    continue;
                }
                if closed || !follow {
                    yield OutputChunk { offset, data: Vec::new(), dropped: 0, eof: closed };
                    break;
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn write_stdin(
        &self,
        req: Request<WriteStdinRequest>,
    ) -> Result<Response<WriteStdinResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        self.sup.write_stdin(&r.process, &r.data, r.close).await.map_err(status_of)?;
        Ok(Response::new(WriteStdinResponse {}))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn signal(&self, req: Request<SignalRequest>) -> Result<Response<SignalResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let signal = parse_signal(&r.signal)
            .ok_or_else(|| Status::invalid_argument(format!("unknown signal {:?}", r.signal)))?;
        self.sup.signal(&r.process, signal).map_err(status_of)?;
        Ok(Response::new(SignalResponse {}))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let timeout = Duration::from_millis(if r.timeout_ms == 0 { 60_000 } else { r.timeout_ms });
        let cwd = (!r.cwd.is_empty()).then(|| r.cwd.into());
        let env = r.env.into_iter().collect();
        let o = self.sup.exec(&r.command, cwd.as_ref(), &env, r.stdin, timeout).await.map_err(status_of)?;
        Ok(Response::new(ExecResponse {
            exit_code: o.exit_code,
            stdout: o.stdout,
            stderr: o.stderr,
            duration_ms: o.duration.as_millis() as u64,
            timed_out: o.timed_out,
        }))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn pause(&self, req: Request<PauseRequest>) -> Result<Response<PauseResponse>, Status> {
        self.authorize(&req)?;
        self.sup.set_paused(req.get_ref().paused);
        Ok(Response::new(PauseResponse {}))
    }
}
