//! `warmpool sandbox exec | ps | kill | cp`: work inside a sandbox from a terminal or a script. `exec` runs on the
//! processes API, so a dropped connection only costs a reconnect: the command keeps running in the sandbox and
//! its output is read again from the last offset, nothing lost, nothing repeated.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use warmpool_api::*;
use warmpool_client::{decode, ChannelReader, ChannelWriter, Client};

use super::Global;

/// How long `exec` keeps trying to reach the server again after the connection dropped.
const RECONNECT_FOR: Duration = Duration::from_secs(300);

/// Whether an error is the connection's (worth a reconnect) rather than the server's answer.
fn transient(e: &warmpool_client::Error) -> bool {
    match e {
        warmpool_client::Error::Transport { .. } => true,
        warmpool_client::Error::Api { status, .. } => *status == 502 || *status == 503 || *status == 504,
        _ => false,
    }
}

/// Runs `command` in sandbox `id`, streaming its output live (stdout and stderr apart, bytes as they are),
/// forwarding stdin when it is not a terminal; answers the command's exit code (128 + N on signal N).
pub async fn exec(
    global: &Global,
    c: &Client,
    id: &str,
    cwd: Option<String>,
    env: Vec<(String, String)>,
    timeout: Option<Duration>,
    command: Vec<String>,
) -> anyhow::Result<i32> {
    let forward_stdin = !std::io::stdin().is_terminal();
    let req = ProcessCreate {
        command,
        cwd,
        env: (!env.is_empty()).then(|| env.into_iter().collect::<BTreeMap<_, _>>()),
        stdin: Some(forward_stdin),
        timeout_ms: timeout.map(|t| t.as_millis() as u64),
    };
    let process = c.start_process(id, &req).await?;
    let pid = process.id.clone();
    if forward_stdin {
        tokio::spawn(send_stdin(c.clone(), id.to_string(), pid.clone()));
    }
    // Ctrl-C reaches the command, as it would on a local terminal; the exit then comes through the stream.
    {
        let (c, id, pid) = (c.clone(), id.to_string(), pid.clone());
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                let _ = c.signal_process(&id, &pid, SignalName::Int).await;
            }
        });
    }
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr().lock());
    let mut offset = 0u64;
    let mut lost_since: Option<Instant> = None;
    loop {
        let events = match c.process_output(id, &pid, offset, true).await {
            Ok(events) => events,
            Err(e) if transient(&e) => {
                let since = *lost_since.get_or_insert_with(Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    return Err(e).context("the connection to the server is lost");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut events = events;
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                // The connection broke: read again from `offset`.
                Err(_) => break,
            };
            lost_since = None;
            if global.json {
                println!("{}", serde_json::to_string(&event)?);
            }
            match event {
                StreamEvent::Output { stream, offset: at, data } => {
                    let data = decode(&data)?;
                    let at = at.unwrap_or(offset);
                    // A repeated range after a reconnect is skipped, byte for byte.
                    let skip = offset.saturating_sub(at).min(data.len() as u64) as usize;
                    offset = at + data.len() as u64;
                    if !global.json {
                        let out: &mut dyn Write = match stream {
                            OutputStream::Stdout => &mut stdout,
                            OutputStream::Stderr => &mut stderr,
                        };
                        out.write_all(&data[skip..])?;
                        out.flush()?;
                    }
                }
                StreamEvent::Dropped { bytes } => {
                    eprintln!(
                        "warning: {bytes} bytes of output left the sandbox's buffer before they were read"
                    );
                }
                StreamEvent::Exit { exit_code, .. } => return Ok(exit_code.clamp(0, 255)),
            }
        }
        lost_since.get_or_insert_with(Instant::now);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Copies this process's stdin to the sandbox process's stdin, then closes it.
async fn send_stdin(c: Client, id: String, pid: String) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        let chunk = Bytes::copy_from_slice(&buf[..n]);
        for attempt in 0.. {
            match c.write_stdin(&id, &pid, chunk.clone(), n == 0).await {
                Ok(()) => break,
                Err(e) if transient(&e) && attempt < 100 => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => {
                    eprintln!("warning: stdin could not be sent: {e}");
                    return;
                }
            }
        }
        if n == 0 {
            return;
        }
    }
}

