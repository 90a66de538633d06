//! Work inside real sandboxes through a real `warmpool serve`: files and archives compared by sha256, the
//! streamed exec read live, a process's output read again after a reader went away (nothing lost, nothing
//! repeated), a tar stream piped through `warmpool sandbox exec`, every path parameter attacked, and another
//! account's sandbox out of reach.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use warmpool_api::*;
use warmpool_client::{decode, Client};
use warmpool_testkit::{sibling_bin, TempServer};

use super::{build, cold, sh, template};

/// A server with a ready template and one running sandbox of it.
async fn sandbox(extra_args: &[&str]) -> (TempServer, SandboxId) {
    let server = TempServer::start(extra_args);
    build(&server.client, &template("io", 0.0)).await;
    let s = server.client.create_sandbox(&cold("io")).await.unwrap();
    (server, s.id)
}

async fn collect(mut stream: warmpool_client::ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

fn sha(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Every entry under `dir`: its relative path (bytes), kind, permission bits, and sha256 or link target.
fn manifest(dir: &Path) -> BTreeMap<Vec<u8>, String> {
    let mut out = BTreeMap::new();
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<Vec<u8>, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(base).unwrap().as_os_str().as_bytes().to_vec();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if meta.file_type().is_symlink() {
                // By components: the tar crate writes a link to `/` as `//`, the same target.
                let target: std::path::PathBuf = std::fs::read_link(&path).unwrap().components().collect();
                out.insert(rel, format!("link {}", target.display()));
            } else if meta.is_dir() {
                out.insert(rel, format!("dir {mode:o}"));
                walk(base, &path, out);
            } else {
                out.insert(rel, format!("file {mode:o} {}", sha(&std::fs::read(&path).unwrap())));
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// A tree with what breaks naive copies: symlinks (one at `/`), an empty directory, modes, a non-UTF-8 name.
fn odd_tree(dir: &Path) {
    std::fs::create_dir_all(dir.join("src/deep/er")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::write(dir.join("src/deep/er/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(dir.join("src/deep/er/run.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::write(dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9 \xff.bin")), [0u8, 1, 2, 255]).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("src/big.bin"), big).unwrap();
    std::os::unix::fs::symlink("src/deep/er/run.sh", dir.join("link")).unwrap();
    std::os::unix::fs::symlink("/", dir.join("to-root")).unwrap();
}

fn tar_of(dir: &Path) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir).unwrap();
    tar.into_inner().unwrap()
}

#[tokio::test]
async fn files_and_archives_round_trip_and_bodies_over_the_limit_are_refused() {
    let (server, id) = sandbox(&["--max-upload-bytes", "67108864"]).await;
    let c = &server.client;

    // A random 50 MB file, streamed in chunks both ways.
    let data = rand_like::fill(50 << 20);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
        data.chunks(1 << 20).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let written = c.put_file(&id, "data/random.bin", Some(0o600), body).await.unwrap();
    assert_eq!(
        (written.path.as_str(), written.size, written.mode),
        ("/workspace/data/random.bin", 50 << 20, 0o600)
    );
    let back = collect(c.get_file(&id, "/workspace/data/random.bin").await.unwrap()).await;
    assert_eq!(sha(&back), sha(&data), "the file comes back byte for byte");
    let inside = sh(c, &id, "sha256sum /workspace/data/random.bin").await;
    assert!(inside.stdout.starts_with(&sha(&data)), "the sandbox sees the same bytes: {}", inside.stdout);
    let listed = c.list_files(&id, "data").await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].file_type, listed[0].size), (FileType::File, 50 << 20));

    // A tree with links, an empty directory, modes and a non-UTF-8 name, in and out as tar streams.
    let local = tempfile::tempdir().unwrap();
    odd_tree(&local.path().join("tree"));
    let done = c.put_archive(&id, "/workspace/tree", None, tar_of(&local.path().join("tree"))).await.unwrap();
    assert_eq!(done.files, 5, "{done:?}");
    let tar = collect(c.get_archive(&id, "tree", None).await.unwrap()).await;
    let out = tempfile::tempdir().unwrap();
    let mut archive = tar::Archive::new(tar.as_slice());
    archive.set_preserve_permissions(true);
    archive.unpack(out.path()).unwrap();
    assert_eq!(manifest(out.path()), manifest(&local.path().join("tree")));
    let link =
        sh(c, &id, "readlink /workspace/tree/link; stat -c %a /workspace/tree/src/deep/er/run.sh").await;
    assert_eq!(link.stdout, "src/deep/er/run.sh\n750\n");

    // Deletes: a directory with files needs recursive.
    let err = c.delete_file(&id, "tree", false).await.unwrap_err();
    assert_eq!(err.code(), Some("conflict"), "{err}");
    c.delete_file(&id, "tree", true).await.unwrap();
    assert_eq!(
        c.get_file(&id, "tree/link").await.err().and_then(|e| e.code().map(String::from)).as_deref(),
        Some("not_found")
    );

    // Over the limit: refused at once when the length is declared, cut off when it is not; nothing is kept.
    // (Raw HTTP: a client still sending when the server answers may see the connection reset instead of the 413.)
    let target = format!("/v1/sandboxes/{id}/files?path=too-big.bin");
    assert_eq!(raw_upload(&server.url, &server.token(), &target, false, 70 << 20).await, 413);
    assert_eq!(raw_upload(&server.url, &server.token(), &target, true, 70 << 20).await, 413);
    // procd removes a cut upload's temporary file once it sees the stream break, just after the 413.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = sh(c, &id, "ls -a /workspace").await.stdout;
        if !left.contains("too-big") {
            break;
        }
        assert!(Instant::now() < deadline, "a cut upload leaves nothing behind: {left}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bad input names the field.
    let err = c.get_archive(&id, "tree", Some("lzma")).await.err().unwrap();
    assert_eq!(err.code(), Some("invalid_request"), "{err}");
}

/// Sends `total` zero bytes to `target` (with `Content-Length`, or chunked), reading the answer while sending;
/// answers its status.
async fn raw_upload(url: &str, token: &str, target: &str, chunked: bool, total: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let length =
        if chunked { "Transfer-Encoding: chunked".to_string() } else { format!("Content-Length: {total}") };
    let head =
        format!("PUT {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n{length}\r\n\r\n");
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..total / chunk.len() {
            if chunked {
                wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
                wr.write_all(&chunk).await?;
                wr.write_all(b"\r\n").await?;
            } else {
                wr.write_all(&chunk).await?;
            }
        }
        if chunked {
            wr.write_all(b"0\r\n\r\n").await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    writer.abort();
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no answer: {text:?}"))
}

/// Lines printed `every` apart by `sh`, numbered.
fn ticker(lines: u32, every: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("i=1; while [ $i -le {lines} ]; do echo line $i; sleep {every}; i=$((i+1)); done"),
    ]
}

#[tokio::test]
async fn exec_streams_live_and_a_reader_that_comes_back_loses_and_repeats_nothing() {
    let (server, id) = sandbox(&[]).await;
    let c = &server.client;

    // A line every 100 ms reaches the client as it is printed, not at the end.
    let req = ExecRequest { command: ticker(10, "0.1"), ..Default::default() };
    let mut events = c.exec_stream(&id, &req).await.unwrap();
    let (mut arrivals, mut text, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(event) = events.next().await {
        match event.unwrap() {
            StreamEvent::Output { data, .. } => {
                arrivals.push(Instant::now());
                text.extend(decode(&data).unwrap());
            }
            StreamEvent::Exit { exit_code, .. } => exit = Some(exit_code),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(exit, Some(0));
    assert_eq!(String::from_utf8(text).unwrap(), (1..=10).map(|i| format!("line {i}\n")).collect::<String>());
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        arrivals.len() >= 5 && spread >= Duration::from_millis(500),
        "output came in one lump: {arrivals:?}"
    );

    // Stderr apart, binary safe, no cap, the exit code and the signal.
    let req = ExecRequest {
        command: vec![
            "sh".into(),
            "-c".into(),
            "head -c 9000000 /dev/zero; printf '\\377err' >&2; kill -TERM $$".into(),
        ],
        ..Default::default()
    };
    let (mut out, mut err, mut end) = (0usize, Vec::new(), None);
    let mut events = c.exec_stream(&id, &req).await.unwrap();
    while let Some(event) = events.next().await {
        match event.unwrap() {
            StreamEvent::Output { stream: OutputStream::Stdout, data, .. } => {
                out += decode(&data).unwrap().len()
            }
            StreamEvent::Output { stream: OutputStream::Stderr, data, .. } => {
                err.extend(decode(&data).unwrap())
            }
            StreamEvent::Exit { exit_code, signal, .. } => end = Some((exit_code, signal)),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((out, err.as_slice(), end), (9_000_000, &b"\xfferr"[..], Some((143, Some(15)))));

    // The command goes when its client does.
    let req = ExecRequest {
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo $$ > /workspace/exec.pid; echo started; exec sleep 300".into(),
        ],
        ..Default::default()
    };
    let mut events = c.exec_stream(&id, &req).await.unwrap();
    assert!(matches!(events.next().await, Some(Ok(StreamEvent::Output { .. }))));
    drop(events);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let alive = sh(c, &id, "kill -0 $(cat /workspace/exec.pid) 2>/dev/null && echo alive").await;
        if alive.stdout.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the command outlived its client");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A process's output, read in two sittings by a reader that went away in the middle.
    let p = c
        .start_process(&id, &ProcessCreate { command: ticker(150, "0.01"), ..Default::default() })
        .await
        .unwrap();
    let (mut got, mut offset) = (Vec::new(), 0u64);
    let mut first = c.process_output(&id, &p.id, 0, true).await.unwrap();
    for _ in 0..5 {
        if let Some(Ok(StreamEvent::Output { offset: Some(at), data, .. })) = first.next().await {
            let data = decode(&data).unwrap();
            assert_eq!(at, offset, "offsets are contiguous");
            offset = at + data.len() as u64;
            got.extend(data);
        }
    }
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = c.process_output(&id, &p.id, offset, true).await.unwrap();
    let mut exit = None;
    while let Some(event) = second.next().await {
        match event.unwrap() {
            StreamEvent::Output { offset: Some(at), data, .. } => {
                assert_eq!(at, offset, "the second sitting starts where the first ended");
                let data = decode(&data).unwrap();
                offset = at + data.len() as u64;
                got.extend(data);
            }
            StreamEvent::Exit { exit_code, .. } => exit = Some(exit_code),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(exit, Some(0));
    let want: String = (1..=150).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8(got).unwrap(), want);
    let listed = c.list_processes(&id).await.unwrap();
    assert!(listed.iter().any(|q| q.id == p.id && q.state == ProcessState::Exited && q.exit_code == Some(0)));
    assert!(
        listed.iter().any(|q| q.id == "start" && q.warm),
        "warm processes are listed by name: {listed:?}"
    );
    let err = c.signal_process(&id, "start", SignalName::Kill).await.unwrap_err();
    assert_eq!(err.code(), Some("conflict"), "{err}");

    // stdin as raw bytes, then closed.
    let p = c
        .start_process(
            &id,
            &ProcessCreate {
                command: vec!["wc".into(), "-c".into()],
                stdin: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    c.write_stdin(&id, &p.id, vec![7u8; 1000], false).await.unwrap();
    c.write_stdin(&id, &p.id, vec![8u8; 234], true).await.unwrap();
    let mut out = Vec::new();
    let mut events = c.process_output(&id, &p.id, 0, true).await.unwrap();
    while let Some(Ok(event)) = events.next().await {
        if let StreamEvent::Output { data, .. } = event {
            out.extend(decode(&data).unwrap());
        }
    }
    assert_eq!(String::from_utf8(out).unwrap().trim(), "1234");

    // The CLI: a tar stream through `sandbox exec`'s stdin, exit codes passed on.
    let local = tempfile::tempdir().unwrap();
    odd_tree(&local.path().join("tree"));
    std::fs::write(local.path().join("tree.tar"), tar_of(&local.path().join("tree"))).unwrap();
    let cli = |args: &[&str], stdin: Stdio| {
        Command::new(sibling_bin("warmpool"))
            .args(args)
            .env("WARMPOOL_ENDPOINT", &server.url)
            .env("WARMPOOL_TOKEN", server.token())
            .env("WARMPOOL_CONFIG", local.path().join("cli.json"))
            .stdin(stdin)
            .output()
            .unwrap()
    };
    let tar = std::fs::File::open(local.path().join("tree.tar")).unwrap();
    let piped = cli(
        &["sandbox", "exec", &id, "--", "sh", "-c", "mkdir -p /workspace/piped && tar x -C /workspace/piped"],
        tar.into(),
    );
    assert!(piped.status.success(), "{}", String::from_utf8_lossy(&piped.stderr));
    let tar = collect(c.get_archive(&id, "piped", None).await.unwrap()).await;
    let out = tempfile::tempdir().unwrap();
    let mut archive = tar::Archive::new(tar.as_slice());
    archive.set_preserve_permissions(true);
    archive.unpack(out.path()).unwrap();
    assert_eq!(manifest(out.path()), manifest(&local.path().join("tree")));
    let run =
        cli(&["sandbox", "exec", &id, "--", "sh", "-c", "echo out; echo err >&2; exit 3"], Stdio::null());
    assert_eq!(
        (run.status.code(), run.stdout.as_slice(), run.stderr.as_slice()),
        (Some(3), &b"out\n"[..], &b"err\n"[..])
    );
    let killed = cli(&["sandbox", "exec", &id, "--", "sh", "-c", "kill -9 $$"], Stdio::null());
    assert_eq!(killed.status.code(), Some(137));
    let copied = local.path().join("copied");
    let cp =
        cli(&["sandbox", "cp", &format!("{id}:/workspace/piped"), copied.to_str().unwrap()], Stdio::null());
    assert!(cp.status.success(), "{}", String::from_utf8_lossy(&cp.stderr));
    assert_eq!(manifest(&copied), manifest(&local.path().join("tree")));
}

#[tokio::test]
async fn no_path_parameter_leaves_the_sandbox_and_other_accounts_see_nothing() {
    let (server, id) = sandbox(&[]).await;
    let c = &server.client;
    // A secret on the host, outside every sandbox, and links a hostile sandbox plants toward it.
    let host = tempfile::tempdir_in("/var/tmp").unwrap();
    let secret = host.path().join("secret");
    std::fs::write(&secret, "host secret").unwrap();
    let hostile = format!(
        "ln -s / /workspace/up; ln -s /config /workspace/cfg; ln -s /proc/1/root /workspace/p1; \
         ln -s /proc/self/root /workspace/pself; ln -s {} /workspace/direct",
        secret.display()
    );
    assert_eq!(sh(c, &id, &hostile).await.exit_code, 0);
    let s = secret.display();
    let sandbox_dir = server.data_dir.join("sandboxes").join(&id);
    let token_on_host = sandbox_dir.join("config/token");
    let reads = [
        format!("{s}"),
        format!("../../../../../..{s}"),
        format!("/workspace/up{s}"),
        format!("/workspace/p1{s}"),
        format!("/workspace/pself{s}"),
        format!("/proc/1/root{s}"),
        format!("/proc/self/root{s}"),
        "/workspace/direct".to_string(),
        token_on_host.display().to_string(),
        "/config/token".into(),
        "/workspace/cfg/token".into(),
        "/procd/bin/procd".into(),
        "/run/warmpool".into(),
    ];
    for path in &reads {
        let got = c.get_file(&id, path).await;
        assert!(got.is_err(), "GET files {path} answered");
        let code = got.err().unwrap().code().map(String::from);
        assert!(matches!(code.as_deref(), Some("not_found" | "invalid_request")), "{path}: {code:?}");
        for result in
            [c.get_archive(&id, path, None).await.map(|_| ()), c.list_files(&id, path).await.map(|_| ())]
        {
            let code = result.err().map(|e| e.code().map(String::from));
            assert!(
                matches!(code.as_ref().and_then(|c| c.as_deref()), Some("not_found" | "invalid_request")),
                "{path}: {code:?}"
            );
        }
    }
    for reserved in ["/config/token", "/workspace/cfg/token", "/procd/bin/x", "/run/warmpool/x"] {
        let err = c.get_file(&id, reserved).await.err().unwrap();
        assert_eq!(err.code(), Some("invalid_request"), "{reserved}: {err}");
        let Some(warmpool_client::Error::Api { details, .. }) = Some(err) else { unreachable!() };
        assert_eq!(details["field"], "path");
    }
    // Writes through every link land inside the sandbox or nowhere, never on the host.
    let token_before = std::fs::read(&token_on_host).unwrap();
    let planted = tempfile::tempdir().unwrap();
    std::fs::write(planted.path().join("planted"), "pwned").unwrap();
    for path in reads.iter().chain([format!("/workspace/up{}/planted", host.path().display())].iter()) {
        let _ = c.put_file(&id, path, None, "pwned").await;
        let _ = c.delete_file(&id, path, true).await;
        let _ = c.put_archive(&id, path, None, tar_of(planted.path())).await;
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host secret");
    assert_eq!(std::fs::read_dir(host.path()).unwrap().count(), 1, "nothing was written beside the secret");
    assert_eq!(std::fs::read(&token_on_host).unwrap(), token_before, "the sandbox's token is untouched");
    // A hostile archive: `..` entries, and a link to a reserved path followed by a file through it.
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    h.as_old_mut().name[..20].copy_from_slice(b"../../../../etc/evil");
    h.set_cksum();
    evil.append(&h, &b"pwned"[..]).unwrap();
    let err = c.put_archive(&id, "/workspace", None, evil.into_inner().unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"), "{err}");
    let mut through = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    h.set_link_name("/config").unwrap();
    through.append_data(&mut h, "c2", std::io::empty()).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    through.append_data(&mut h, "c2/token", &b"pwned"[..]).unwrap();
    let err = c.put_archive(&id, "/workspace", None, through.into_inner().unwrap()).await.unwrap_err();
    assert_eq!(err.code(), Some("invalid_request"), "{err}");
    assert_eq!(std::fs::read(&token_on_host).unwrap(), token_before);

    // Another account's token: the sandbox does not exist for it, on every route.
    let account =
        c.create_account(&AccountCreate { name: "other".into(), ..Default::default() }).await.unwrap();
    let other = c.create_token(&TokenCreate { account_id: account.id, name: None }).await.unwrap();
    let o = Client::new(&server.url, Some(other.token)).unwrap();
    let p = c
        .start_process(
            &id,
            &ProcessCreate { command: vec!["sleep".into(), "30".into()], ..Default::default() },
        )
        .await
        .unwrap();
    let codes = [
        o.put_file(&id, "x", None, "x").await.map(drop).err(),
        o.get_file(&id, "/etc/hostname").await.map(drop).err(),
        o.list_files(&id, "/").await.map(drop).err(),
        o.delete_file(&id, "/workspace", true).await.map(drop).err(),
        o.put_archive(&id, "/workspace", None, Vec::<u8>::new()).await.map(drop).err(),
        o.get_archive(&id, "/workspace", None).await.map(drop).err(),
        o.exec_stream(&id, &ExecRequest { command: vec!["true".into()], ..Default::default() })
            .await
            .map(drop)
            .err(),
        o.start_process(&id, &ProcessCreate { command: vec!["true".into()], ..Default::default() })
            .await
            .map(drop)
            .err(),
        o.list_processes(&id).await.map(drop).err(),
        o.get_process(&id, &p.id).await.map(drop).err(),
        o.process_output(&id, &p.id, 0, false).await.map(drop).err(),
        o.write_stdin(&id, &p.id, "x", true).await.map(drop).err(),
        o.signal_process(&id, &p.id, SignalName::Kill).await.map(drop).err(),
    ];
    for (i, err) in codes.into_iter().enumerate() {
        assert_eq!(err.as_ref().and_then(|e| e.code()), Some("not_found"), "route {i}: {err:?}");
    }
    assert_eq!(
        c.get_process(&id, &p.id).await.unwrap().state,
        ProcessState::Running,
        "the other account killed nothing"
    );
}

/// Pseudo-random bytes without a dependency: xorshift, seeded by the clock.
mod rand_like {
    pub fn fill(len: usize) -> Vec<u8> {
        let mut x =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

#[tokio::test]
async fn a_full_sandbox_disk_answers_409_with_the_reason() {
    let server = TempServer::start(&[]);
    let mut spec = template("small-disk", 0.0);
    spec.resources.disk_mb = Some(16);
    build(&server.client, &spec).await;
    let id = server.client.create_sandbox(&cold("small-disk")).await.unwrap().id;
    let c = &server.client;
    // Raw HTTP, read while sending: the answer comes before the client is done.
    let target = format!("/v1/sandboxes/{id}/files?path=fill.bin");
    assert_eq!(raw_upload(&server.url, &server.token(), &target, false, 64 << 20).await, 409);
    // A body that fits gets the reason in the envelope.
    sh(c, &id, "head -c 15000000 /dev/zero > /workspace/ballast || true").await;
    let err = c.put_file(&id, "fill.bin", None, vec![0u8; 4 << 20]).await.unwrap_err();
    assert_eq!(err.code(), Some("conflict"), "{err}");
    assert!(err.to_string().contains("no space left on the sandbox's disk"), "{err}");
    let left = sh(c, &id, "ls -a /workspace").await.stdout;
    assert!(!left.contains("fill"), "nothing half-written is kept: {left}");
}

/// A TCP proxy to `to` whose connections can all be cut at once (a dropped network, seen from both ends).
async fn cutting_proxy(
    to: String,
) -> (String, tokio::sync::watch::Sender<u32>, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (cut, cuts) = tokio::sync::watch::channel(0u32);
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let to = to.clone();
            let mut cuts = cuts.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(&to).await else { return };
                cuts.borrow_and_update();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    _ = cuts.changed() => {}
                }
            });
        }
    });
    (url, cut, accepted)
}

#[tokio::test]
async fn the_cli_reattaches_after_a_dropped_connection_without_losing_or_repeating_output() {
    let (server, id) = sandbox(&[]).await;
    let (proxy, cut, accepted) =
        cutting_proxy(server.url.trim_start_matches("http://").trim_end_matches('/').to_string()).await;
    let token = server.token();
    let config = tempfile::tempdir().unwrap();
    let cfg = config.path().join("cli.json");
    let id2 = id.clone();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(sibling_bin("warmpool"))
            .args(["sandbox", "exec", &id2, "--", "sh", "-c"])
            .arg("i=1; while [ $i -le 40 ]; do echo line $i; sleep 0.05; i=$((i+1)); done")
            .env("WARMPOOL_ENDPOINT", &proxy)
            .env("WARMPOOL_TOKEN", &token)
            .env("WARMPOOL_CONFIG", &cfg)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    // Cut every connection twice while the command runs.
    for n in 1..=2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cut.send(n).unwrap();
    }
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let want: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let connections = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(connections >= 3, "the output was read again after the cuts ({connections} connections)");
    drop(server);
}
