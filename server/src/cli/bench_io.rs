//! `warmpool bench io`: the sandbox I/O routes against a running server, as JSON. A tree of `--files` files and
//! `--size-mb` MB goes up through `PUT …/archive` and comes back through `GET …/archive`, side by side with the
//! floor: `tar` inside the sandbox unpacking (packing) the same tar from (to) the sandbox's own layer. Then the
//! latency from a streamed exec's process writing a line to the client reading it, and the server's resident
//! memory while 1 GB streams in (a process's stdin) and out (a streamed exec).

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use warmpool_api::*;
use warmpool_client::{decode, Client};

use super::commands::client;
use super::Global;

#[derive(Args, Clone, Debug)]
pub struct IoArgs {
    /// Size of the uploaded tree, in MB.
    #[arg(long, default_value_t = 200)]
    pub size_mb: u64,
    /// Files in the uploaded tree.
    #[arg(long, default_value_t = 20_000)]
    pub files: u64,
    /// Lines of the streamed exec whose latency is measured (one every 100 ms).
    #[arg(long, default_value_t = 50)]
    pub lines: u32,
    /// MB streamed in and out while the server's memory is sampled (0 skips it).
    #[arg(long, default_value_t = 1024)]
    pub stream_mb: u64,
    /// The server's pid, to sample its resident memory from /proc (default: its `process_resident_memory_bytes`
    /// metric, when it serves one).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// A tree of `files` files totalling about `size` bytes, 1,000 per directory, contents that do not compress.
fn make_tree(dir: &std::path::Path, files: u64, size: u64) -> anyhow::Result<()> {
    let per_file = (size / files.max(1)) as usize;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; per_file];
    for i in 0..files {
        let d = dir.join(format!("{:03}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&d)?;
        }
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(d.join(format!("f{i}")), &buf)?;
    }
    Ok(())
}

/// The server's resident memory now, in MB.
async fn server_rss_mb(c: &Client, pid: Option<u32>) -> Option<f64> {
    if let Some(pid) = pid {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: f64 =
            status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
        return Some(kb / 1024.0);
    }
    let text = c.metrics().await.ok()?;
    let line = text.lines().find(|l| l.starts_with("process_resident_memory_bytes "))?;
    line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|b| b / (1024.0 * 1024.0))
}

/// Samples the server's memory every 100 ms while `work` runs; answers (baseline, peak) in MB.
async fn sampled<T>(
    c: &Client,
    pid: Option<u32>,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Option<f64>, Option<f64>)> {
    let baseline = server_rss_mb(c, pid).await;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sampler = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut peak: Option<f64> = None;
            loop {
                if let Some(mb) = server_rss_mb(&c, pid).await {
                    peak = Some(peak.map_or(mb, |p: f64| p.max(mb)));
                }
                tokio::select! {
                    _ = &mut stop_rx => return peak,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        })
    };
    let result = work.await;
    let _ = stop_tx.send(());
    let peak = sampler.await.ok().flatten();
    Ok((result?, baseline, peak))
}

async fn exec_ms(c: &Client, id: &str, script: &str) -> anyhow::Result<u64> {
    let req = ExecRequest {
        command: vec!["sh".into(), "-c".into(), script.into()],
        timeout_ms: Some(3_600_000),
        ..Default::default()
    };
    let r = c.exec(id, &req).await?;
    anyhow::ensure!(r.exit_code == 0, "{script:?} failed in the sandbox: {}", r.stderr);
    Ok(r.duration_ms)
}

pub async fn io(global: &Global, args: IoArgs) -> anyhow::Result<i32> {
    let c = client(global)?;
    let name = format!("bench-io-{}", std::process::id());
    let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
        "name": name,
        "start_cmd": "exec sleep infinity",
        "resources": {"disk_mb": (args.size_mb * 4 + 1024).max(2048)},
    }))?;
    c.create_template(&spec).await?;
    let b = c.create_build(&name, &[]).await?;
    let b = c.wait_build(&b.id, Duration::from_secs(600), |_| {}).await?;
    anyhow::ensure!(b.status == BuildStatus::Ready, "the bench template did not build: {:?}", b.error);
    let sandbox = c
        .create_sandbox(&SandboxCreate { template: Some(format!("{name}@{}", b.id)), ..Default::default() })
        .await?;
    let id = sandbox.id.clone();
    let result = measure(&c, &id, &args).await;
    let _ = c.delete_sandbox(&id).await;
    let _ = c.delete_template(&name).await;
    let report = result?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(0)
}