pub async fn ps(global: &Global, c: &Client, id: &str) -> anyhow::Result<i32> {
    let items = c.list_processes(id).await?;
    super::commands::print(global, &List::all(items), |l| {
        super::commands::table(
            &["ID", "STATE", "EXIT", "STARTED", "COMMAND"],
            l.items
                .iter()
                .map(|p| {
                    vec![
                        p.id.clone(),
                        if p.state == ProcessState::Running { "running".into() } else { "exited".into() },
                        p.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                        p.started_at.format("%H:%M:%S").to_string(),
                        p.command.join(" "),
                    ]
                })
                .collect(),
        )
    });
    Ok(0)
}

pub async fn kill(global: &Global, c: &Client, id: &str, pid: &str, signal: &str) -> anyhow::Result<i32> {
    let signal: SignalName = signal.parse().map_err(anyhow::Error::msg)?;
    c.signal_process(id, pid, signal).await?;
    super::commands::print(global, &serde_json::json!({"process": pid, "signal": signal}), |v| {
        format!("sent SIG{} to {pid}", v["signal"].as_str().unwrap_or_default())
    });
    Ok(0)
}

/// One side of `cp`: `ID:PATH` in a sandbox, `-` for a tar stream on stdin/stdout, else a local path.
enum Side {
    Sandbox { id: String, path: String },
    Stdio,
    Local(PathBuf),
}

fn side(text: &str) -> Side {
    if text == "-" {
        return Side::Stdio;
    }
    match text.split_once(':') {
        // `./a:b` or `/x:y` is a local path that holds a colon, as with `docker cp`.
        Some((id, path)) if !id.is_empty() && !id.contains('/') => {
            Side::Sandbox { id: id.into(), path: if path.is_empty() { ".".into() } else { path.into() } }
        }
        _ => Side::Local(text.into()),
    }
}

fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

fn base_name(path: &str) -> String {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != ".")
        .unwrap_or("root")
        .to_string()
}

/// The type of `path` in the sandbox, if it exists (from its parent's listing: a file's listing cannot be told
/// from a directory's).
async fn remote_type(c: &Client, id: &str, path: &str) -> anyhow::Result<Option<FileType>> {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() || trimmed == "." || !trimmed.contains('/') && path.starts_with('/') {
        return Ok(Some(FileType::Dir));
    }
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((parent, name)) => (parent, name),
        None => (".", trimmed),
    };
    match c.list_files(id, parent).await {
        Ok(items) => Ok(items.into_iter().find(|e| e.name == name).map(|e| e.file_type)),
        Err(e) if e.code() == Some("not_found") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `cp SRC DST` like `docker cp`: a directory is copied as a tar stream; into an existing directory it lands
/// under its own name, else it becomes DST.
pub async fn cp(global: &Global, c: &Client, src: &str, dst: &str) -> anyhow::Result<i32> {
    let summary = match (side(src), side(dst)) {
        (Side::Local(from), Side::Sandbox { id, path }) => upload(c, &from, &id, &path).await?,
        (Side::Stdio, Side::Sandbox { id, path }) => {
            let body = reqwest::Body::wrap_stream(reader_stream(tokio::io::stdin()));
            let done = c.put_archive(&id, &path, None, body).await?;
            serde_json::json!({"to": format!("{id}:{path}"), "files": done.files, "bytes": done.bytes})
        }
        (Side::Sandbox { id, path }, Side::Local(to)) => download(c, &id, &path, &to).await?,
        (Side::Sandbox { id, path }, Side::Stdio) => {
            let mut data = c.get_archive(&id, &path, None).await?;
            let mut out = tokio::io::stdout();
            let mut bytes = 0u64;
            while let Some(chunk) = data.next().await {
                let chunk = chunk?;
                bytes += chunk.len() as u64;
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await?;
            }
            tokio::io::AsyncWriteExt::flush(&mut out).await?;
            return Ok(if bytes > 0 { 0 } else { 1 });
        }
        (Side::Sandbox { .. }, Side::Sandbox { .. }) => {
            anyhow::bail!("copy between sandboxes: copy to a local path first")
        }
        _ => anyhow::bail!("one side must be ID:PATH (a path in a sandbox)"),
    };
    super::commands::print(global, &summary, |s| {
        let to = s["to"].as_str().unwrap_or_default();
        match s["files"].as_u64() {
            Some(files) => format!("copied {files} files, {} bytes to {to}", s["bytes"]),
            None => format!("copied {} bytes (a tar stream) to {to}", s["bytes"]),
        }
    });
    Ok(0)
}

fn reader_stream(
    reader: impl tokio::io::AsyncRead + Send + Unpin + 'static,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures::stream::unfold((reader, false), |(mut reader, done)| async move {
        if done {
            return None;
        }
        let mut buf = vec![0u8; 256 * 1024];
        match reader.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (reader, false)))
            }
            Err(e) => Some((Err(e), (reader, true))),
        }
    })
}

