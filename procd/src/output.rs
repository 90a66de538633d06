//! Process output: a byte-bounded ring buffer per process stream (the source of truth, read by offset over gRPC),
//! and the JSON-lines mirror on procd's own stdout/stderr with per-line truncation on a UTF-8 boundary. The mirror
//! writes from a dedicated thread behind a bounded queue, so a blocked stdout never stalls a process: lines that do
//! not fit are dropped and counted.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use serde::Serialize;
use tokio::sync::Notify;

/// Bytes kept per process stream.
pub const RING_CAPACITY: usize = 1 << 20;

/// The bytes of one stream, addressed by absolute offset since the process started.
#[derive(Debug)]
pub struct RingBuffer {
    buf: VecDeque<u8>,
    cap: usize,
    /// Offset of `buf[0]`.
    start: u64,
}

/// A read from a ring buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of `data[0]`.
    pub offset: u64,
    pub data: Vec<u8>,
    /// Bytes between the requested offset and `offset` that had already been dropped.
    pub dropped: u64,
}

impl RingBuffer {
    pub fn new(cap: usize) -> Self {
        RingBuffer { buf: VecDeque::new(), cap, start: 0 }
    }

    pub fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            self.start += self.buf.len() as u64 + (data.len() - self.cap) as u64;
            self.buf.clear();
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let overflow = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.start += overflow as u64;
        self.buf.extend(data);
    }

    /// Up to `max` bytes from `from` (or from the oldest byte kept, reporting what was dropped).
    pub fn read(&self, from: u64, max: usize) -> Chunk {
        let dropped = self.start.saturating_sub(from);
        let offset = from.max(self.start).min(self.end());
        let skip = (offset - self.start) as usize;
        let data = self.buf.iter().skip(skip).take(max).copied().collect();
        Chunk { offset, data, dropped }
    }
}

/// One stream's ring buffer plus a wake-up for followers.
#[derive(Debug)]
pub struct StreamOutput {
    ring: Mutex<RingBuffer>,
    closed: std::sync::atomic::AtomicBool,
    pub changed: Notify,
}

impl Default for StreamOutput {
    fn default() -> Self {
        StreamOutput {
            ring: Mutex::new(RingBuffer::new(RING_CAPACITY)),
            closed: Default::default(),
            changed: Notify::new(),
        }
    }
}

impl StreamOutput {
    pub fn push(&self, data: &[u8]) {
        self.ring.lock().expect("ring lock").push(data);
        self.changed.notify_waiters();
    }
    pub fn read(&self, from: u64, max: usize) -> Chunk {
        self.ring.lock().expect("ring lock").read(from, max)
    }
    pub fn end(&self) -> u64 {
        self.ring.lock().expect("ring lock").end()
    }
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Both streams of a process in the order procd read them: one ring of their combined bytes, and where each
/// stream's run starts. A read never spans two runs, so every chunk belongs to one stream.
#[derive(Debug)]
pub struct CombinedOutput {
    inner: Mutex<(RingBuffer, VecDeque<(u64, StreamName)>)>,
    closed: std::sync::atomic::AtomicBool,
    pub changed: Notify,
}

impl Default for CombinedOutput {
    fn default() -> Self {
        CombinedOutput {
            inner: Mutex::new((RingBuffer::new(2 * RING_CAPACITY), VecDeque::new())),
            closed: Default::default(),
            changed: Notify::new(),
        }
    }
}

impl CombinedOutput {
    pub fn push(&self, stream: StreamName, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        {
            let mut guard = self.inner.lock().expect("ring lock");
            let (ring, runs) = &mut *guard;
            if runs.back().map(|r| r.1) != Some(stream) {
                runs.push_back((ring.end(), stream));
            }
            ring.push(data);
            // A run is forgotten once the next one starts at or before the oldest byte kept.
            while runs.len() > 1 && runs[1].0 <= ring.start {
                runs.pop_front();
            }
        }
        self.changed.notify_waiters();
    }

