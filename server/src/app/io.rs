//! Work inside a claimed sandbox through its procd, the same on every runtime: the streamed exec, processes that
//! outlive a request, files and archives. Paths are made absolute here (relative ones against the template's
//! `cwd`) and resolved by procd inside the sandbox's own root, never on the host. Bodies pass through as streams:
//! the server holds one chunk at a time, whatever the size.

use std::collections::BTreeMap;

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use warmpool_api::{
    validate_env_key, ArchiveWritten, ExecRequest, FieldError, FileEntry, FileType, FileWritten,
    OutputStream, Process, ProcessCreate, ProcessState, SandboxState, SignalName, StreamEvent,
    EXEC_TIMEOUT_MAX_MS,
};
use warmpool_procd::convert::{FIELD_METADATA, REASON_METADATA};
use warmpool_procd::proto;

use super::lifecycle::runtime_error;
use super::{new_id, not_found, App, AppError, AppResult, Caller};
use crate::runtime::procd::ProcdConn;
use crate::runtime::WORKSPACE;
use crate::store::Lifecycle;

/// The body of an upload, as the HTTP layer hands it over.
pub type Upload = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// A download: the bytes as procd sends them (an error ends the stream early).
pub type Download = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// How a tar stream is (to be) compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    fn to_proto(self) -> i32 {
        match self {
            Compression::None => proto::Compression::None.into(),
            Compression::Gzip => proto::Compression::Gzip.into(),
            Compression::Zstd => proto::Compression::Zstd.into(),
        }
    }
}

/// A claimed, running sandbox's procd and what its commands start with.
struct Target {
    conn: ProcdConn,
    base_cwd: String,
    env: BTreeMap<String, String>,
}

/// `path` as procd takes it: absolute inside the sandbox (a relative one against `base`).
fn sandbox_path(base: &str, path: &str) -> Result<String, FieldError> {
    if path.is_empty() {
        return Err(FieldError::new("path", "is required"));
    }
    if path.len() > 4096 {
        return Err(FieldError::new("path", "must be at most 4096 bytes"));
    }
    Ok(if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{path}", base.trim_end_matches('/'))
    })
}

fn base64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn output_stream(value: i32) -> OutputStream {
    match proto::Stream::try_from(value) {
        Ok(proto::Stream::Stderr) => OutputStream::Stderr,
        _ => OutputStream::Stdout,
    }
}

fn process(p: proto::ProcessInfo) -> Process {
    Process {
        id: p.name,
        command: p.command,
        state: if p.running { ProcessState::Running } else { ProcessState::Exited },
        exit_code: p.exit_code,
        signal: p.signal,
        started_at: time(p.started_at_ms),
        finished_at: p.finished_at_ms.map(time),
        warm: p.warm,
    }
}

/// What procd answered, as the error code the caller sees: `what` names the path or process the call was about.
/// A command procd could not start, named after what the caller sent (`command` or `cwd`), not the path procd
/// resolved it to.
fn start_error(id: &str, command: &str, cwd: Option<&str>, status: tonic::Status) -> AppError {
    let field = status.metadata().get(FIELD_METADATA).and_then(|v| v.to_str().ok()).unwrap_or("");
    match (status.code(), field) {
        (tonic::Code::InvalidArgument, "cwd") => FieldError::new(
            "cwd",
            format!("{:?} does not exist in the sandbox or is not a directory", cwd.unwrap_or(".")),
        )
        .into(),
        (tonic::Code::InvalidArgument, _) => {
            let reason = status.message().rsplit(": ").next().unwrap_or_default().to_string();
            FieldError::new("command", format!("{command:?} cannot be started: {reason}")).into()
        }
        _ => procd_error(id, ("sandbox", id), status),
    }
}

