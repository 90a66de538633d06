//! The supervisor: spawns processes (each in its own process group), reaps every child including orphans that
//! procd inherits as PID 1, keeps each stream's output, and tells procd's main loop when a warm process exits.
//!
//! The reaper and `spawn` share one lock: a child is registered before the reaper can ever collect it, so its exit
//! is never missed (no race between start and watch), and the reaper never steals the status of a child that
//! `std::process::Command::spawn` is still waiting on.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};

use warmpool_api::EXEC_OUTPUT_LIMIT;

use crate::output::{CombinedOutput, LineSplitter, Mirror, StreamName, StreamOutput};

/// Exited API processes kept (with their output) for late readers.
const KEEP_EXITED: usize = 32;

/// What procd's main loop hears from the supervisor and the probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A warm process exited while procd was not shutting down.
    WarmExited { name: String, code: i32 },
    /// A liveness probe reached its failure threshold.
    LivenessFailed { name: String, message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("working directory {0:?} does not exist or is not a directory")]
    Cwd(PathBuf),
    #[error("cannot start {command:?}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no process named {0:?}")]
    NoSuchProcess(String),
    #[error("a process named {0:?} already exists")]
    Exists(String),
    #[error("process {0:?} has no open stdin")]
    NoStdin(String),
    #[error("command must not be empty")]
    EmptyCommand,
    #[error("warm process {0:?} cannot be signalled, restarted or deleted through the API")]
    WarmProcess(String),
    #[error("cannot write to stdin of {name:?}")]
    Stdin {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Registry of children whose exit someone waits for.
#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<Exit>>>,
}

impl Reaper {
    fn spawn(
        &self,
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, oneshot::Receiver<Exit>)> {
        let mut waiters = self.waiters.lock().expect("reaper lock");
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Collects every exited child: registered ones report their status, orphans are just reaped.
    pub fn reap(&self) {
        let mut waiters = self.waiters.lock().expect("reaper lock");
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(tx) = waiters.remove(&pid) {
                let _ = tx.send(decode_status(status));
            }
        }
    }

    /// Reaps on every SIGCHLD (and twice a second, in case one was coalesced).
    pub async fn run(self: Arc<Self>) {
        let mut sigchld =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()).expect("SIGCHLD");
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = sigchld.recv() => {}
                _ = tick.tick() => {}
            }
            self.reap();
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal that killed the process.
    pub code: i32,
    pub signal: Option<i32>,
    pub at: std::time::SystemTime,
}

impl Exit {
    fn unknown() -> Exit {
        Exit { code: -1, signal: None, at: std::time::SystemTime::now() }
    }
}

fn decode_status(status: i32) -> Exit {
    let (code, signal) = if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status), None)
    } else if libc::WIFSIGNALED(status) {
        (128 + libc::WTERMSIG(status), Some(libc::WTERMSIG(status)))
    } else {
        (-1, None)
    };
    Exit { code, signal, at: std::time::SystemTime::now() }
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct SpawnRequest {
    pub name: String,
    pub alias: Option<String>,
    pub argv: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub warm: bool,
    pub stdin: bool,
}

/// A started process and its output.
pub struct Process {
    pub name: String,
    pub alias: Option<String>,
    pub pid: u32,
    pub warm: bool,
    pub argv: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub stdout: Arc<StreamOutput>,
    pub stderr: Arc<StreamOutput>,
    /// Both streams in the order they were read, with offsets into their combined bytes.
    pub combined: Arc<CombinedOutput>,
    pub started_at: std::time::SystemTime,
    stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
    exit: watch::Receiver<Option<Exit>>,
}

impl Process {
    pub fn exit_code(&self) -> Option<i32> {
        self.exit.borrow().map(|e| e.code)
    }
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
    pub fn running(&self) -> bool {
        self.exit_code().is_none()
    }
    pub async fn wait(&self) -> i32 {
        let mut rx = self.exit.clone();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit.code;
            }
            if rx.changed().await.is_err() {
                return -1;
            }
        }
    }
    pub fn stream(&self, name: StreamName) -> &Arc<StreamOutput> {
        match name {
            StreamName::Stdout => &self.stdout,
            StreamName::Stderr => &self.stderr,
        }
    }
}

/// The result of [`Supervisor::exec`] once the command is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecExit {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub duration: Duration,
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// What an `exec` produces, in order: output chunks as they are read, then one exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Output(StreamName, Vec<u8>),
    Exit(ExecExit),
}

