//! The job's work in its checked-out sandboxes (inputs `upload`, `run`, `download`): the runner's files go into
//! every sandbox's workspace as tar streams, the command runs in all of them at once with its shard in the
//! environment and its output streamed live into the job log (each line prefixed `[N]`), and the results come
//! back into `warmpool-results/<N>/`, also when the command failed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use warmpool_api::{FileType, OutputStream, ProcessCreate, SandboxId, StreamEvent};
use warmpool_client::{decode, ChannelReader, ChannelWriter, Client};

use crate::commands::ActionError;
use crate::runner::Runner;

type Result<T> = std::result::Result<T, ActionError>;

/// What the `upload`, `run` and `download` inputs ask for.
pub struct Work {
    pub upload: Vec<String>,
    pub run: Option<String>,
    pub download: Vec<String>,
}

impl Work {
    pub fn from_inputs(env: &crate::runner::ActionEnv) -> Work {
        Work {
            upload: env.input_lines("upload"),
            run: env.input("run"),
            download: env.input_lines("download"),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.upload.is_empty() && self.run.is_none() && self.download.is_empty()
    }
}

/// How one sandbox's command ended.
struct Outcome {
    exit_code: i32,
    duration: Duration,
}

fn failed(context: String) -> impl FnOnce(warmpool_client::Error) -> ActionError {
    move |source| ActionError::Api { context, source }
}

/// Where the runner's files are: the job's workspace.
fn workspace(r: &Runner<impl Write>) -> PathBuf {
    r.env.var("GITHUB_WORKSPACE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

/// Runs the work in `sandboxes` (index N = shard N); fails when an upload fails or any command fails.
pub async fn run<W: Write>(
    r: &mut Runner<W>,
    c: &Client,
    sandboxes: &[SandboxId],
    work: &Work,
) -> Result<()> {
    if sandboxes.is_empty() {
        return Err(ActionError::Failed(
            "upload, run and download need checked-out sandboxes (checkout > 0)".into(),
        ));
    }
    let root = workspace(r);
    if !work.upload.is_empty() {
        r.group(&format!("Uploading {} to {} sandbox(es)", work.upload.join(", "), sandboxes.len()));
        let started = Instant::now();
        let uploads = sandboxes.iter().map(|id| upload(c, id, &root, &work.upload));
        let results = futures::future::join_all(uploads).await;
        r.end_group();
        for result in results {
            result?;
        }
        r.info(&format!("Uploaded in {:.1}s", started.elapsed().as_secs_f64()));
    }
    let outcome = match &work.run {
        Some(command) => run_everywhere(r, c, sandboxes, command).await,
        None => Ok(()),
    };
    if !work.download.is_empty() {
        r.group(&format!("Downloading {} into warmpool-results/", work.download.join(", ")));
        for (n, id) in sandboxes.iter().enumerate() {
            let into = root.join("warmpool-results").join(n.to_string());
            for path in &work.download {
                match download(c, id, path, &into).await {
                    Ok(true) => r.info(&format!("[{n}] {path} → {}", into.join(relative(path)).display())),
                    Ok(false) => r.warning(&format!("[{n}] {path} does not exist in sandbox {id}")),
                    Err(e) => r.warning(&format!("[{n}] downloading {path} from {id}: {e}")),
                }
            }
        }
        r.end_group();
    }
    outcome
}

/// A path in the sandbox as it lands under `warmpool-results/<N>/` (leading `/` and `./` dropped).
fn relative(path: &str) -> PathBuf {
    Path::new(path).components().filter(|c| matches!(c, std::path::Component::Normal(_))).collect()
}

async fn upload(c: &Client, id: &str, root: &Path, paths: &[String]) -> Result<()> {
    for path in paths {
        let local = root.join(path);
        let meta = std::fs::metadata(&local)
            .map_err(|e| ActionError::Failed(format!("upload: {} cannot be read: {e}", local.display())))?;
        // `.` is the workspace itself; other paths keep their place relative to it.
        let target = relative(path).to_string_lossy().into_owned();
        let target = if target.is_empty() { ".".to_string() } else { target };
        if meta.is_dir() {
            let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
            let dir = local.clone();
            let pack = tokio::task::spawn_blocking(move || {
                let mut tar = tar::Builder::new(ChannelWriter::new(tx.clone()));
                tar.follow_symlinks(false);
                let done =
                    tar.append_dir_all(".", &dir).and_then(|()| tar.into_inner()).and_then(|mut w| w.flush());
                if let Err(e) = &done {
                    let _ = tx.blocking_send(Err(std::io::Error::new(e.kind(), e.to_string())));
                }
                done
            });
            let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            }));
            let sent = c.put_archive(id, &target, None, body).await;
            pack.await
                .map_err(|e| ActionError::Failed(e.to_string()))?
                .map_err(|e| ActionError::Failed(format!("upload: packing {}: {e}", local.display())))?;
            sent.map_err(failed(format!("uploading {path} to {id}")))?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            let file = tokio::fs::File::open(&local)
                .await
                .map_err(|e| ActionError::Failed(format!("upload: {}: {e}", local.display())))?;
            c.put_file(id, &target, Some(meta.permissions().mode() & 0o7777), file)
                .await
                .map_err(failed(format!("uploading {path} to {id}")))?;
        }
    }
    Ok(())
}

