//! Conversions between the gRPC messages and the domain types of `warmpool-api`, in one place for procd (which
//! answers with them) and the control plane (which reads them).

use warmpool_api::{ProbeCheckResult, ProbeKind, ProbeResult, ProbeStatus};

use crate::output::StreamName;
use crate::proto;

pub fn kind_to_proto(kind: ProbeKind) -> proto::ProbeKind {
    match kind {
        ProbeKind::Startup => proto::ProbeKind::Startup,
        ProbeKind::Readiness => proto::ProbeKind::Readiness,
        ProbeKind::Liveness => proto::ProbeKind::Liveness,
    }
}

/// `None` for an unspecified or unknown kind.
pub fn kind_from_proto(kind: i32) -> Option<ProbeKind> {
    match proto::ProbeKind::try_from(kind).ok()? {
        proto::ProbeKind::Startup => Some(ProbeKind::Startup),
        proto::ProbeKind::Readiness => Some(ProbeKind::Readiness),
        proto::ProbeKind::Liveness => Some(ProbeKind::Liveness),
        proto::ProbeKind::Unspecified => None,
    }
}

fn status_to_proto(status: ProbeStatus) -> proto::ProbeStatus {
    match status {
        ProbeStatus::Passed => proto::ProbeStatus::Passed,
        ProbeStatus::Failed => proto::ProbeStatus::Failed,
        ProbeStatus::Suspended => proto::ProbeStatus::Suspended,
    }
}

/// Anything but passed or suspended reads as failed: a status this side does not know cannot be trusted.
fn status_from_proto(status: i32) -> ProbeStatus {
    match proto::ProbeStatus::try_from(status) {
        Ok(proto::ProbeStatus::Passed) => ProbeStatus::Passed,
        Ok(proto::ProbeStatus::Suspended) => ProbeStatus::Suspended,
        _ => ProbeStatus::Failed,
    }
}

pub fn probe_result_to_proto(r: ProbeResult) -> proto::ProbeResult {
    proto::ProbeResult {
        kind: kind_to_proto(r.kind).into(),
        status: status_to_proto(r.status).into(),
        reason: r.reason,
        message: r.message,
        checks: r
            .checks
            .into_iter()
            .map(|c| proto::ProbeCheck {
                name: c.name,
                target: c.target,
                status: status_to_proto(c.status).into(),
                reason: c.reason,
                message: c.message,
            })
            .collect(),
    }
}

pub fn probe_result_from_proto(r: proto::ProbeResult) -> ProbeResult {
    ProbeResult {
        kind: kind_from_proto(r.kind).unwrap_or(ProbeKind::Readiness),
        status: status_from_proto(r.status),
        reason: r.reason,
        message: r.message,
        checks: r
            .checks
            .into_iter()
            .map(|c| ProbeCheckResult {
                name: c.name,
                target: c.target,
                status: status_from_proto(c.status),
                reason: c.reason,
                message: c.message,
            })
            .collect(),
    }
}

pub fn stream_to_proto(stream: StreamName) -> proto::Stream {
    match stream {
        StreamName::Stdout => proto::Stream::Stdout,
        StreamName::Stderr => proto::Stream::Stderr,
    }
}

/// Unspecified means stdout; `None` for combined or unknown.
pub fn stream_from_proto(stream: i32) -> Option<StreamName> {
    match proto::Stream::try_from(stream).ok()? {
        proto::Stream::Unspecified | proto::Stream::Stdout => Some(StreamName::Stdout),
        proto::Stream::Stderr => Some(StreamName::Stderr),
        proto::Stream::Combined => None,
    }
}

/// The signal number of a proto signal; `None` for unspecified or unknown.
pub fn signal_from_proto(signal: i32) -> Option<i32> {
    Some(match proto::Signal::try_from(signal).ok()? {
        proto::Signal::Unspecified => return None,
        proto::Signal::Term => libc::SIGTERM,
        proto::Signal::Kill => libc::SIGKILL,
        proto::Signal::Int => libc::SIGINT,
        proto::Signal::Hup => libc::SIGHUP,
        proto::Signal::Quit => libc::SIGQUIT,
        proto::Signal::Usr1 => libc::SIGUSR1,
        proto::Signal::Usr2 => libc::SIGUSR2,
        proto::Signal::Stop => libc::SIGSTOP,
        proto::Signal::Cont => libc::SIGCONT,
    })
}

/// The metadata key that names why a call failed where the status code alone does not (`no_space`).
pub const REASON_METADATA: &str = "warmpool-reason";

/// The metadata key that names the request field an `INVALID_ARGUMENT` is about.
pub const FIELD_METADATA: &str = "warmpool-field";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_results_round_trip() {
        let r = ProbeResult {
            kind: ProbeKind::Liveness,
            status: ProbeStatus::Suspended,
            reason: "paused".into(),
            message: "m".into(),
            checks: vec![ProbeCheckResult {
                name: "procd".into(),
                target: "procd".into(),
                status: ProbeStatus::Failed,
                reason: "r".into(),
                message: "m".into(),
            }],
        };
        assert_eq!(probe_result_from_proto(probe_result_to_proto(r.clone())), r);
        assert_eq!(status_from_proto(99), ProbeStatus::Failed);
        assert_eq!(signal_from_proto(proto::Signal::Kill.into()), Some(libc::SIGKILL));
        assert_eq!(signal_from_proto(0), None);
    }
}
