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
    FIELD_METADATA, REASON_METADATA,
};
use crate::files::{ChannelReader, FilesError, Root};
use crate::output::{Chunk, CombinedOutput, StreamName, StreamOutput};
use crate::probes::Probes;
use crate::proto::procd_server::Procd;
use crate::proto::*;
use crate::supervisor::{self, Process, SpawnRequest, Supervisor, SupervisorError};

/// Probe calls allowed per second (a token bucket with this capacity).
const PROBE_RATE: f64 = 200.0;

pub struct ProcdService {
    pub sup: Arc<Supervisor>,
    /// The sandbox's root (procd's own `/`), for the file and archive calls.
    pub root: Option<Arc<Root>>,
    pub probes: Arc<Probes>,
    pub token: Option<String>,
    bucket: Mutex<(f64, Instant)>,
}

impl ProcdService {
    pub fn new(sup: Arc<Supervisor>, probes: Arc<Probes>, token: Option<String>) -> Self {
        let root = Root::open("/").map(Arc::new).ok();
        ProcdService { sup, root, probes, token, bucket: Mutex::new((PROBE_RATE, Instant::now())) }
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

fn invalid_field(field: &str, message: String) -> Status {
    let mut status = Status::invalid_argument(message);
    status.metadata_mut().insert(FIELD_METADATA, field.parse().expect("ASCII field name"));
    status
}

fn files_status(err: FilesError) -> Status {
    let message = err.to_string();
    match err {
        FilesError::NotAbsolute(_) | FilesError::Reserved(_) | FilesError::Refused { .. } => {
            invalid_field("path", message)
        }
        FilesError::BadEntry(_) | FilesError::BadArchive(_) => invalid_field("body", message),
        FilesError::NotFound(_) => Status::not_found(message),
        FilesError::IsDir(_) | FilesError::NotDir(_) | FilesError::NotEmpty(_) => {
            Status::failed_precondition(message)
        }
        FilesError::NoSpace => {
            let mut status = Status::resource_exhausted(message);
            status.metadata_mut().insert(REASON_METADATA, "no_space".parse().expect("ASCII reason"));
            status
        }
        FilesError::Io { source, .. } => Status::internal(format!("{message}: {source}")),
    }
}

fn joined(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("procd's worker failed: {e}"))
}

fn compression(value: i32) -> Result<crate::files::Compression, Status> {
    match Compression::try_from(value) {
        Ok(Compression::None) => Ok(crate::files::Compression::None),
        Ok(Compression::Gzip) => Ok(crate::files::Compression::Gzip),
        Ok(Compression::Zstd) => Ok(crate::files::Compression::Zstd),
        Err(_) => Err(invalid_field("compression", format!("unknown compression {value}"))),
    }
}

/// Hands a client stream's bytes to a blocking writer until either side ends; a broken client stream (an error,
/// or an end without the message marked last) reaches the writer as an error, so nothing half-written is kept.
async fn feed<T>(
    mut stream: tonic::Streaming<T>,
    data: impl Fn(T) -> (Vec<u8>, bool),
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
) {
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                let (bytes, last) = data(m);
                if tx.send(Ok(bytes)).await.is_err() || last {
                    break;
                }
            }
            Ok(None) => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "the upload ended before its last chunk",
                );
                let _ = tx.send(Err(e)).await;
                break;
            }
            Err(status) => {
                let e = std::io::Error::new(std::io::ErrorKind::BrokenPipe, status.message().to_string());
                let _ = tx.send(Err(e)).await;
                break;
            }
        }
    }
}

/// Streams what a blocking writer produces (a file, a tar) as chunks, ending with the writer's error if it fails.
fn chunks<T: Send + 'static>(
    write: impl FnOnce(crate::archive::ChunkWriter) -> std::io::Result<()> + Send + 'static,
    wrap: fn(Vec<u8>) -> T,
) -> BoxStream<T> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let job = tokio::task::spawn_blocking(move || write(crate::archive::ChunkWriter::new(tx)));
    Box::pin(async_stream::stream! {
        while let Some(data) = rx.recv().await {
            yield Ok(wrap(data));
        }
        match job.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => yield Err(Status::internal(format!("reading the sandbox's files: {e}"))),
            Err(e) => yield Err(joined(e)),
        }
    })
}