/// One line of a sandbox's output, or its end.
enum Line {
    Text(usize, String),
    Done(usize, Result<Outcome>),
}

async fn run_everywhere<W: Write>(
    r: &mut Runner<W>,
    c: &Client,
    sandboxes: &[SandboxId],
    command: &str,
) -> Result<()> {
    let total = sandboxes.len();
    r.info(&format!("Running in {total} sandbox(es): {command}"));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Line>(256);
    for (n, id) in sandboxes.iter().enumerate() {
        let (c, id, command, tx) = (c.clone(), id.clone(), command.to_string(), tx.clone());
        tokio::spawn(async move {
            let result = shard(&c, &id, n, total, &command, &tx).await;
            let _ = tx.send(Line::Done(n, result)).await;
        });
    }
    drop(tx);
    let mut outcomes: Vec<Option<Result<Outcome>>> = (0..total).map(|_| None).collect();
    while let Some(line) = rx.recv().await {
        match line {
            Line::Text(n, text) => r.info(&format!("[{n}] {text}")),
            Line::Done(n, result) => outcomes[n] = Some(result),
        }
    }
    let mut md =
        String::from("### Warmpool run\n\n| shard | sandbox | exit code | duration |\n|---|---|---|---|\n");
    let mut failures = Vec::new();
    for (n, (outcome, id)) in outcomes.into_iter().zip(sandboxes).enumerate() {
        match outcome {
            Some(Ok(o)) => {
                md.push_str(&format!(
                    "| {n} | {id} | {} | {:.1}s |\n",
                    o.exit_code,
                    o.duration.as_secs_f64()
                ));
                if o.exit_code != 0 {
                    r.error(
                        &format!("Shard {n} failed"),
                        &format!("[{n}] exited with code {} in sandbox {id}", o.exit_code),
                    );
                    failures.push(n);
                }
            }
            Some(Err(e)) => {
                md.push_str(&format!("| {n} | {id} | error | – |\n"));
                r.error(&format!("Shard {n} failed"), &format!("[{n}] {e}"));
                failures.push(n);
            }
            None => failures.push(n),
        }
    }
    r.summary(&md)?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(ActionError::Failed(format!("{} of {total} shard(s) failed: {:?}", failures.len(), failures)))
    }
}

