//! Build artifacts on runtimes without a shared filesystem (Kubernetes): a directory as a `zstd`-compressed tar.
//! procd packs the build's workspace (`Archive` call); the sandbox's init container (`procd fetch-artifact`)
//! downloads the server's copy and unpacks it into the new sandbox's workspace.

use std::io::{Read, Write};
use std::path::Path;

/// zstd level: fast to write, since every build packs once and every sandbox unpacks once.
const LEVEL: i32 = 3;

/// Writes `dir`'s contents (not `dir` itself; symlinks kept as links, ownership and modes kept) to `out`.
pub fn pack(dir: &Path, out: impl Write) -> std::io::Result<()> {
    let encoder = zstd::Encoder::new(out, LEVEL)?;
    let mut tar = tar::Builder::new(encoder);
    tar.follow_symlinks(false);
    tar.mode(tar::HeaderMode::Complete);
    tar.append_dir_all(".", dir)?;
    tar.into_inner()?.finish()?.flush()
}

/// Unpacks what [`pack`] wrote into `dir` (created if missing). Entries may not leave `dir`.
pub fn unpack(input: impl Read, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tar = tar::Archive::new(zstd::Decoder::new(input)?);
    tar.set_preserve_permissions(true);
    tar.set_preserve_mtime(true);
    tar.set_overwrite(true);
    tar.unpack(dir)
}

/// A `Write` that hands 64 KiB chunks to an async receiver (the `Archive` call's stream) from a blocking thread.
pub struct ChunkWriter {
    buf: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

pub const CHUNK: usize = 64 * 1024;

impl ChunkWriter {
    pub fn new(tx: tokio::sync::mpsc::Sender<Vec<u8>>) -> Self {
        ChunkWriter { buf: Vec::with_capacity(CHUNK), tx }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(chunk).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the archive's reader went away")
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_packed_directory_unpacks_the_same() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/file.txt"), "hello").unwrap();
        std::fs::write(src.path().join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(src.path().join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a/b/file.txt", src.path().join("link")).unwrap();
        let mut packed = Vec::new();
        pack(src.path(), &mut packed).unwrap();
        let dst = tempfile::tempdir().unwrap();
        unpack(packed.as_slice(), &dst.path().join("ws")).unwrap();
        let ws = dst.path().join("ws");
        assert_eq!(std::fs::read_to_string(ws.join("a/b/file.txt")).unwrap(), "hello");
        assert_eq!(std::fs::metadata(ws.join("run.sh")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read_link(ws.join("link")).unwrap(), Path::new("a/b/file.txt"));
    }

    #[test]
    fn the_chunk_writer_sends_everything_in_order() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1000);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = ChunkWriter::new(tx);
        w.write_all(&data).unwrap();
        w.flush().unwrap();
        drop(w);
        let mut got = Vec::new();
        while let Ok(chunk) = rx.try_recv() {
            assert!(chunk.len() <= CHUNK);
            got.extend(chunk);
        }
        assert_eq!(got, data);
    }
}