/// A whole `exec` collected in memory (probes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    pub exit: ExecExit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

pub struct Supervisor {
    reaper: Arc<Reaper>,
    processes: Mutex<Vec<Arc<Process>>>,
    mirror: Mirror,
    shutting_down: AtomicBool,
    paused: AtomicBool,
    events: mpsc::UnboundedSender<Event>,
}

impl Supervisor {
    pub fn new(reaper: Arc<Reaper>, mirror: Mirror) -> (Arc<Supervisor>, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let sup = Supervisor {
            reaper,
            processes: Mutex::new(Vec::new()),
            mirror,
            shutting_down: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            events,
        };
        (Arc::new(sup), rx)
    }

    pub fn events(&self) -> mpsc::UnboundedSender<Event> {
        self.events.clone()
    }

    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn processes(&self) -> Vec<Arc<Process>> {
        self.processes.lock().expect("process list").clone()
    }

    pub fn warm_processes(&self) -> Vec<Arc<Process>> {
        self.processes().into_iter().filter(|p| p.warm).collect()
    }

    pub fn get(&self, name: &str) -> Result<Arc<Process>, SupervisorError> {
        self.processes()
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| SupervisorError::NoSuchProcess(name.to_string()))
    }

    /// Starts a tracked process: its output is kept and mirrored, and a warm one's exit is reported.
    pub fn spawn(self: &Arc<Self>, req: SpawnRequest) -> Result<Arc<Process>, SupervisorError> {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(SupervisorError::EmptyCommand);
        }
        if self.processes().iter().any(|p| p.name == req.name && p.running()) {
            return Err(SupervisorError::Exists(req.name));
        }
        // A warm process's working directory is made here, inside the sandbox, where a symlink cannot lead
        // outside its root (the server never creates paths in a sandbox's filesystem).
        if let Some(dir) = req.cwd.as_ref().filter(|_| req.warm) {
            std::fs::create_dir_all(dir).map_err(|source| SupervisorError::Spawn {
                command: format!("mkdir -p {}", dir.display()),
                source,
            })?;
        }
        let Started { pid, stdin, stdout: stdout_pipe, stderr: stderr_pipe, exited } =
            self.start(&req.argv, req.cwd.as_ref(), &req.env, req.stdin)?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let process = Arc::new(Process {
            name: req.name,
            alias: req.alias,
            pid,
            warm: req.warm,
            argv: req.argv,
            cwd: req.cwd,
            env: req.env,
            stdout: Arc::new(StreamOutput::default()),
            stderr: Arc::new(StreamOutput::default()),
            combined: Arc::new(CombinedOutput::default()),
            started_at: std::time::SystemTime::now(),
            stdin: tokio::sync::Mutex::new(stdin),
            exit: exit_rx,
        });
        {
            let mut list = self.processes.lock().expect("process list");
            // Exited API processes stay listed (with their output) until newer ones push them out.
            let exited: Vec<usize> =
                (0..list.len()).filter(|&i| !list[i].warm && !list[i].running()).collect();
            if exited.len() >= KEEP_EXITED {
                list.remove(exited[0]);
            }
            list.push(process.clone());
        }

        let mut readers = Vec::new();
        for (stream, pipe) in [(StreamName::Stdout, stdout_pipe), (StreamName::Stderr, stderr_pipe)] {
            if let Some(pipe) = pipe {
                readers.push(tokio::spawn(pump(self.mirror.clone(), process.clone(), stream, pipe)));
            }
        }
        let sup = self.clone();
        let watched = process.clone();
        tokio::spawn(async move {
            let exit = exited.await.unwrap_or_else(|_| Exit::unknown());
            let code = exit.code;
            // Give the readers a moment to drain what the process wrote; a grandchild holding the pipe open
            // must not keep the exit from being reported.
            let _ = tokio::time::timeout(Duration::from_millis(500), futures_join(readers)).await;
            if watched.warm {
                // A warm process's last words are in procd's log before anyone hears of its exit: the server reads
                // the log's tail to say why a start failed.
                let mirror = sup.mirror.clone();
                let _ = tokio::task::spawn_blocking(move || mirror.flush(Duration::from_millis(500))).await;
            }
            watched.stdout.close();
            watched.stderr.close();
            watched.combined.close();
            let _ = exit_tx.send(Some(Exit { at: std::time::SystemTime::now(), ..exit }));
            if watched.warm && !sup.is_shutting_down() {
                tracing::error!(process = %watched.name, pid = watched.pid, code, "Warm process exited");
                let _ = sup.events.send(Event::WarmExited { name: watched.name.clone(), code });
            }
        });
        Ok(process)
    }

    /// Runs a command to completion (or `timeout`, when its whole process group is killed), sending its output to
    /// `events` as it is read (at most `limit` bytes per stream; the rest is read and dropped) and
    /// then its exit. Fails before anything is sent when the command cannot start. When the receiver of `events`
    /// is dropped the command's process group is killed and no exit is sent.
    // Each argument is one field of the request; a struct would only repeat them.
    #[allow(clippy::too_many_arguments)]
    pub async fn exec(
        &self,
        argv: &[String],
        cwd: Option<&PathBuf>,
        env: &BTreeMap<String, String>,
        stdin: Vec<u8>,
        timeout: Duration,
        limit: usize,
        events: mpsc::Sender<ExecEvent>,
    ) -> Result<(), SupervisorError> {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(SupervisorError::EmptyCommand);
        }
        if let Some(dir) = cwd.filter(|d| !d.is_dir()) {
            return Err(SupervisorError::Cwd(dir.clone()));
        }
        let started = Instant::now();
        let started_process = self.start(argv, cwd, env, !stdin.is_empty())?;
        let pid = started_process.pid as i32;
        if let Some(mut tx) = started_process.stdin {
            tokio::spawn(async move {
                let _ = tx.write_all(&stdin).await;
            });
        }
        let out = tokio::spawn(forward(started_process.stdout, StreamName::Stdout, limit, events.clone()));
        let err = tokio::spawn(forward(started_process.stderr, StreamName::Stderr, limit, events.clone()));
        let (exit_code, signal, timed_out) = tokio::select! {
            waited = tokio::time::timeout(timeout, started_process.exited) => match waited {
                Ok(exit) => {
                    let exit = exit.unwrap_or_else(|_| Exit::unknown());
                    (exit.code, exit.signal, false)
                }
                Err(_) => {
                    kill_group(pid, libc::SIGKILL);
                    (-1, None, true)
                }
            },
            // The caller went away (its HTTP client disconnected, so the server dropped the call): nobody will read
            // the result, and a command left running would hold the sandbox's resources until its timeout.
            () = events.closed() => {
                kill_group(pid, libc::SIGKILL);
                tracing::info!(pid, "The caller of an exec went away; its process group was killed");
                return Ok(());
            }
        };
        // A grandchild holding a pipe open must not keep the exit from being reported.
        let grace = Duration::from_millis(200);
        let stdout_truncated =
            tokio::time::timeout(grace, out).await.ok().and_then(Result::ok).unwrap_or(false);
        let stderr_truncated =
            tokio::time::timeout(grace, err).await.ok().and_then(Result::ok).unwrap_or(false);
        let exit = ExecExit {
            exit_code,
            signal,
            duration: started.elapsed(),
            timed_out,
            stdout_truncated,
            stderr_truncated,
        };
        let _ = events.send(ExecEvent::Exit(exit)).await;
        Ok(())
    }

    /// [`Supervisor::exec`], collected in memory.
    pub async fn exec_collect(
        &self,
        argv: &[String],
        cwd: Option<&PathBuf>,
        env: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> Result<ExecOutcome, SupervisorError> {
        let (tx, mut rx) = mpsc::channel(16);
        let run = self.exec(argv, cwd, env, Vec::new(), timeout, EXEC_OUTPUT_LIMIT, tx);
        let collect = async {
            let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
            while let Some(event) = rx.recv().await {
                match event {
                    ExecEvent::Output(StreamName::Stdout, data) => stdout.extend_from_slice(&data),
                    ExecEvent::Output(StreamName::Stderr, data) => stderr.extend_from_slice(&data),
                    ExecEvent::Exit(e) => exit = Some(e),
                }
            }
            (stdout, stderr, exit)
        };
        let (result, (stdout, stderr, exit)) = tokio::join!(run, collect);
        result?;
        Ok(ExecOutcome { exit: exit.expect("exec always ends with its exit"), stdout, stderr })
    }

    pub async fn write_stdin(&self, name: &str, data: &[u8], close: bool) -> Result<(), SupervisorError> {
        let process = self.get(name)?;
        let mut guard = process.stdin.lock().await;
        let tx = guard.as_mut().ok_or_else(|| SupervisorError::NoStdin(name.into()))?;
        tx.write_all(data).await.map_err(|source| SupervisorError::Stdin { name: name.into(), source })?;
        if close {
            *guard = None;
        }
        Ok(())
    }

    /// Signals a non-warm process's group. Warm processes are owned by procd: signalling one could only stop or
    /// kill it, which the API must not do (409).
    pub fn signal(&self, name: &str, signal: i32) -> Result<(), SupervisorError> {
        let process = self.get(name)?;
        if process.warm {
            return Err(SupervisorError::WarmProcess(name.into()));
        }
        if process.running() {
            kill_group(process.pid as i32, signal);
        }
        Ok(())
    }

    /// Stops or continues every warm process group.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
        for p in self.processes().iter().filter(|p| p.running()) {
            kill_group(p.pid as i32, signal);
        }
    }

    /// Graceful stop: SIGTERM every process group (continued first if paused), SIGKILL what is left after
    /// `grace`, then flush the mirror. Exits seen from here on are not crashes.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let running: Vec<_> = self.processes().into_iter().filter(|p| p.running()).collect();
        for p in &running {
            kill_group(p.pid as i32, libc::SIGTERM);
            kill_group(p.pid as i32, libc::SIGCONT);
        }
        let all = async {
            for p in &running {
                p.wait().await;
            }
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            for p in running.iter().filter(|p| p.running()) {
                tracing::warn!(process = %p.name, pid = p.pid, "Process ignored SIGTERM; killing it");
                kill_group(p.pid as i32, libc::SIGKILL);
            }
            for p in &running {
                let _ = tokio::time::timeout(Duration::from_secs(1), p.wait()).await;
            }
        }
        self.mirror.flush(Duration::from_secs(2));
    }
}

