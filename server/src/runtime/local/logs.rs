//! procd's log on the local runtime. runc hands `<bundle>/procd.log` to procd as its stdout and stderr (so the log
//! outlives a server restart), and a sandbox decides how fast it grows: the runtime keeps it bounded by
//! copy-truncate, and readers take lines from its end, never the whole file.
//!
//! When `procd.log` passes a quarter of the bound, its last quarter-bound bytes (from a line start) are copied
//! over `procd.log.1` and `procd.log` is truncated; procd writes it with `O_APPEND`, so it carries on at the new
//! end. The two files hold at most half the bound, plus what a flood writes between two looks (25 ms apart while
//! the log grows fast, more on a busy host): the rest of the bound is that slack. Lines written between the copy
//! and the truncation are lost, as with logrotate's `copytruncate`: the ring buffers in procd stay the source of
//! truth for process output.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use futures::stream::BoxStream;
use futures::StreamExt;
use warmpool_api::LogLine;

pub const LOG: &str = "procd.log";
pub const ROTATED: &str = "procd.log.1";

/// The default bound of a sandbox's log files together (`--sandbox-log-bytes`).
pub const DEFAULT_LOG_BYTES: u64 = 8 << 20;

/// Growth between two looks (250 ms apart) that makes the runtime look every 25 ms: 256 KiB/s is a flood for a
/// log of process output.
pub const HOT_GROWTH: u64 = 64 * 1024;

/// Longest log line read; procd's mirror cuts its lines far below this, so a longer one is not procd's and is
/// skipped.
const MAX_LINE: u64 = 64 * 1024;

const CHUNK: usize = 64 * 1024;

