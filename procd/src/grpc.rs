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

use crate::convert::{
    kind_from_proto, probe_result_to_proto, signal_from_proto, stream_from_proto, stream_to_proto,
    FIELD_METADATA,
};
use crate::probes::Probes;
use crate::proto::procd_server::Procd;
use crate::proto::*;
use crate::supervisor::{self, Process, SpawnRequest, Supervisor, SupervisorError};

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
    let invalid_field = |field: &str, message: String| {
        let mut status = Status::invalid_argument(message);
        status.metadata_mut().insert(FIELD_METADATA, field.parse().expect("ASCII field name"));
        status
    };
    match &err {
        SupervisorError::NoSuchProcess(_) => Status::not_found(err.to_string()),
        SupervisorError::Exists(_) | SupervisorError::WarmProcess(_) => {
            Status::failed_precondition(err.to_string())
        }
        SupervisorError::NoStdin(_) => Status::invalid_argument(err.to_string()),
        SupervisorError::EmptyCommand => invalid_field("command", err.to_string()),
        SupervisorError::Cwd(_) => invalid_field("cwd", err.to_string()),
        SupervisorError::Spawn { source, .. } => invalid_field("command", format!("{err}: {source}")),
        SupervisorError::Stdin { source, .. } => Status::unavailable(format!("{err}: {source}")),
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

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Largest chunk sent in one `ReadOutput` message.
const CHUNK: usize = 64 * 1024;

#[tonic::async_trait]
impl Procd for ProcdService {
    async fn probe(&self, req: Request<ProbeRequest>) -> Result<Response<ProbeResult>, Status> {
        if !self.take_probe_token() {
            return Err(Status::resource_exhausted("probe rate limit exceeded"));
        }
        let kind = probe_kind(req.get_ref())?;
        Ok(Response::new(probe_result_to_proto(self.probes.result(kind))))
    }

    type WatchProbeStream = BoxStream<ProbeResult>;

    async fn watch_probe(
        &self,
        req: Request<ProbeRequest>,
    ) -> Result<Response<Self::WatchProbeStream>, Status> {
        let kind = probe_kind(req.get_ref())?;
        let probes = self.probes.clone();
        let stream = async_stream::try_stream! {
            let mut last = None;
            loop {
                let changed = probes.changed();
                let result = probes.result(kind);
                if last != Some(result.status) {
                    last = Some(result.status);
                    yield probe_result_to_proto(result);
                }
                if probes.is_shutting_down() {
                    break;
                }
                // A warm process that exits changes readiness without a probe run: look again now and then.
                let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
            }
        };
        Ok(Response::new(Box::pin(stream)))
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

    type ReadOutputStream = BoxStream<OutputChunk>;

    #[tracing::instrument(skip_all, level = "debug")]
    async fn read_output(
        &self,
        req: Request<ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let stream_name = stream_from_proto(r.stream)
            .ok_or_else(|| Status::invalid_argument(format!("unknown stream {}", r.stream)))?;
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
        let signal = signal_from_proto(r.signal)
            .ok_or_else(|| Status::invalid_argument(format!("unknown signal {}", r.signal)))?;
        self.sup.signal(&r.process, signal).map_err(status_of)?;
        Ok(Response::new(SignalResponse {}))
    }

    type ExecStream = BoxStream<ExecEvent>;

    #[tracing::instrument(skip_all, level = "debug")]
    async fn exec(&self, req: Request<ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let timeout = Duration::from_millis(if r.timeout_ms == 0 { 60_000 } else { r.timeout_ms });
        let cwd: Option<std::path::PathBuf> = (!r.cwd.is_empty()).then(|| r.cwd.into());
        let env = r.env.into_iter().collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let sup = self.sup.clone();
        let run =
            tokio::spawn(async move { sup.exec(&r.command, cwd.as_ref(), &env, r.stdin, timeout, tx).await });
        // Nothing is sent before the command started: a start failure is the call's error, not a stream event.
        let first = rx.recv().await;
        if first.is_none() {
            run.await.map_err(|e| Status::internal(e.to_string()))?.map_err(status_of)?;
            return Err(Status::internal("exec ended without an exit"));
        }
        let stream = async_stream::stream! {
            let mut next = first;
            while let Some(event) = next {
                yield Ok(exec_event_to_proto(event));
                next = rx.recv().await;
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn pause(&self, req: Request<PauseRequest>) -> Result<Response<PauseResponse>, Status> {
        self.authorize(&req)?;
        self.sup.set_paused(req.get_ref().paused);
        Ok(Response::new(PauseResponse {}))
    }

    type ArchiveStream = BoxStream<ArchiveChunk>;

    #[tracing::instrument(skip_all, level = "debug")]
    async fn archive(&self, req: Request<ArchiveRequest>) -> Result<Response<Self::ArchiveStream>, Status> {
        self.authorize(&req)?;
        let path = std::path::PathBuf::from(req.into_inner().path);
        if !path.is_dir() {
            return Err(Status::invalid_argument(format!("{} is not a directory", path.display())));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let pack = tokio::task::spawn_blocking(move || {
            crate::archive::pack(&path, crate::archive::ChunkWriter::new(tx))
                .map_err(|e| Status::internal(format!("packing {}: {e}", path.display())))
        });
        let stream = async_stream::stream! {
            while let Some(data) = rx.recv().await {
                yield Ok(ArchiveChunk { data });
            }
            // The writer is gone: the pack finished, or failed (then the stream ends with its error).
            match pack.await {
                Ok(Ok(())) => {}
                Ok(Err(status)) => yield Err(status),
                Err(e) => yield Err(Status::internal(e.to_string())),
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

fn probe_kind(req: &ProbeRequest) -> Result<ProbeKind, Status> {
    kind_from_proto(req.kind)
        .ok_or_else(|| Status::invalid_argument(format!("unknown probe kind {}", req.kind)))
}

fn exec_event_to_proto(event: supervisor::ExecEvent) -> ExecEvent {
    let event = match event {
        supervisor::ExecEvent::Output(stream, data) => {
            exec_event::Event::Output(ExecOutput { stream: stream_to_proto(stream).into(), data })
        }
        supervisor::ExecEvent::Exit(e) => exec_event::Event::Exit(ExecExit {
            exit_code: e.exit_code,
            duration_ms: e.duration.as_millis() as u64,
            timed_out: e.timed_out,
            stdout_truncated: e.stdout_truncated,
            stderr_truncated: e.stderr_truncated,
        }),
    };
    ExecEvent { event: Some(event) }
}
