//! Work inside a sandbox: the streamed exec, processes and their output, files and archives. Streams are
//! streams both ways: uploads take any `reqwest::Body` (a file, a stream of chunks), downloads and events come
//! back as async streams, never collected.

use base64::Engine;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use reqwest::Method;
use warmpool_api::*;

use super::{Client, Error, Result};

/// Bytes as the server sends them.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

/// Events of a streamed exec or of a process's output, one per line of the answer.
pub type EventStream = BoxStream<'static, Result<StreamEvent>>;

/// The bytes of an `output` event's `data`.
pub fn decode(data: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| Error::Decode(format!("output data: {e}")))
}

impl Client {
    fn request(&self, method: Method, segments: &[&str]) -> reqwest::RequestBuilder {
        let req = self.http.request(method, self.url(segments));
        match &self.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    fn bytes(&self, resp: reqwest::Response) -> ByteStream {
        let endpoint = self.base.to_string();
        resp.bytes_stream()
            .map(move |r| r.map_err(|source| Error::Transport { endpoint: endpoint.clone(), source }))
            .boxed()
    }

    /// Splits an `application/x-ndjson` answer into its events, each as soon as its line is complete.
    fn events(&self, resp: reqwest::Response) -> EventStream {
        let parse = |line: &[u8]| {
            serde_json::from_slice::<StreamEvent>(line).map_err(|e| Error::Decode(e.to_string()))
        };
        let blank = |line: &[u8]| line.iter().all(u8::is_ascii_whitespace);
        futures::stream::unfold(
            (self.bytes(resp), Vec::new(), false),
            move |(mut bytes, mut buf, mut done)| async move {
                loop {
                    if let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        if blank(&line) {
                            continue;
                        }
                        return Some((parse(&line), (bytes, buf, done)));
                    }
                    if done {
                        if blank(&buf) {
                            return None;
                        }
                        let line = std::mem::take(&mut buf);
                        return Some((parse(&line), (bytes, buf, done)));
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                        Some(Err(e)) => {
                            buf.clear();
                            return Some((Err(e), (bytes, buf, true)));
                        }
                        None => done = true,
                    }
                }
            },
        )
        .boxed()
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.send(req).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| Error::Transport { endpoint: self.base.to_string(), source })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    /// `POST …/exec` with `Accept: application/x-ndjson`: the command's output as it happens, then its exit.
    /// Dropping the stream ends the request, and the server kills the command.
    pub async fn exec_stream(&self, id: &str, req: &ExecRequest) -> Result<EventStream> {
        let http = self
            .request(Method::POST, &["v1", "sandboxes", id, "exec"])
            .header("accept", "application/x-ndjson")
            .json(req);
        Ok(self.events(self.send(http).await?))
    }

    pub async fn start_process(&self, id: &str, req: &ProcessCreate) -> Result<Process> {
        self.json(self.request(Method::POST, &["v1", "sandboxes", id, "processes"]).json(req)).await
    }

    pub async fn list_processes(&self, id: &str) -> Result<Vec<Process>> {
        let list: List<Process> =
            self.json(self.request(Method::GET, &["v1", "sandboxes", id, "processes"])).await?;
        Ok(list.items)
    }

    pub async fn get_process(&self, id: &str, pid: &str) -> Result<Process> {
        self.json(self.request(Method::GET, &["v1", "sandboxes", id, "processes", pid])).await
    }

    /// A process's output from `offset` of its combined output; with `follow` until it exits (then its exit).
    pub async fn process_output(
        &self,
        id: &str,
        pid: &str,
        offset: u64,
        follow: bool,
    ) -> Result<EventStream> {
        let http = self
            .request(Method::GET, &["v1", "sandboxes", id, "processes", pid, "output"])
            .query(&[("offset", offset.to_string()), ("follow", follow.to_string())]);
        Ok(self.events(self.send(http).await?))
    }