/// Runs the command in one sandbox on the processes API, reading its output again from the last offset when
/// the connection drops; sends its lines as they complete.
async fn shard(
    c: &Client,
    id: &str,
    n: usize,
    total: usize,
    command: &str,
    tx: &tokio::sync::mpsc::Sender<Line>,
) -> Result<Outcome> {
    let req = ProcessCreate {
        command: vec!["/bin/sh".into(), "-c".into(), command.into()],
        env: Some(
            [
                ("WARMPOOL_SHARD_INDEX".to_string(), n.to_string()),
                ("WARMPOOL_SHARD_TOTAL".to_string(), total.to_string()),
            ]
            .into(),
        ),
        ..Default::default()
    };
    let started = Instant::now();
    let process = c.start_process(id, &req).await.map_err(failed(format!("starting the command in {id}")))?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut offset = 0u64;
    let mut retries = 0;
    loop {
        let mut events = match c.process_output(id, &process.id, offset, true).await {
            Ok(events) => events,
            Err(e) if matches!(e, warmpool_client::Error::Transport { .. }) && retries < 120 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(failed(format!("reading the output of {id}"))(e)),
        };
        while let Some(Ok(event)) = events.next().await {
            match event {
                StreamEvent::Output { stream, offset: at, data } => {
                    let data = decode(&data).map_err(failed(format!("output of {id}")))?;
                    let at = at.unwrap_or(offset);
                    let skip = offset.saturating_sub(at).min(data.len() as u64) as usize;
                    offset = at + data.len() as u64;
                    let buf = if stream == OutputStream::Stderr { &mut err } else { &mut out };
                    buf.extend_from_slice(&data[skip..]);
                    while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=i).collect();
                        let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                        let _ = tx.send(Line::Text(n, text)).await;
                    }
                }
                StreamEvent::Dropped { bytes } => {
                    let _ = tx.send(Line::Text(n, format!("({bytes} bytes of output were dropped)"))).await;
                }
                StreamEvent::Exit { exit_code, .. } => {
                    for rest in [out, err] {
                        if !rest.is_empty() {
                            let _ = tx.send(Line::Text(n, String::from_utf8_lossy(&rest).into_owned())).await;
                        }
                    }
                    return Ok(Outcome { exit_code, duration: started.elapsed() });
                }
            }
        }
        retries += 1;
        if retries > 120 {
            return Err(ActionError::Failed(format!("lost the output of sandbox {id}")));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Copies `path` of sandbox `id` into `into` (keeping its place relative to the sandbox's working directory);
/// false when it does not exist.
async fn download(c: &Client, id: &str, path: &str, into: &Path) -> Result<bool> {
    let trimmed = path.trim_end_matches('/');
    let (parent, name) = match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/", name),
        Some((parent, name)) => (parent, name),
        None => (".", trimmed),
    };
    let listing = match c.list_files(id, parent).await {
        Ok(items) => items,
        Err(e) if e.code() == Some("not_found") => return Ok(false),
        Err(e) => return Err(failed(format!("looking for {path} in {id}"))(e)),
    };
    let Some(kind) = listing.iter().find(|e| e.name == name).map(|e| e.file_type) else { return Ok(false) };
    let rel = relative(trimmed);
    // A directory's archive holds its contents; a file's, the file under its own name.
    let dst = if kind == FileType::Dir {
        into.join(&rel)
    } else {
        into.join(rel.parent().unwrap_or(Path::new("")))
    };
    let mut data =
        c.get_archive(id, trimmed, None).await.map_err(failed(format!("downloading {path} from {id}")))?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(8);
    let unpack = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&dst)?;
        let mut tar = tar::Archive::new(ChannelReader::new(rx));
        tar.set_preserve_permissions(true);
        tar.set_overwrite(true);
        tar.unpack(&dst)
    });
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(failed(format!("downloading {path} from {id}")))?;
        if tx.send(chunk).is_err() {
            break;
        }
    }
    drop(tx);
    unpack
        .await
        .map_err(|e| ActionError::Failed(e.to_string()))?
        .map_err(|e| ActionError::Failed(format!("unpacking {path} from {id}: {e}")))?;
    Ok(true)
}