/// A child just spawned: its pipes and its exit, registered with the reaper before it could exit.
struct Started {
    pid: u32,
    stdin: Option<pipe::Sender>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    exited: oneshot::Receiver<Exit>,
}

impl Supervisor {
    fn start(
        &self,
        argv: &[String],
        cwd: Option<&PathBuf>,
        env: &BTreeMap<String, String>,
        stdin: bool,
    ) -> Result<Started, SupervisorError> {
        let mut cmd = command(argv, cwd, env);
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() });
        let (mut child, exited) = self
            .reaper
            .spawn(&mut cmd)
            .map_err(|source| SupervisorError::Spawn { command: argv.join(" "), source })?;
        let receiver = |fd: Option<OwnedFd>| fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok());
        Ok(Started {
            pid: child.id(),
            stdin: child.stdin.take().and_then(|s| pipe::Sender::from_owned_fd(OwnedFd::from(s)).ok()),
            stdout: receiver(child.stdout.take().map(OwnedFd::from)),
            stderr: receiver(child.stderr.take().map(OwnedFd::from)),
            exited,
        })
    }
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

fn command(argv: &[String], cwd: Option<&PathBuf>, env: &BTreeMap<String, String>) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).envs(env).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    cmd
}

pub fn kill_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// Copies one stream into its ring buffer and the mirror, line by line.
async fn pump(mirror: Mirror, process: Arc<Process>, stream: StreamName, mut pipe: pipe::Receiver) {
    let mut splitter = LineSplitter::new(mirror.max_bytes());
    let mut buf = vec![0u8; 16 * 1024];
    let out = process.stream(stream).clone();
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                out.push(&buf[..n]);
                process.combined.push(stream, &buf[..n]);
                if mirror.enabled() {
                    for line in splitter.push(&buf[..n]) {
                        mirror.emit(&process.name, process.alias.as_deref(), process.pid, stream, &line);
                    }
                }
            }
        }
    }
    if let Some(line) = splitter.flush() {
        mirror.emit(&process.name, process.alias.as_deref(), process.pid, stream, &line);
    }
}

/// Sends one exec stream to `events` in chunks, up to `limit` bytes; returns whether it was cut.
async fn forward(
    pipe: Option<impl AsyncRead + Unpin>,
    stream: StreamName,
    limit: usize,
    events: mpsc::Sender<ExecEvent>,
) -> bool {
    let Some(mut pipe) = pipe else { return false };
    let mut buf = vec![0u8; 64 * 1024];
    let (mut sent, mut truncated) = (0usize, false);
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = limit.saturating_sub(sent);
        truncated |= n > room;
        if room > 0 {
            let take = n.min(room);
            sent += take;
            // A receiver that went away (the caller hung up) stops nothing: the pipe is still drained.
            let _ = events.send(ExecEvent::Output(stream, buf[..take].to_vec())).await;
        }
    }
    truncated
}