    pub async fn write_stdin(
        &self,
        id: &str,
        pid: &str,
        data: impl Into<reqwest::Body>,
        close: bool,
    ) -> Result<()> {
        let http = self
            .request(Method::POST, &["v1", "sandboxes", id, "processes", pid, "stdin"])
            .query(&[("close", close.to_string())])
            .header("content-type", "application/octet-stream")
            .body(data);
        self.send(http).await.map(drop)
    }

    pub async fn signal_process(&self, id: &str, pid: &str, signal: SignalName) -> Result<()> {
        let http = self
            .request(Method::POST, &["v1", "sandboxes", id, "processes", pid, "signal"])
            .json(&SignalRequest { signal });
        self.send(http).await.map(drop)
    }

    /// Writes a file (parents created); `mode` is the permission bits (default 0644).
    pub async fn put_file(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        data: impl Into<reqwest::Body>,
    ) -> Result<FileWritten> {
        let mut query = vec![("path", path.to_string())];
        if let Some(mode) = mode {
            query.push(("mode", format!("{mode:o}")));
        }
        let http = self
            .request(Method::PUT, &["v1", "sandboxes", id, "files"])
            .query(&query)
            .header("content-type", "application/octet-stream")
            .body(data);
        self.json(http).await
    }

    pub async fn get_file(&self, id: &str, path: &str) -> Result<ByteStream> {
        let http = self.request(Method::GET, &["v1", "sandboxes", id, "files"]).query(&[("path", path)]);
        Ok(self.bytes(self.send(http).await?))
    }

    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileEntry>> {
        let http = self
            .request(Method::GET, &["v1", "sandboxes", id, "files"])
            .query(&[("path", path), ("list", "true")]);
        let list: List<FileEntry> = self.json(http).await?;
        Ok(list.items)
    }

    pub async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<()> {
        let http = self
            .request(Method::DELETE, &["v1", "sandboxes", id, "files"])
            .query(&[("path", path.to_string()), ("recursive", recursive.to_string())]);
        self.send(http).await.map(drop)
    }

    /// Unpacks a tar stream under `dir`; `encoding` is `gzip` or `zstd` for a compressed one.
    pub async fn put_archive(
        &self,
        id: &str,
        dir: &str,
        encoding: Option<&str>,
        tar: impl Into<reqwest::Body>,
    ) -> Result<ArchiveWritten> {
        let mut http = self
            .request(Method::PUT, &["v1", "sandboxes", id, "archive"])
            .query(&[("path", dir)])
            .header("content-type", "application/x-tar")
            .body(tar);
        if let Some(encoding) = encoding {
            http = http.header("content-encoding", encoding);
        }
        self.json(http).await
    }

    /// A tar stream of `path` (a directory's contents, or one file); `compression` is `gzip` or `zstd`.
    pub async fn get_archive(&self, id: &str, path: &str, compression: Option<&str>) -> Result<ByteStream> {
        let http = self
            .request(Method::GET, &["v1", "sandboxes", id, "archive"])
            .query(&[("path", path), ("compression", compression.unwrap_or("none"))]);
        Ok(self.bytes(self.send(http).await?))
    }
}

/// A `Write`, for a blocking thread (a tar builder), whose bytes become an upload's body: chunks of 256 KiB on
/// a bounded channel, so the writer waits for the upload and memory stays flat.
pub struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    pub fn new(tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>) -> ChannelWriter {
        ChannelWriter { tx, buf: Vec::new() }
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 256 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload ended"))
    }
}

/// A `Read`, for a blocking thread (a tar reader), over a download's chunks; it ends when the sender goes.
pub struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Bytes>,
    chunk: Bytes,
    read: u64,
}

impl ChannelReader {
    pub fn new(rx: std::sync::mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader { rx, chunk: Bytes::new(), read: 0 }
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.recv() {
                Ok(chunk) => self.chunk = chunk,
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len());
        out[..n].copy_from_slice(&self.chunk.split_to(n));
        self.read += n as u64;
        Ok(n)
    }
}