fn millis(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn info(p: &Process) -> ProcessInfo {
    let exit = p.exit();
    ProcessInfo {
        name: p.name.clone(),
        alias: p.alias.clone().unwrap_or_default(),
        pid: p.pid,
        warm: p.warm,
        running: exit.is_none(),
        exit_code: exit.map(|e| e.code),
        command: p.argv.clone(),
        signal: exit.and_then(|e| e.signal),
        started_at_ms: millis(p.started_at),
        finished_at_ms: exit.map(|e| millis(e.at)),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// procd's own bound on a streamed exec without a timeout (24 h).
const EXEC_MAX_MS: u64 = 24 * 60 * 60 * 1000;

/// The exit of a process whose output just closed (it is recorded a moment later).
async fn wait_exit(process: &Process) -> Option<supervisor::Exit> {
    let _ = tokio::time::timeout(Duration::from_secs(2), process.wait()).await;
    process.exit()
}

/// Largest chunk sent in one `ReadOutput` message.
const CHUNK: usize = 64 * 1024;

/// What a `ReadOutput` follows: both streams as they were written, or one.
enum Followed {
    Combined(Arc<CombinedOutput>),
    One(StreamName, Arc<StreamOutput>),
}

impl Followed {
    fn changed(&self) -> &tokio::sync::Notify {
        match self {
            Followed::Combined(out) => &out.changed,
            Followed::One(_, out) => &out.changed,
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Followed::Combined(out) => out.is_closed(),
            Followed::One(_, out) => out.is_closed(),
        }
    }

    /// Up to [`CHUNK`] bytes from `offset`, and the stream they came from.
    fn read(&self, offset: u64) -> (Chunk, StreamName) {
        match self {
            Followed::Combined(out) => out.read(offset, CHUNK),
            Followed::One(name, out) => (out.read(offset, CHUNK), *name),
        }
    }
}

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
        if !r.cwd.is_empty() && !std::path::Path::new(&r.cwd).is_dir() {
            return Err(status_of(SupervisorError::Cwd(r.cwd.into())));
        }
        let spawn = SpawnRequest {
            name: r.name.clone(),
            alias: None,
            argv: r.command.clone(),
            cwd: (!r.cwd.is_empty()).then(|| r.cwd.clone().into()),
            env: r.env.clone().into_iter().collect(),
            warm: false,
            stdin: r.stdin,
        };
        let process = self.sup.spawn(spawn).map_err(status_of)?;
        if r.timeout_ms > 0 {
            let watched = process.clone();
            let limit = Duration::from_millis(r.timeout_ms);
            tokio::spawn(async move {
                if tokio::time::timeout(limit, watched.wait()).await.is_err() {
                    tracing::info!(process = %watched.name, "Process reached its timeout; killing its group");
                    supervisor::kill_group(watched.pid as i32, libc::SIGKILL);
                }
            });
        }
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
        let process = self.sup.get(&r.process).map_err(status_of)?;
        let follow = r.follow;
        let mut offset = r.offset;
        let out = if r.stream == i32::from(crate::proto::Stream::Combined) {
            Followed::Combined(process.combined.clone())
        } else {
            let name = stream_from_proto(r.stream)
                .ok_or_else(|| Status::invalid_argument(format!("unknown stream {}", r.stream)))?;
            Followed::One(name, process.stream(name).clone())
        };
        let stream = async_stream::try_stream! {
            loop {
                let changed = out.changed().notified();
                let closed = out.is_closed();
                let (chunk, name) = out.read(offset);
                if !chunk.data.is_empty() || chunk.dropped > 0 {
                    offset = chunk.offset + chunk.data.len() as u64;
                    yield OutputChunk {
                        offset: chunk.offset,
                        data: chunk.data,
                        dropped: chunk.dropped,
                        stream: stream_to_proto(name).into(),
                        ..Default::default()
                    };
                    continue;
                }
                if closed || !follow {
                    // The exit is set just after the output closes: wait for it briefly.
                    let exit = if closed { wait_exit(&process).await } else { None };
                    yield OutputChunk {
                        offset,
                        eof: closed,
                        exit_code: exit.map(|e| e.code),
                        signal: exit.and_then(|e| e.signal),
                        ..Default::default()
                    };
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
        let default_ms = if r.unlimited { EXEC_MAX_MS } else { 60_000 };
        let timeout = Duration::from_millis(if r.timeout_ms == 0 { default_ms } else { r.timeout_ms });
        let limit = if r.unlimited { usize::MAX } else { warmpool_api::EXEC_OUTPUT_LIMIT };
        let cwd: Option<std::path::PathBuf> = (!r.cwd.is_empty()).then(|| r.cwd.into());
        let env = r.env.into_iter().collect();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let sup = self.sup.clone();
        let run = tokio::spawn(async move {
            sup.exec(&r.command, cwd.as_ref(), &env, r.stdin, timeout, limit, tx).await
        });
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

    #[tracing::instrument(skip_all, level = "debug")]
    async fn put_file(
        &self,
        req: Request<tonic::Streaming<PutFileChunk>>,
    ) -> Result<Response<FileInfo>, Status> {
        self.authorize(&req)?;
        let root = self.root()?;
        let mut stream = req.into_inner();
        let first =
            stream.message().await?.ok_or_else(|| invalid_field("path", "no file was sent".into()))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (path, mode) = (first.path, first.mode);
        let write = tokio::task::spawn_blocking(move || root.put_file(&path, mode, ChannelReader::new(rx)));
        if first.last {
            let _ = tx.send(Ok(first.data)).await;
        } else if tx.send(Ok(first.data)).await.is_ok() {
            feed(stream, |m| (m.data, m.last), tx).await;
        }
        let (path, size, mode) = write.await.map_err(joined)?.map_err(files_status)?;
        Ok(Response::new(FileInfo { path: path.to_string_lossy().into_owned(), size, mode }))
    }

    type GetFileStream = BoxStream<FileChunk>;

    #[tracing::instrument(skip_all, level = "debug")]
    async fn get_file(&self, req: Request<GetFileRequest>) -> Result<Response<Self::GetFileStream>, Status> {
        self.authorize(&req)?;
        let root = self.root()?;
        let path = req.into_inner().path;
        let (mut file, _) = tokio::task::spawn_blocking(move || root.get_file(&path))
            .await
            .map_err(joined)?
            .map_err(files_status)?;
        let stream = chunks(
            move |mut out| {
                std::io::copy(&mut file, &mut out)?;
                std::io::Write::flush(&mut out)
            },
            |data| FileChunk { data },
        );
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn list_files(
        &self,
        req: Request<ListFilesRequest>,
    ) -> Result<Response<ListFilesResponse>, Status> {
        self.authorize(&req)?;
        let root = self.root()?;
        let path = req.into_inner().path;
        let items = tokio::task::spawn_blocking(move || root.list(&path))
            .await
            .map_err(joined)?
            .map_err(files_status)?;
        let items = items
            .into_iter()
            .map(|e| FileEntry {
                name: e.name,
                r#type: e.kind.into(),
                size: e.size,
                mode: e.mode,
                modified_at_ms: e.modified_at_ms,
            })
            .collect();
        Ok(Response::new(ListFilesResponse { items }))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn delete_file(
        &self,
        req: Request<DeleteFileRequest>,
    ) -> Result<Response<DeleteFileResponse>, Status> {
        self.authorize(&req)?;
        let root = self.root()?;
        let r = req.into_inner();
        tokio::task::spawn_blocking(move || root.delete(&r.path, r.recursive))
            .await
            .map_err(joined)?
            .map_err(files_status)?;
        Ok(Response::new(DeleteFileResponse {}))
    }

    #[tracing::instrument(skip_all, level = "debug")]
    async fn put_archive(
        &self,
        req: Request<tonic::Streaming<PutArchiveChunk>>,
    ) -> Result<Response<PutArchiveResponse>, Status> {
        self.authorize(&req)?;
        let root = self.root()?;
        let mut stream = req.into_inner();
        let first =
            stream.message().await?.ok_or_else(|| invalid_field("path", "no archive was sent".into()))?;
        let how = compression(first.compression)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let path = first.path;
        let unpack = tokio::task::spawn_blocking(move || root.unpack(&path, how, ChannelReader::new(rx)));
        if first.last {
            let _ = tx.send(Ok(first.data)).await;
        } else if tx.send(Ok(first.data)).await.is_ok() {
            feed(stream, |m| (m.data, m.last), tx).await;
        }
        let done = unpack.await.map_err(joined)?.map_err(files_status)?;
        Ok(Response::new(PutArchiveResponse { files: done.files, bytes: done.bytes }))
    }

    type GetArchiveStream = BoxStream<ArchiveChunk>;

    #[tracing::instrument(skip_all, level = "debug")]
    async fn get_archive(
        &self,
        req: Request<GetArchiveRequest>,
    ) -> Result<Response<Self::GetArchiveStream>, Status> {
        self.authorize(&req)?;
        let root = self.root()?;
        let r = req.into_inner();
        let how = compression(r.compression)?;
        let path = r.path;
        let packer = tokio::task::spawn_blocking(move || root.packer(&path))
            .await
            .map_err(joined)?
            .map_err(files_status)?;
        Ok(Response::new(chunks(move |out| packer.pack(how, out), |data| ArchiveChunk { data })))
    }
}

impl ProcdService {
    fn root(&self) -> Result<Arc<Root>, Status> {
        self.root.clone().ok_or_else(|| Status::unavailable("procd cannot open the sandbox's root"))
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
            signal: e.signal,
            duration_ms: e.duration.as_millis() as u64,
            timed_out: e.timed_out,
            stdout_truncated: e.stdout_truncated,
            stderr_truncated: e.stderr_truncated,
        }),
    };
    ExecEvent { event: Some(event) }
}