fn procd_error(sandbox: &str, what: (&'static str, &str), status: tonic::Status) -> AppError {
    let meta = |key: &str| status.metadata().get(key).and_then(|v| v.to_str().ok()).map(str::to_string);
    match status.code() {
        tonic::Code::InvalidArgument => {
            FieldError::new(meta(FIELD_METADATA).unwrap_or_else(|| what.0.into()), status.message()).into()
        }
        tonic::Code::NotFound => not_found(what.0, what.1),
        tonic::Code::FailedPrecondition => AppError::Conflict(status.message().to_string()),
        tonic::Code::ResourceExhausted if meta(REASON_METADATA).as_deref() == Some("no_space") => {
            AppError::Conflict("no space left on the sandbox's disk".into())
        }
        tonic::Code::Internal => {
            AppError::Internal(format!("procd of sandbox {sandbox}: {}", status.message()))
        }
        _ => AppError::Conflict(format!("sandbox {sandbox} is not answering: {}", status.message())),
    }
}

/// Ends an upload early: the call is dropped, so procd sees a broken stream and keeps nothing it wrote.
enum Cut {
    TooLarge(u64),
    Body(std::io::Error),
}

/// The upload's chunks for procd, after `first`; `cut` hears why it stopped early (the stream then never ends, so
/// the call cannot complete).
fn chunks<T: Send + 'static>(
    first: T,
    mut body: Upload,
    limit: u64,
    wrap: fn(Vec<u8>, bool) -> T,
    cut: tokio::sync::oneshot::Sender<Cut>,
) -> impl Stream<Item = T> + Send + 'static {
    async_stream::stream! {
        yield first;
        let mut total = 0u64;
        let mut cut = Some(cut);
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(data) => {
                    total += data.len() as u64;
                    if total > limit {
                        if let Some(cut) = cut.take() {
                            let _ = cut.send(Cut::TooLarge(limit));
                        }
                        futures::future::pending::<()>().await;
                    }
                    yield wrap(data.to_vec(), false);
                }
                Err(e) => {
                    if let Some(cut) = cut.take() {
                        let _ = cut.send(Cut::Body(e));
                    }
                    futures::future::pending::<()>().await;
                }
            }
        }
        // procd keeps what it was sent only once it sees this.
        yield wrap(Vec::new(), true);
    }
}

/// Runs a client-streaming call to its end, unless the upload is cut first.
async fn upload<R>(
    call: impl std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    cut: tokio::sync::oneshot::Receiver<Cut>,
    fail: impl FnOnce(tonic::Status) -> AppError,
) -> AppResult<R> {
    tokio::select! {
        r = call => r.map(tonic::Response::into_inner).map_err(fail),
        Ok(why) = cut => Err(match why {
            Cut::TooLarge(limit) => AppError::PayloadTooLarge(format!(
                "the body is larger than {limit} bytes (the server's --max-upload-bytes); nothing was kept"
            )),
            Cut::Body(e) => FieldError::new("body", format!("the upload broke off: {e}; nothing was kept")).into(),
        }),
    }
}

fn download<T: Send + 'static>(
    stream: tonic::Streaming<T>,
    data: fn(T) -> Vec<u8>,
    sandbox: String,
) -> Download {
    stream
        .map(move |m| match m {
            Ok(m) => Ok(Bytes::from(data(m))),
            Err(status) => {
                tracing::warn!(sandbox = %sandbox, message = status.message(), "A download from procd broke off");
                Err(std::io::Error::other(status.message().to_string()))
            }
        })
        .boxed()
}

fn validate_command(
    command: &[String],
    cwd: Option<&String>,
    env: Option<&BTreeMap<String, String>>,
    timeout_ms: Option<u64>,
) -> Result<(), FieldError> {
    if command.is_empty() || command[0].is_empty() {
        return Err(FieldError::new("command", "must not be empty"));
    }
    if cwd.is_some_and(|c| c.split('/').any(|part| part == "..")) {
        return Err(FieldError::new("cwd", "must not contain '..' components"));
    }
    for key in env.into_iter().flatten().map(|(k, _)| k) {
        validate_env_key(&format!("env.{key}"), key)?;
    }
    if timeout_ms.is_some_and(|t| t > EXEC_TIMEOUT_MAX_MS) {
        return Err(FieldError::new("timeout_ms", format!("must be at most {EXEC_TIMEOUT_MAX_MS} (24 h)")));
    }
    Ok(())
}

impl App {
    async fn io_target(&self, caller: &Caller, id: &str) -> AppResult<Target> {
        let row = self.owned(caller, id).await?;
        if row.lifecycle != Lifecycle::Claimed || row.sandbox.state != SandboxState::Running {
            return Err(AppError::Conflict(format!("sandbox {id} is {}", row.sandbox.state.as_str())));
        }
        let build = self.store.get_build(&row.sandbox.build_id).await?;
        let base_cwd = build.as_ref().and_then(|b| b.spec.cwd.clone()).unwrap_or_else(|| WORKSPACE.into());
        let mut env: BTreeMap<String, String> = build.map(|b| b.spec.env).unwrap_or_default();
        env.extend(row.claim_env);
        let conn = self
            .runtime
            .procd(&row.handle)
            .map_err(|e| runtime_error(&format!("reaching sandbox {id}"), e))?;
        Ok(Target { conn, base_cwd, env })
    }

