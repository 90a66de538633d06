//! procd: PID 1 of every Warmpool sandbox. It starts the template's warm processes, supervises them (any exit
//! ends the sandbox), runs their startup/readiness/liveness probes, keeps their output in ring buffers and mirrors
//! it as bounded JSON lines, and serves all of that over gRPC (`warmpool.procd.v1.Procd`).
//!
//! Exit codes: 0 after a graceful stop (SIGTERM/SIGINT), 1 when a warm process exited, 2 for an invalid
//! configuration (before anything starts), 3 when a liveness probe failed.

pub mod archive;
pub mod config;
pub mod convert;
pub mod files;
pub mod grpc;
pub mod output;
pub mod probes;
pub mod supervisor;

/// The generated gRPC code.
pub mod proto {
    tonic::include_proto!("warmpool.procd.v1");
}

use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use config::{Listen, Settings};
use output::Mirror;
use supervisor::{Event, Reaper, SpawnRequest, Supervisor};

pub const EXIT_OK: i32 = 0;
pub const EXIT_WARM_PROCESS_EXITED: i32 = 1;
pub const EXIT_INVALID_CONFIG: i32 = 2;
pub const EXIT_LIVENESS_FAILED: i32 = 3;

/// How long warm processes get between SIGTERM and SIGKILL.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {listen}")]
    Listen {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start warm process {name:?}")]
    Start {
        name: String,
        #[source]
        source: supervisor::SupervisorError,
    },
}

/// Runs procd until it stops; returns the process exit code.
pub async fn run(settings: Settings) -> Result<i32, RunError> {
    for warning in &settings.logs.warnings {
        tracing::warn!("{warning}");
    }
    let reaper = Arc::new(Reaper::default());
    tokio::spawn(reaper.clone().run());
    let mirror = Mirror::start(settings.logs.enabled, settings.logs.max_bytes);
    let (sup, mut events) = Supervisor::new(reaper, mirror);
    let names: Vec<_> = settings
        .warm_processes
        .iter()
        .enumerate()
        .map(|(i, spec)| (spec.effective_name(i), spec.clone()))
        .collect();
    let probes = probes::Probes::new(sup.clone(), names.clone());
    let service = grpc::ProcdService::new(sup.clone(), probes.clone(), settings.token.clone());

    // The listener is taken first (an inherited one is made close-on-exec before any process starts), the warm
    // processes are started, and only then is anything answered: a call naming a warm process finds it. Calls that
    // arrive meanwhile wait in the listen backlog.
    let listener = listen(&settings.listen).await?;
    for (name, spec) in &names {
        let req = SpawnRequest {
            name: name.clone(),
            alias: spec.alias.clone(),
            argv: spec.argv(),
            cwd: spec.cwd.as_ref().map(Into::into),
            env: spec.env.clone(),
            warm: true,
            stdin: spec.process_type == warmpool_api::ProcessType::Repl,
        };
        match sup.spawn(req) {
            Ok(process) => {
                tracing::info!(process = %name, pid = process.pid, "Warm process started");
                probes.start(process);
            }
            Err(source) => {
                sup.shutdown(SHUTDOWN_GRACE).await;
                return Err(RunError::Start { name: name.clone(), source });
            }
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = serve(listener, service, stop_rx);
    tracing::info!(listen = %settings.listen, processes = names.len(), "procd is serving");

    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT");
    let code = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: stopping"); EXIT_OK }
        _ = int.recv() => { tracing::info!("SIGINT: stopping"); EXIT_OK }
        Some(event) = events.recv() => match event {
            Event::WarmExited { name, code } => {
                tracing::error!(process = %name, code, "A warm process exited; procd stops so the sandbox is replaced");
                EXIT_WARM_PROCESS_EXITED
            }
            Event::LivenessFailed { name, message } => {
                tracing::error!(process = %name, %message, "Liveness failed; procd stops");
                // Probe calls in flight read the failed state already recorded; let them be answered.
                tokio::time::sleep(Duration::from_millis(200)).await;
                EXIT_LIVENESS_FAILED
            }
        },
    };
    sup.shutdown(SHUTDOWN_GRACE).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    if let Listen::Unix(path) = &settings.listen {
        let _ = std::fs::remove_file(path);
    }
    Ok(code)
}

/// procd's listening socket, taken before anything is served.
enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// Binds `listen` (or takes over the inherited socket).
async fn listen(listen: &Listen) -> Result<Listener, RunError> {
    let err = |source| RunError::Listen { listen: listen.to_string(), source };
    Ok(match listen {
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
            Listener::Unix(listener)
        }
        Listen::Fd(fd) => Listener::Unix(inherited_listener(*fd).map_err(err)?),
        Listen::Tcp(addr) => Listener::Tcp(tokio::net::TcpListener::bind(addr).await.map_err(err)?),
    })
}

