//! Work inside a sandbox beyond a one-shot exec: processes that outlive a request (with their output kept by
//! offset), the events of the streamed routes (one JSON object per line), files and archives.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `POST /v1/sandboxes/{id}/processes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessCreate {
    #[schema(min_items = 1)]
    pub command: Vec<String>,
    /// Absolute inside the sandbox, or relative to the template's `cwd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Keep the process's stdin open for `POST …/processes/{pid}/stdin` (default: stdin is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
    /// The process's group is killed after this long (default: none; at most 86400000, 24 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 86400000)]
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    Running,
    Exited,
}

/// A process in a sandbox: one started through the API (`proc_…`), or a warm process (by its `name`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Process {
    pub id: String,
    pub command: Vec<String>,
    pub state: ProcessState,
    /// Set once exited: the exit code, or 128 + N when signal N ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub started_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// A warm process of the template (owned by the sandbox: it cannot be signalled through the API).
    #[serde(default)]
    pub warm: bool,
}

/// A signal the API may send to a process.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub enum SignalName {
    #[serde(rename = "TERM")]
    Term,
    #[serde(rename = "KILL")]
    Kill,
    #[serde(rename = "INT")]
    Int,
    #[serde(rename = "HUP")]
    Hup,
    #[serde(rename = "QUIT")]
    Quit,
    #[serde(rename = "USR1")]
    Usr1,
    #[serde(rename = "USR2")]
    Usr2,
}

impl SignalName {
    pub fn number(self) -> i32 {
        match self {
            SignalName::Term => 15,
            SignalName::Kill => 9,
            SignalName::Int => 2,
            SignalName::Hup => 1,
            SignalName::Quit => 3,
            SignalName::Usr1 => 10,
            SignalName::Usr2 => 12,
        }
    }
}

impl std::str::FromStr for SignalName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let name = s.trim_start_matches("SIG").to_ascii_uppercase();
        serde_json::from_value(serde_json::Value::String(name))
            .map_err(|_| format!("{s:?} is not one of TERM, KILL, INT, HUP, QUIT, USR1, USR2"))
    }
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    pub signal: SignalName,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// One line of a streamed exec or of a process's output (`application/x-ndjson`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// Output as it was read; `data` is base64. `offset` (process output only) is where `data` starts in the
    /// process's combined output: reconnecting at `offset` + its length loses and repeats nothing.
    Output {
        stream: OutputStream,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        data: String,
    },
    /// This many bytes of the asked range had already left the sandbox's output buffer.
    Dropped { bytes: u64 },
    /// The last event: how the command ended.
    Exit {
        exit_code: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        #[serde(default)]
        timed_out: bool,
        #[serde(default)]
        duration_ms: u64,
    },
}

/// `PUT /v1/sandboxes/{id}/files` answers the file it wrote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FileWritten {
    pub path: String,
    pub size: u64,
    /// Permission bits (for example 420 = 0644).
    pub mode: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    File,
    Dir,
    Symlink,
    Other,
}

/// An entry of `GET /v1/sandboxes/{id}/files?list=true`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FileEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub file_type: FileType,
    pub size: u64,
    pub mode: u32,
    pub modified_at: DateTime<Utc>,
}

/// `PUT /v1/sandboxes/{id}/archive` answers what it unpacked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ArchiveWritten {
    /// Regular files and links written.
    pub files: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
}

/// The default of `--max-upload-bytes`: the largest body of the file and archive routes (10 GiB).
pub const MAX_UPLOAD_BYTES_DEFAULT: u64 = 10 << 30;