/// Rotates `dir/procd.log` when it holds more than [`threshold`] bytes; returns whether it did. Blocking.
/// `procd.log.1` is rewritten in place (no temporary copy on disk at the worst moment).
pub fn rotate(dir: &Path, bound: u64) -> std::io::Result<bool> {
    let keep = bound / 4;
    let mut log = match OpenOptions::new().read(true).write(true).open(dir.join(LOG)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = log.metadata()?.len();
    if len <= threshold(bound) {
        return Ok(false);
    }
    let start = next_line_start(&mut log, len - keep, len)?;
    let mut out = File::create(dir.join(ROTATED))?;
    log.seek(SeekFrom::Start(start))?;
    std::io::copy(&mut (&mut log).take(len - start), &mut out)?;
    out.flush()?;
    log.set_len(0)?;
    Ok(true)
}

/// The size of `procd.log` past which it is rotated.
pub fn threshold(bound: u64) -> u64 {
    bound / 4
}

/// The first line start at or after `from` (within a line's length of it), else `from`.
fn next_line_start(file: &mut File, from: u64, len: u64) -> std::io::Result<u64> {
    if from == 0 {
        return Ok(0);
    }
    file.seek(SeekFrom::Start(from - 1))?;
    let mut buf = vec![0u8; CHUNK.min((len - from + 1) as usize)];
    let n = file.read(&mut buf)?;
    Ok(buf[..n].iter().position(|&b| b == b'\n').map_or(from, |i| from + i as u64))
}

/// Where the last `lines` lines of `file`'s first `len` bytes start, and how many lines that is (fewer when the
/// file holds fewer). Reads backwards from the end, a chunk at a time.
fn tail_start(file: &mut File, len: u64, lines: usize) -> std::io::Result<(u64, usize)> {
    if lines == 0 || len == 0 {
        return Ok((len, 0));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut end = len;
    let mut seen = 0;
    while end > 0 {
        let start = end.saturating_sub(CHUNK as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        for (i, _) in chunk.iter().enumerate().rev().filter(|(_, &b)| b == b'\n') {
            let at = start + i as u64;
            // The newline that ends the last line starts no line.
            if at + 1 == len {
                continue;
            }
            seen += 1;
            if seen == lines {
                return Ok((at + 1, lines));
            }
        }
        end = start;
    }
    Ok((0, seen + 1))
}

/// procd's mirrored output lines among the last `lines` lines of a sandbox's log (`procd.log.1`, then
/// `procd.log`; procd's own messages count as lines but are left out), read on a blocking thread into a small
/// channel as the receiver takes them: memory stays a few chunks whatever the files' size.
pub fn tail(dir: PathBuf, lines: usize) -> BoxStream<'static, LogLine> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::task::spawn_blocking(move || {
        // A rotation between planning and reading can truncate what was planned (a flooding log rotates every
        // few dozen milliseconds; a read past the new end fails): when that left nothing sent, plan again.
        let mut sent = 0;
        for _ in 0..5 {
            match send_tail(&dir, lines, &tx, &mut sent) {
                Ok(()) if sent > 0 || lines == 0 => return,
                Ok(()) => {}
                Err(e) if sent > 0 => {
                    let error = &e as &dyn std::error::Error;
                    tracing::debug!(dir = %dir.display(), error, "A sandbox log changed while read");
                    return;
                }
                Err(_) => {}
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|line| (line, rx)) }).boxed()
}

/// Sends the tail, counting the lines sent in `sent`.
fn send_tail(
    dir: &Path,
    lines: usize,
    tx: &tokio::sync::mpsc::Sender<LogLine>,
    sent: &mut usize,
) -> std::io::Result<()> {
    // Newest first: the current file, then what the last rotation kept.
    let mut plan = Vec::new();
    let mut wanted = lines;
    for name in [LOG, ROTATED] {
        if wanted == 0 {
            break;
        }
        let Ok(mut file) = File::open(dir.join(name)) else { continue };
        let len = file.metadata()?.len();
        let (start, found) = tail_start(&mut file, len, wanted)?;
        wanted -= found.min(wanted);
        plan.push((file, start, len));
    }
    let mut line = Vec::new();
    for (mut file, start, len) in plan.into_iter().rev() {
        file.seek(SeekFrom::Start(start))?;
        // Only what was there when the read began: a file still growing does not make this endless.
        let mut reader = BufReader::with_capacity(CHUNK, file.take(len - start));
        loop {
            line.clear();
            let n = (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
                reader.skip_until(b'\n')?;
                continue;
            }
            if let Ok(parsed) = serde_json::from_slice::<LogLine>(&line) {
                if tx.blocking_send(parsed).is_err() {
                    return Ok(());
                }
                *sent += 1;
            }
        }
    }
    Ok(())
}

/// The last `bytes` of `dir/procd.log` as text, starting at a whole line (procd's last words, for errors).
pub fn tail_text(dir: &Path, bytes: usize) -> String {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut file = File::open(dir.join(LOG))?;
        let len = file.metadata()?.len();
        let start = len.saturating_sub(bytes as u64);
        file.seek(SeekFrom::Start(start))?;
        let mut data = Vec::with_capacity((len - start) as usize);
        file.take(len - start).read_to_end(&mut data)?;
        Ok(data)
    };
    let data = read().unwrap_or_default();
    let text = String::from_utf8_lossy(&data).into_owned();
    // Whether `data` began mid-line is unknown once read: drop a partial first line when the file was longer.
    let longer = std::fs::metadata(dir.join(LOG)).is_ok_and(|m| m.len() > data.len() as u64);
    match (longer, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_string(),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(i: usize) -> String {
        serde_json::json!({"ts": "t", "process": "p", "pid": 1, "stream": "stdout", "data": format!("line {i}")})
            .to_string()
    }

    async fn collect(dir: &Path, n: usize) -> Vec<String> {
        tail(dir.to_path_buf(), n).map(|l| l.data).collect().await
    }

    #[tokio::test]
    async fn tail_takes_the_last_lines_across_the_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..100).map(|i| line(i) + "\n").collect();
        std::fs::write(dir.path().join(LOG), &text).unwrap();
        assert_eq!(collect(dir.path(), 3).await, ["line 97", "line 98", "line 99"]);
        assert_eq!(collect(dir.path(), 1000).await.len(), 100);
        assert!(collect(dir.path(), 0).await.is_empty());

        // Rotated at a bound of 8 KiB: procd.log.1 keeps the last 2 KiB, procd.log starts empty.
        assert!(rotate(dir.path(), 8192).unwrap());
        assert!(!rotate(dir.path(), 8192).unwrap(), "an empty log stays");
        assert_eq!(std::fs::metadata(dir.path().join(LOG)).unwrap().len(), 0);
        let kept = std::fs::read_to_string(dir.path().join(ROTATED)).unwrap();
        assert!(kept.len() <= 2048 && kept.starts_with('{') && kept.ends_with("}\n"), "{kept}");
        assert!(kept.lines().last().unwrap().contains("line 99"), "{kept}");
        let mut log = OpenOptions::new().append(true).open(dir.path().join(LOG)).unwrap();
        writeln!(log, "procd's own message, not a mirrored line").unwrap();
        writeln!(log, "{}", line(100)).unwrap();
        // procd's own message counts as a line of the log, and is not a mirrored line.
        assert_eq!(collect(dir.path(), 3).await, ["line 99", "line 100"]);
        assert_eq!(collect(dir.path(), 4).await, ["line 98", "line 99", "line 100"]);
        assert!(!rotate(dir.path(), 8192).unwrap(), "under the threshold");
    }

    #[tokio::test]
    async fn a_last_line_without_newline_and_an_overlong_line() {
        let dir = tempfile::tempdir().unwrap();
        let long = "x".repeat(MAX_LINE as usize * 2);
        std::fs::write(dir.path().join(LOG), format!("{}\n{long}\n{}", line(1), line(2))).unwrap();
        assert_eq!(collect(dir.path(), 1).await, ["line 2"]);
        assert_eq!(collect(dir.path(), 3).await, ["line 1", "line 2"]);
    }

    #[test]
    fn tail_text_starts_at_a_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOG), "first line\nsecond\nthird\n").unwrap();
        assert_eq!(tail_text(dir.path(), 10), "third\n");
        assert_eq!(tail_text(dir.path(), 1000), "first line\nsecond\nthird\n");
        assert_eq!(tail_text(&dir.path().join("missing"), 10), "");
    }
}