    /// Up to `max` bytes of one stream's run from `from`, and which stream they are.
    pub fn read(&self, from: u64, max: usize) -> (Chunk, StreamName) {
        let guard = self.inner.lock().expect("ring lock");
        let (ring, runs) = &*guard;
        let mut chunk = ring.read(from, max);
        let at = runs.iter().rposition(|r| r.0 <= chunk.offset).unwrap_or(0);
        let stream = runs.get(at).map_or(StreamName::Stdout, |r| r.1);
        if let Some(next) = runs.get(at + 1) {
            chunk.data.truncate(next.0.saturating_sub(chunk.offset) as usize);
        }
        (chunk, stream)
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Splits a byte stream into lines for the mirror, keeping at most `max` bytes of each line.
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    partial: Vec<u8>,
    truncated: bool,
}

/// A complete (or flushed) line: its text, cut on a UTF-8 boundary, and whether bytes were dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub data: String,
    pub truncated: bool,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        LineSplitter { max: max.max(1), partial: Vec::new(), truncated: false }
    }

    pub fn push(&mut self, mut data: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        while !data.is_empty() {
            let (piece, rest, ended) = match data.iter().position(|b| *b == b'\n') {
                Some(i) => (&data[..i], &data[i + 1..], true),
                None => (data, &data[data.len()..], false),
            };
            let room = self.max.saturating_sub(self.partial.len());
            if piece.len() > room {
                self.partial.extend_from_slice(&piece[..room]);
                self.truncated = true;
            } else {
                self.partial.extend_from_slice(piece);
            }
            if ended {
                lines.push(self.take());
            }
            data = rest;
        }
        lines
    }

    /// The partial line at the end of the stream, if any.
    pub fn flush(&mut self) -> Option<Line> {
        (!self.partial.is_empty() || self.truncated).then(|| self.take())
    }

    fn take(&mut self) -> Line {
        let mut bytes = std::mem::take(&mut self.partial);
        let truncated = std::mem::take(&mut self.truncated);
        if truncated {
            bytes.truncate(utf8_boundary(&bytes));
        }
        Line { data: String::from_utf8_lossy(&bytes).into_owned(), truncated }
    }
}

/// The length of the longest prefix of `bytes` that does not end inside a UTF-8 sequence.
pub fn utf8_boundary(bytes: &[u8]) -> usize {
    let len = bytes.len();
    // Look back over at most three continuation bytes for the start of the last sequence.
    for back in 1..=4.min(len) {
        let b = bytes[len - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte
        }
        let need = match b {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1, // invalid lead byte: keep it, lossy conversion marks it
        };
        return if need > back { len - back } else { len };
    }
    len
}

/// Which of procd's streams a mirrored line goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamName {
    Stdout,
    Stderr,
}

impl StreamName {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamName::Stdout => "stdout",
            StreamName::Stderr => "stderr",
        }
    }
}

/// One mirrored line, in the documented field order (`ts, process, alias, pid, stream, data, truncated`).
#[derive(Debug, Serialize)]
pub struct MirrorLine<'a> {
    pub ts: String,
    pub process: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<&'a str>,
    pub pid: u32,
    pub stream: StreamName,
    pub data: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

enum MirrorMsg {
    Line(StreamName, String),
    Flush(mpsc::Sender<()>),
}

/// Lines queued for the writer thread before new ones are dropped.
const MIRROR_QUEUE: usize = 4096;

/// The JSON-lines mirror. Cloning shares the queue.
#[derive(Clone)]
pub struct Mirror {
    tx: Option<mpsc::SyncSender<MirrorMsg>>,
    dropped: Arc<AtomicU64>,
    max_bytes: usize,
}

impl Mirror {
    /// A mirror writing to procd's stdout and stderr, or one that discards everything when disabled.
    pub fn start(enabled: bool, max_bytes: usize) -> Mirror {
        Mirror::start_with(enabled, max_bytes, || Box::new(std::io::stdout()), || Box::new(std::io::stderr()))
    }