    /// `POST …/exec` with `Accept: application/x-ndjson`: the command's output as it is read, then its exit; no
    /// cap on the output. Dropping the stream (the client went away) kills the command.
    pub async fn exec_stream(
        &self,
        caller: &Caller,
        id: &str,
        req: ExecRequest,
    ) -> AppResult<BoxStream<'static, StreamEvent>> {
        validate_command(&req.command, req.cwd.as_ref(), req.env.as_ref(), req.timeout_ms)?;
        let t = self.io_target(caller, id).await?;
        let cwd = match &req.cwd {
            Some(c) => sandbox_path(&t.base_cwd, c).map_err(|e| FieldError::new("cwd", e.message))?,
            None => t.base_cwd.clone(),
        };
        let mut env = t.env;
        env.extend(req.env.unwrap_or_default());
        let msg = proto::ExecRequest {
            command: req.command.clone(),
            cwd,
            env: env.into_iter().collect(),
            timeout_ms: req.timeout_ms.unwrap_or(0),
            stdin: req.stdin.unwrap_or_default().into_bytes(),
            unlimited: true,
        };
        let mut client = t.conn.client.clone();
        let events = client
            .exec(t.conn.request(msg))
            .await
            .map_err(|status| start_error(id, &req.command[0], req.cwd.as_deref(), status))?;
        let sandbox = id.to_string();
        let stream = events.into_inner().filter_map(move |event| {
            let event = match event {
                Ok(proto::ExecEvent { event: Some(proto::exec_event::Event::Output(o)) }) => {
                    Some(StreamEvent::Output { stream: output_stream(o.stream), offset: None, data: base64(&o.data) })
                }
                Ok(proto::ExecEvent { event: Some(proto::exec_event::Event::Exit(e)) }) => Some(StreamEvent::Exit {
                    exit_code: e.exit_code,
                    signal: e.signal,
                    timed_out: e.timed_out,
                    duration_ms: e.duration_ms,
                }),
                Ok(_) => None,
                Err(status) => {
                    tracing::warn!(sandbox = %sandbox, message = status.message(), "A streamed exec broke off");
                    None
                }
            };
            std::future::ready(event)
        });
        Ok(stream.boxed())
    }

    pub async fn start_process(&self, caller: &Caller, id: &str, req: ProcessCreate) -> AppResult<Process> {
        validate_command(&req.command, req.cwd.as_ref(), req.env.as_ref(), req.timeout_ms)?;
        let t = self.io_target(caller, id).await?;
        let cwd = match &req.cwd {
            Some(c) => sandbox_path(&t.base_cwd, c).map_err(|e| FieldError::new("cwd", e.message))?,
            None => t.base_cwd.clone(),
        };
        let mut env = t.env;
        env.extend(req.env.unwrap_or_default());
        let msg = proto::StartProcessRequest {
            name: new_id(|s| format!("proc_{s}")),
            command: req.command.clone(),
            cwd,
            env: env.into_iter().collect(),
            stdin: req.stdin.unwrap_or(false),
            timeout_ms: req.timeout_ms.unwrap_or(0),
        };
        let mut client = t.conn.client.clone();
        let info = client
            .start_process(t.conn.request(msg))
            .await
            .map_err(|status| start_error(id, &req.command[0], req.cwd.as_deref(), status))?;
        Ok(process(info.into_inner()))
    }

    pub async fn list_processes(&self, caller: &Caller, id: &str) -> AppResult<Vec<Process>> {
        let t = self.io_target(caller, id).await?;
        let mut client = t.conn.client.clone();
        let list = client
            .list_processes(t.conn.request(proto::ListProcessesRequest {}))
            .await
            .map_err(|s| procd_error(id, ("sandbox", id), s))?;
        Ok(list.into_inner().processes.into_iter().map(process).collect())
    }

    pub async fn get_process(&self, caller: &Caller, id: &str, pid: &str) -> AppResult<Process> {
        self.list_processes(caller, id)
            .await?
            .into_iter()
            .find(|p| p.id == pid)
            .ok_or_else(|| not_found("process", pid))
    }

    /// A process's combined output from `offset`, as events; with `follow` until it exits (then its exit event).
    pub async fn process_output(
        &self,
        caller: &Caller,
        id: &str,
        pid: &str,
        offset: u64,
        follow: bool,
    ) -> AppResult<BoxStream<'static, StreamEvent>> {
        let t = self.io_target(caller, id).await?;
        let mut client = t.conn.client.clone();
        let msg = proto::ReadOutputRequest {
            process: pid.to_string(),
            stream: proto::Stream::Combined.into(),
            offset,
            follow,
        };
        let chunks = client
            .read_output(t.conn.request(msg))
            .await
            .map_err(|s| procd_error(id, ("process", pid), s))?
            .into_inner();
        let (sandbox, pid) = (id.to_string(), pid.to_string());
        let conn = t.conn.clone();
        let stream = async_stream::stream! {
            let mut chunks = chunks;
            loop {
                let chunk = match chunks.message().await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::warn!(sandbox = %sandbox, message = status.message(), "A process's output broke off");
                        break;
                    }
                };
                if chunk.dropped > 0 {
                    yield StreamEvent::Dropped { bytes: chunk.dropped };
                }
                if !chunk.data.is_empty() {
                    yield StreamEvent::Output {
                        stream: output_stream(chunk.stream),
                        offset: Some(chunk.offset),
                        data: base64(&chunk.data),
                    };
                }
                if chunk.eof {
                    let mut client = conn.client.clone();
                    let info = client
                        .list_processes(conn.request(proto::ListProcessesRequest {}))
                        .await
                        .ok()
                        .and_then(|l| l.into_inner().processes.into_iter().find(|p| p.name == pid));
                    let duration_ms = info
                        .as_ref()
                        .and_then(|p| p.finished_at_ms.map(|f| (f - p.started_at_ms).max(0) as u64))
                        .unwrap_or(0);
                    yield StreamEvent::Exit {
                        exit_code: chunk.exit_code.or(info.as_ref().and_then(|p| p.exit_code)).unwrap_or(-1),
                        signal: chunk.signal,
                        timed_out: false,
                        duration_ms,
                    };
                    break;
                }
            }
        };
        Ok(stream.boxed())
    }

    /// Writes the body to a process's stdin as it arrives; `close` closes stdin after it.
    pub async fn process_stdin(
        &self,
        caller: &Caller,
        id: &str,
        pid: &str,
        mut body: Upload,
        close: bool,
        limit: u64,
    ) -> AppResult<()> {
        let t = self.io_target(caller, id).await?;
        let mut client = t.conn.client.clone();
        let mut total = 0u64;
        let fail = |s| procd_error(id, ("process", pid), s);
        while let Some(chunk) = body.next().await {
            let data = chunk.map_err(|e| FieldError::new("body", format!("the upload broke off: {e}")))?;
            total += data.len() as u64;
            if total > limit {
                return Err(AppError::PayloadTooLarge(format!("the body is larger than {limit} bytes")));
            }
            let msg =
                proto::WriteStdinRequest { process: pid.to_string(), data: data.to_vec(), close: false };
            client.write_stdin(t.conn.request(msg)).await.map_err(fail)?;
        }
        if close {
            let msg = proto::WriteStdinRequest { process: pid.to_string(), data: Vec::new(), close: true };
            client.write_stdin(t.conn.request(msg)).await.map_err(fail)?;
        }
        Ok(())
    }

    pub async fn signal_process(
        &self,
        caller: &Caller,
        id: &str,
        pid: &str,
        signal: SignalName,
    ) -> AppResult<()> {
        let t = self.io_target(caller, id).await?;
        let signal = match signal {
            SignalName::Term => proto::Signal::Term,
            SignalName::Kill => proto::Signal::Kill,
            SignalName::Int => proto::Signal::Int,
            SignalName::Hup => proto::Signal::Hup,
            SignalName::Quit => proto::Signal::Quit,
            SignalName::Usr1 => proto::Signal::Usr1,
            SignalName::Usr2 => proto::Signal::Usr2,
        };
        let mut client = t.conn.client.clone();
        let msg = proto::SignalRequest { process: pid.to_string(), signal: signal.into() };
        client.signal(t.conn.request(msg)).await.map_err(|s| procd_error(id, ("process", pid), s))?;
        Ok(())
    }

    pub async fn put_file(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        mode: Option<u32>,
        body: Upload,
        limit: u64,
    ) -> AppResult<FileWritten> {
        let t = self.io_target(caller, id).await?;
        let full = sandbox_path(&t.base_cwd, path)?;
        let first = proto::PutFileChunk { path: full.clone(), mode, ..Default::default() };
        let (cut_tx, cut_rx) = tokio::sync::oneshot::channel();
        let stream = chunks(
            first,
            body,
            limit,
            |data, last| proto::PutFileChunk { data, last, ..Default::default() },
            cut_tx,
        );
        let mut client = t.conn.client.clone();
        let info =
            upload(client.put_file(t.conn.request(stream)), cut_rx, |s| procd_error(id, ("path", &full), s))
                .await?;
        Ok(FileWritten { path: info.path, size: info.size, mode: info.mode })
    }

    pub async fn get_file(&self, caller: &Caller, id: &str, path: &str) -> AppResult<Download> {
        let t = self.io_target(caller, id).await?;
        let full = sandbox_path(&t.base_cwd, path)?;
        let mut client = t.conn.client.clone();
        let stream = client
            .get_file(t.conn.request(proto::GetFileRequest { path: full.clone() }))
            .await
            .map_err(|s| procd_error(id, ("path", &full), s))?;
        Ok(download(stream.into_inner(), |c| c.data, id.to_string()))
    }

    pub async fn list_files(&self, caller: &Caller, id: &str, path: &str) -> AppResult<Vec<FileEntry>> {
        let t = self.io_target(caller, id).await?;
        let full = sandbox_path(&t.base_cwd, path)?;
        let mut client = t.conn.client.clone();
        let list = client
            .list_files(t.conn.request(proto::ListFilesRequest { path: full.clone() }))
            .await
            .map_err(|s| procd_error(id, ("path", &full), s))?;
        Ok(list
            .into_inner()
            .items
            .into_iter()
            .map(|e| FileEntry {
                name: e.name,
                file_type: match e.r#type.as_str() {
                    "file" => FileType::File,
                    "dir" => FileType::Dir,
                    "symlink" => FileType::Symlink,
                    _ => FileType::Other,
                },
                size: e.size,
                mode: e.mode,
                modified_at: time(e.modified_at_ms),
            })
            .collect())
    }

    pub async fn delete_file(&self, caller: &Caller, id: &str, path: &str, recursive: bool) -> AppResult<()> {
        let t = self.io_target(caller, id).await?;
        let full = sandbox_path(&t.base_cwd, path)?;
        let mut client = t.conn.client.clone();
        client
            .delete_file(t.conn.request(proto::DeleteFileRequest { path: full.clone(), recursive }))
            .await
            .map_err(|s| procd_error(id, ("path", &full), s))?;
        Ok(())
    }

    pub async fn put_archive(
        &self,
        caller: &Caller,
        id: &str,
        dir: &str,
        compression: Compression,
        body: Upload,
        limit: u64,
    ) -> AppResult<ArchiveWritten> {
        let t = self.io_target(caller, id).await?;
        let full = sandbox_path(&t.base_cwd, dir)?;
        let first = proto::PutArchiveChunk {
            path: full.clone(),
            compression: compression.to_proto(),
            ..Default::default()
        };
        let (cut_tx, cut_rx) = tokio::sync::oneshot::channel();
        let stream = chunks(
            first,
            body,
            limit,
            |data, last| proto::PutArchiveChunk { data, last, ..Default::default() },
            cut_tx,
        );
        let mut client = t.conn.client.clone();
        let done = upload(client.put_archive(t.conn.request(stream)), cut_rx, |s| {
            procd_error(id, ("path", &full), s)
        })
        .await?;
        Ok(ArchiveWritten { files: done.files, bytes: done.bytes })
    }

    pub async fn get_archive(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        compression: Compression,
    ) -> AppResult<Download> {
        let t = self.io_target(caller, id).await?;
        let full = sandbox_path(&t.base_cwd, path)?;
        let mut client = t.conn.client.clone();
        let msg = proto::GetArchiveRequest { path: full.clone(), compression: compression.to_proto() };
        let stream =
            client.get_archive(t.conn.request(msg)).await.map_err(|s| procd_error(id, ("path", &full), s))?;
        Ok(download(stream.into_inner(), |c| c.data, id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_taken_against_the_working_directory() {
        assert_eq!(sandbox_path("/workspace", "a/b").unwrap(), "/workspace/a/b");
        assert_eq!(sandbox_path("/workspace/", "a").unwrap(), "/workspace/a");
        assert_eq!(sandbox_path("/workspace", "/etc/x").unwrap(), "/etc/x");
        assert_eq!(sandbox_path("/workspace", "").unwrap_err().field, "path");
    }
}
