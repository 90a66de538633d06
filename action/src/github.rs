//! `ready: auto`: the burst size is the number of this workflow run's jobs that are queued or in progress, read
//! through GitHub's API with octocrab (all pages). Jobs are read into a small struct of our own with `status` as a
//! string, so a status octocrab's enums do not know yet cannot fail the page.

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("{0} is required for ready: auto")]
    Missing(&'static str),
    #[error("cannot build the GitHub client")]
    Client(#[source] octocrab::Error),
    #[error("listing the jobs of run {run_id} failed")]
    Api {
        run_id: String,
        #[source]
        source: octocrab::Error,
    },
}

#[derive(Debug, Deserialize)]
struct JobsPage {
    total_count: u64,
    jobs: Vec<Job>,
}

#[derive(Debug, Deserialize)]
struct Job {
    status: String,
}

/// Statuses of jobs that still need a runner.
const WAITING: [&str; 5] = ["queued", "in_progress", "waiting", "pending", "requested"];

pub struct RunRef<'a> {
    pub api_url: &'a str,
    pub token: &'a str,
    pub repository: &'a str,
    pub run_id: &'a str,
    pub run_attempt: &'a str,
}

/// Queued and in-progress jobs of the run (at least 1).
pub async fn burst_size(run: &RunRef<'_>) -> Result<u32, GithubError> {
    let client = octocrab::Octocrab::builder()
        .personal_token(run.token.to_string())
        .base_uri(run.api_url)
        .map_err(GithubError::Client)?
        .build()
        .map_err(GithubError::Client)?;
    let route =
        format!("/repos/{}/actions/runs/{}/attempts/{}/jobs", run.repository, run.run_id, run.run_attempt);
    let (mut page, mut seen, mut waiting) = (1u32, 0u64, 0u32);
    loop {
        let params =
            [("per_page", "100".to_string()), ("page", page.to_string()), ("filter", "latest".into())];
        let jobs: JobsPage = client
            .get(&route, Some(&params))
            .await
            .map_err(|source| GithubError::Api { run_id: run.run_id.into(), source })?;
        seen += jobs.jobs.len() as u64;
        waiting += jobs.jobs.iter().filter(|j| WAITING.contains(&j.status.as_str())).count() as u32;
        if jobs.jobs.is_empty() || seen >= jobs.total_count {
            break;
        }
        page += 1;
    }
    Ok(waiting.max(1))
}