/// Serves the gRPC API on `listener` until `stop` turns true.
fn serve(
    listener: Listener,
    service: grpc::ProcdService,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let router =
        tonic::transport::Server::builder().add_service(proto::procd_server::ProcdServer::new(service));
    tokio::spawn(async move {
        let served = match listener {
            Listener::Unix(l) => {
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(l);
                router.serve_with_incoming_shutdown(incoming, shutdown).await
            }
            Listener::Tcp(l) => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
                router.serve_with_incoming_shutdown(incoming, shutdown).await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = &e as &dyn std::error::Error, "gRPC server failed");
        }
    })
}

/// Takes over the listening Unix socket inherited as `fd`. It is marked close-on-exec first: a process procd
/// starts must never hold procd's listener (it could accept the server's calls, token included). Anything but an
/// open, listening Unix socket is refused.
fn inherited_listener(fd: i32) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::fd::FromRawFd;
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("fd {fd} {what}"));
    // SAFETY: fcntl on a descriptor number reads or sets its flags only; an unused number fails with EBADF.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the out pointers describe `listening` and `len`, which outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(invalid("is not a socket"));
    }
    if listening == 0 {
        return Err(invalid("is not a listening socket"));
    }
    // SAFETY: the descriptor is open and nothing else in procd owns it (it was inherited for this purpose).
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // A listening TCP socket passes the checks above; only a Unix one has a Unix address.
    listener.local_addr().map_err(|_| invalid("is not a Unix socket"))?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// The `pre_exec` hook that makes `fd` the child's descriptor 3, where `listen: "fd://3"` finds it (how a parent
/// hands procd a listener it bound). `dup2` clears close-on-exec on the copy; a descriptor that already is 3 has
/// the flag cleared by hand.
pub fn as_fd3(fd: std::os::fd::RawFd) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    move || {
        // SAFETY: runs in the child between fork and exec; dup2 and fcntl are async-signal-safe and touch only
        // descriptors.
        let rc = unsafe {
            if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            }
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Sets the hostname (procd does this as PID 1 of a new uts namespace, from `WARMPOOL_HOSTNAME`).
pub fn set_hostname(name: &str) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// How often a client pings procd over HTTP/2, and how long it waits for the answer. A procd that stops answering
/// (stopped, frozen, wedged) fails every call on the connection, streams included, within about the sum of the
/// two, instead of leaving them hanging: the server's readiness watch notices and the sandbox leaves `ready`.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid procd address {listen}")]
    Address {
        listen: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{0} is a descriptor procd listens on; a client connects to the socket's path")]
    Descriptor(Listen),
}

/// A gRPC client for the procd at `listen` (lazy: connects on first use), with HTTP/2 keepalive.
pub fn connect(listen: &Listen) -> Result<proto::procd_client::ProcdClient<Channel>, ConnectError> {
    let endpoint = |uri: String| {
        Endpoint::from_shared(uri)
            .map(|e| {
                e.http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
            })
            .map_err(|source| ConnectError::Address { listen: listen.to_string(), source })
    };
    let channel = match listen {
        Listen::Tcp(addr) => endpoint(format!("http://{addr}"))?.connect_lazy(),
        Listen::Unix(path) => {
            let path = path.clone();
            endpoint("http://procd.invalid".into())?.connect_with_connector_lazy(tower::service_fn(
                move |_: tonic::transport::Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
                },
            ))
        }
        Listen::Fd(_) => return Err(ConnectError::Descriptor(listen.clone())),
    };
    Ok(proto::procd_client::ProcdClient::new(channel))
}

/// Wraps a request with the sandbox token.
pub fn authorized<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    if let Some(token) = token {
        if let Ok(value) = format!("Bearer {token}").parse() {
            req.metadata_mut().insert("authorization", value);
        }
    }
    req
}