async fn measure(c: &Client, id: &str, args: &IoArgs) -> anyhow::Result<serde_json::Value> {
    let local = tempfile_dir()?;
    let tree = local.join("tree");
    let tar_path = local.join("tree.tar");
    let made = (|| -> anyhow::Result<u64> {
        make_tree(&tree, args.files, args.size_mb << 20)?;
        let mut tar = tar::Builder::new(std::fs::File::create(&tar_path)?);
        tar.append_dir_all(".", &tree)?;
        tar.into_inner()?.flush()?;
        Ok(std::fs::metadata(&tar_path)?.len())
    })();
    let tar_bytes = match made {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&local);
            return Err(e);
        }
    };
    let result = async {
        // Up: the archive route, then the floor (the same tar, already in the sandbox, unpacked there).
        let t = Instant::now();
        let file = tokio::fs::File::open(&tar_path).await?;
        let done = c.put_archive(id, "/workspace/up", None, file).await?;
        let upload_ms = t.elapsed().as_secs_f64() * 1000.0;
        anyhow::ensure!(done.files == args.files, "unpacked {} files of {}", done.files, args.files);
        let file = tokio::fs::File::open(&tar_path).await?;
        c.put_file(id, "/workspace/tree.tar", None, file).await?;
        let floor_up_ms = exec_ms(c, id, "mkdir -p /workspace/floor && tar xf /workspace/tree.tar -C /workspace/floor").await?;

        // Down: the archive route, then the floor (tar packing the same tree into the sandbox's layer).
        let t = Instant::now();
        let mut data = c.get_archive(id, "/workspace/up", None).await?;
        let mut down_bytes = 0u64;
        while let Some(chunk) = data.next().await {
            down_bytes += chunk?.len() as u64;
        }
        let download_ms = t.elapsed().as_secs_f64() * 1000.0;
        let floor_down_ms = exec_ms(c, id, "tar cf /workspace/out.tar -C /workspace/up .").await?;
        exec_ms(c, id, "rm -rf /workspace/floor /workspace/out.tar /workspace/tree.tar").await?;

        // Latency: each line carries the time its process wrote it.
        let req = ExecRequest {
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("i=0; while [ $i -lt {} ]; do date +%s%N; sleep 0.1; i=$((i+1)); done", args.lines),
            ],
            ..Default::default()
        };
        let mut events = c.exec_stream(id, &req).await?;
        let mut latencies = Vec::new();
        let mut partial = Vec::new();
        while let Some(event) = events.next().await {
            if let StreamEvent::Output { data, .. } = event? {
                let received = now_ns();
                partial.extend(decode(&data)?);
                while let Some(i) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=i).collect();
                    if let Ok(written) = String::from_utf8_lossy(&line).trim().parse::<u128>() {
                        latencies.push(received.saturating_sub(written) as f64 / 1e6);
                    }
                }
            }
        }
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).copied();

        // Memory: 1 GB in (to a process's stdin) and out (a streamed exec), sampled every 100 ms.
        let mut memory = serde_json::Value::Null;
        if args.stream_mb > 0 {
            let total = args.stream_mb << 20;
            let p = c
                .start_process(id, &ProcessCreate { command: vec!["sh".into(), "-c".into(), "cat > /dev/null".into()], stdin: Some(true), ..Default::default() })
                .await?;
            let chunk = Bytes::from(vec![0u8; 1 << 20]);
            let body = futures::stream::iter((0..args.stream_mb).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
            let t = Instant::now();
            let ((), in_base, in_peak) =
                sampled(c, args.server_pid, async { Ok(c.write_stdin(id, &p.id, reqwest::Body::wrap_stream(body), true).await?) }).await?;
            let in_ms = t.elapsed().as_secs_f64() * 1000.0;
            let req = ExecRequest {
                command: vec!["sh".into(), "-c".into(), format!("head -c {total} /dev/zero")],
                ..Default::default()
            };
            let t = Instant::now();
            let (out_bytes, out_base, out_peak) = sampled(c, args.server_pid, async {
                let mut events = c.exec_stream(id, &req).await?;
                let mut n = 0u64;
                while let Some(event) = events.next().await {
                    if let StreamEvent::Output { data, .. } = event? {
                        n += decode(&data)?.len() as u64;
                    }
                }
                Ok(n)
            })
            .await?;
            let out_ms = t.elapsed().as_secs_f64() * 1000.0;
            anyhow::ensure!(out_bytes == total, "the streamed exec sent {out_bytes} bytes of {total}");
            memory = serde_json::json!({
                "stream_mb": args.stream_mb,
                "in": {"ms": in_ms, "server_rss_mb_before": in_base, "server_rss_mb_peak": in_peak},
                "out": {"ms": out_ms, "server_rss_mb_before": out_base, "server_rss_mb_peak": out_peak},
            });
        }
        Ok(serde_json::json!({
            "tree": {"files": args.files, "mb": args.size_mb, "tar_bytes": tar_bytes},
            "upload": {"archive_route_ms": upload_ms, "floor_tar_x_in_sandbox_ms": floor_up_ms,
                "ratio": upload_ms / (floor_up_ms.max(1) as f64)},
            "download": {"archive_route_ms": download_ms, "bytes": down_bytes,
                "floor_tar_c_in_sandbox_ms": floor_down_ms, "ratio": download_ms / (floor_down_ms.max(1) as f64)},
            "streamed_exec_line_latency_ms": {"lines": latencies.len(), "p50": pct(0.5), "p90": pct(0.9), "max": latencies.last()},
            "memory": memory,
        }))
    }
    .await;
    let _ = std::fs::remove_dir_all(&local);
    result
}

/// A scratch directory for the tree and its tar, removed by the caller.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("warmpool-bench-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