    pub fn start_with(
        enabled: bool,
        max_bytes: usize,
        stdout: impl FnOnce() -> Box<dyn Write + Send> + Send + 'static,
        stderr: impl FnOnce() -> Box<dyn Write + Send> + Send + 'static,
    ) -> Mirror {
        let dropped = Arc::new(AtomicU64::new(0));
        if !enabled {
            return Mirror { tx: None, dropped, max_bytes };
        }
        let (tx, rx) = mpsc::sync_channel::<MirrorMsg>(MIRROR_QUEUE);
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("procd-mirror".into())
            .spawn(move || {
                let (mut out, mut err) = (stdout(), stderr());
                for msg in rx {
                    let (stream, line) = match msg {
                        MirrorMsg::Line(stream, line) => (stream, line),
                        MirrorMsg::Flush(ack) => {
                            let _ = out.flush();
                            let _ = err.flush();
                            let _ = ack.send(());
                            continue;
                        }
                    };
                    {
                        let w = if stream == StreamName::Stdout { &mut out } else { &mut err };
                        let _ = w.write_all(line.as_bytes());
                        let _ = w.flush();
                    }
                    let lost = counter.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        let _ = writeln!(
                            err,
                            "{}",
                            serde_json::json!({"ts": now(), "process": "procd", "pid": std::process::id(),
                                "stream": "stderr", "data": format!("{lost} log lines dropped: output was blocked")})
                        );
                        let _ = err.flush();
                    }
                }
            })
            .expect("spawn mirror thread");
        Mirror { tx: Some(tx), dropped, max_bytes }
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one line; never blocks.
    pub fn emit(&self, process: &str, alias: Option<&str>, pid: u32, stream: StreamName, line: &Line) {
        let Some(tx) = &self.tx else { return };
        let record = MirrorLine {
            ts: now(),
            process,
            alias,
            pid,
            stream,
            data: &line.data,
            truncated: line.truncated,
        };
        let mut text = serde_json::to_string(&record).expect("serialize log line");
        text.push('\n');
        if tx.try_send(MirrorMsg::Line(stream, text)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits (up to `timeout` in all) until every line queued so far is written. A full queue (procd's own output
    /// is blocked) is retried until then, never waited on without a bound.
    pub fn flush(&self, timeout: std::time::Duration) {
        let Some(tx) = &self.tx else { return };
        let deadline = std::time::Instant::now() + timeout;
        let (ack_tx, ack_rx) = mpsc::channel();
        let mut msg = MirrorMsg::Flush(ack_tx);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = ack_rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_reads_keep_each_run_to_its_stream_and_report_drops() {
        let out = CombinedOutput::default();
        out.push(StreamName::Stdout, b"out1 ");
        out.push(StreamName::Stdout, b"out2 ");
        out.push(StreamName::Stderr, b"err ");
        out.push(StreamName::Stdout, b"out3");
        let (c, s) = out.read(0, 1000);
        assert_eq!((c.data.as_slice(), s), (&b"out1 out2 "[..], StreamName::Stdout));
        let (c, s) = out.read(10, 1000);
        assert_eq!((c.data.as_slice(), s, c.offset), (&b"err "[..], StreamName::Stderr, 10));
        let (c, s) = out.read(12, 1000);
        assert_eq!((c.data.as_slice(), s), (&b"r "[..], StreamName::Stderr));
        let (c, s) = out.read(14, 1000);
        assert_eq!((c.data.as_slice(), s), (&b"out3"[..], StreamName::Stdout));
        // Past the ring: the dropped bytes are counted, never silently skipped.
        let big = vec![b'x'; 2 * RING_CAPACITY + 10];
        out.push(StreamName::Stderr, &big);
        let (c, s) = out.read(0, 16);
        assert_eq!((c.dropped, c.offset, s), (28, 28, StreamName::Stderr));
    }
    use proptest::prelude::*;

    #[test]
    fn ring_reads_from_offsets_and_reports_drops() {
        let mut r = RingBuffer::new(8);
        r.push(b"hello ");
        assert_eq!(r.read(0, 100), Chunk { offset: 0, data: b"hello ".to_vec(), dropped: 0 });
        r.push(b"world");
        assert_eq!(r.end(), 11);
        assert_eq!(r.read(0, 100), Chunk { offset: 3, data: b"lo world".to_vec(), dropped: 3 });
        assert_eq!(r.read(6, 3), Chunk { offset: 6, data: b"wor".to_vec(), dropped: 0 });
        assert_eq!(r.read(11, 3).data, b"");
        r.push(b"0123456789ab");
        assert_eq!(r.read(11, 100), Chunk { offset: 15, data: b"456789ab".to_vec(), dropped: 4 });
    }

    #[test]
    fn splitter_truncates_on_utf8_boundary() {
        let mut s = LineSplitter::new(5);
        let lines = s.push("héllo wörld\nok\n".as_bytes());
        // "héllo" is 6 bytes; 5 bytes end inside nothing: h(1) é(2) l l = 5.
        assert_eq!(lines[0], Line { data: "héll".into(), truncated: true });
        assert_eq!(lines[1], Line { data: "ok".into(), truncated: false });
        let mut s = LineSplitter::new(2);
        assert_eq!(s.push("é€\n".as_bytes())[0], Line { data: "é".into(), truncated: true });
        let mut s = LineSplitter::new(2);
        assert_eq!(s.push("€\n".as_bytes())[0], Line { data: "".into(), truncated: true });
    }

    #[test]
    fn splitter_flushes_partial_line() {
        let mut s = LineSplitter::new(100);
        assert!(s.push(b"par").is_empty());
        assert!(s.push(b"tial").is_empty());
        assert_eq!(s.flush(), Some(Line { data: "partial".into(), truncated: false }));
        assert_eq!(s.flush(), None);
    }

    proptest! {
        /// Every emitted line is valid UTF-8 of at most `max` bytes when the input is valid UTF-8, is a prefix of
        /// the input line, and is marked truncated exactly when bytes were cut — however the input is chunked.
        #[test]
        fn splitter_property(text in "[a-zé€😀\n]{0,80}", max in 1usize..12, cut in 0usize..80) {
            let bytes = text.as_bytes();
            let cut = cut.min(bytes.len());
            let mut s = LineSplitter::new(max);
            let mut lines = s.push(&bytes[..cut]);
            lines.extend(s.push(&bytes[cut..]));
            lines.extend(s.flush());
            let expected: Vec<&str> = if text.is_empty() {
                vec![]
            } else {
                let mut v: Vec<&str> = text.split('\n').collect();
                if text.ends_with('\n') { v.pop(); }
                v
            };
            prop_assert_eq!(lines.len(), expected.len());
            for (line, want) in lines.iter().zip(expected) {
                prop_assert!(line.data.len() <= max);
                prop_assert!(want.starts_with(&line.data));
                prop_assert_eq!(line.truncated, want.len() > max);
            }
        }

        #[test]
        fn ring_property(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 0..20), cap in 1usize..32, from in 0u64..200) {
            let mut r = RingBuffer::new(cap);
            let mut all = Vec::new();
            for c in &chunks { r.push(c); all.extend_from_slice(c); }
            let chunk = r.read(from, usize::MAX);
            prop_assert_eq!(r.end(), all.len() as u64);
            let from_clamped = from.min(all.len() as u64);
            prop_assert_eq!(chunk.offset.max(from_clamped), chunk.offset);
            prop_assert_eq!(&chunk.data[..], &all[chunk.offset as usize..]);
            prop_assert!(chunk.data.len() <= cap);
        }
    }
}