async fn upload(c: &Client, from: &Path, id: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let meta = std::fs::metadata(from).with_context(|| format!("reading {}", from.display()))?;
    let name = from
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "root".into());
    let existing = remote_type(c, id, path).await?;
    let into_dir = existing == Some(FileType::Dir) || path.ends_with('/');
    if meta.is_dir() {
        let target = if existing == Some(FileType::Dir) { join(path, &name) } else { path.to_string() };
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
        let dir = from.to_path_buf();
        let pack = tokio::task::spawn_blocking(move || {
            let mut tar = tar::Builder::new(ChannelWriter::new(tx.clone()));
            tar.follow_symlinks(false);
            let result =
                tar.append_dir_all(".", &dir).and_then(|()| tar.into_inner()).and_then(|mut w| w.flush());
            if let Err(e) = &result {
                let _ = tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
            }
            result
        });
        let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        let done = c.put_archive(id, &target, None, body).await;
        pack.await?.with_context(|| format!("packing {}", from.display()))?;
        let done = done?;
        Ok(serde_json::json!({"to": format!("{id}:{target}"), "files": done.files, "bytes": done.bytes}))
    } else {
        let target = if into_dir { join(path, &name) } else { path.to_string() };
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        let file = tokio::fs::File::open(from).await?;
        let written = c.put_file(id, &target, Some(mode), file).await?;
        Ok(serde_json::json!({"to": format!("{id}:{}", written.path), "files": 1, "bytes": written.size}))
    }
}

async fn download(c: &Client, id: &str, path: &str, to: &Path) -> anyhow::Result<serde_json::Value> {
    let kind = remote_type(c, id, path).await?.with_context(|| format!("{id}:{path} does not exist"))?;
    let name = base_name(path);
    let target = if to.is_dir() { to.join(&name) } else { to.to_path_buf() };
    let mut data = if kind == FileType::Dir {
        c.get_archive(id, path, Some("zstd")).await?
    } else {
        c.get_file(id, path).await?
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(8);
    let dst = target.clone();
    let is_dir = kind == FileType::Dir;
    let write = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut input = ChannelReader::new(rx);
        if is_dir {
            std::fs::create_dir_all(&dst)?;
            let mut tar = tar::Archive::new(zstd::Decoder::new(&mut input)?);
            tar.set_preserve_permissions(true);
            tar.set_preserve_mtime(true);
            tar.set_overwrite(true);
            tar.unpack(&dst)?;
        } else {
            let mut file = std::fs::File::create(&dst)?;
            std::io::copy(&mut input, &mut file)?;
        }
        Ok(input.bytes_read())
    });
    let mut failed = None;
    while let Some(chunk) = data.next().await {
        match chunk {
            Ok(chunk) => {
                if tx.send(chunk).is_err() {
                    break;
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let bytes = write.await?.with_context(|| format!("writing {}", target.display()))?;
    if let Some(e) = failed {
        return Err(e).context("the download broke off");
    }
    Ok(
        serde_json::json!({"to": target.display().to_string(), "files": if is_dir { serde_json::Value::Null } else { 1.into() }, "bytes": bytes}),
    )
}
