//! The GitHub Actions runner protocol, written once: inputs from `INPUT_<NAME>`, outputs and state appended to
//! the files named by `GITHUB_OUTPUT` / `GITHUB_STATE`, the step summary, and workflow commands on stdout
//! (`::add-mask::`, `::error::`, `::group::`). The environment is captured once into [`ActionEnv`] and passed
//! down, so tests never mutate the process environment.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("input {name:?}: {message}")]
    Input { name: String, message: String },
    #[error("cannot write {what} to {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} contains the output delimiter")]
    Delimiter { name: String },
}

/// The runner's environment, captured once.
#[derive(Debug, Clone, Default)]
pub struct ActionEnv {
    vars: HashMap<String, String>,
}

impl ActionEnv {
    pub fn from_process() -> ActionEnv {
        ActionEnv { vars: std::env::vars().collect() }
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> ActionEnv {
        ActionEnv { vars: pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect() }
    }

    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    /// `INPUT_<NAME>`: uppercased, spaces → `_`, hyphens kept; trimmed; unset and empty are the same.
    pub fn input(&self, name: &str) -> Option<String> {
        let key = format!("INPUT_{}", name.replace(' ', "_").to_uppercase());
        self.vars.get(&key).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
    }

    pub fn required(&self, name: &str) -> Result<String, RunnerError> {
        self.input(name)
            .ok_or_else(|| RunnerError::Input { name: name.into(), message: "is required".into() })
    }

    /// A multi-line input: one value per line, empty lines dropped.
    pub fn input_lines(&self, name: &str) -> Vec<String> {
        self.input(name)
            .map(|v| v.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
            .unwrap_or_default()
    }

    /// `STATE_<name>` (the name is not uppercased), as the runner passes state to `post`.
    pub fn state(&self, name: &str) -> Option<String> {
        self.vars.get(&format!("STATE_{name}")).cloned().filter(|v| !v.is_empty())
    }
}

/// Escapes workflow-command data (`%`, `\r`, `\n`).
pub fn escape_data(s: &str) -> String {
    s.replace('%', "%25").replace('\r', "%0D").replace('\n', "%0A")
}

/// Escapes a workflow-command property value (data escapes plus `:` and `,`).
pub fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// Talks to the runner: workflow commands on `out` (stdout), files for outputs, state and the summary.
pub struct Runner<W: Write> {
    pub env: ActionEnv,
    out: W,
}

impl<W: Write> Runner<W> {
    pub fn new(env: ActionEnv, out: W) -> Self {
        Runner { env, out }
    }

    fn command(&mut self, line: String) {
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }

    pub fn info(&mut self, message: &str) {
        self.command(message.to_string());
    }

    /// Masks every whitespace-separated word of `secret` in later log output.
    pub fn add_mask(&mut self, secret: &str) {
        for word in secret.split_whitespace() {
            self.command(format!("::add-mask::{}", escape_data(word)));
        }
    }

    pub fn error(&mut self, title: &str, message: &str) {
        self.command(format!("::error title={}::{}", escape_property(title), escape_data(message)));
    }

    pub fn warning(&mut self, message: &str) {
        self.command(format!("::warning::{}", escape_data(message)));
    }

    pub fn group(&mut self, title: &str) {
        self.command(format!("::group::{}", escape_data(title)));
    }

    pub fn end_group(&mut self) {
        self.command("::endgroup::".into());
    }

    fn append(&self, what: &'static str, var: &str, text: &str) -> Result<(), RunnerError> {
        let Some(path) = self.env.var(var) else {
            return Ok(()); // Not on a runner (a dry run): nothing to record.
        };
        let path = PathBuf::from(path);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| RunnerError::File { what, path: path.clone(), source })?;
        f.write_all(text.as_bytes()).map_err(|source| RunnerError::File { what, path, source })
    }

    /// `name<<DELIM\nvalue\nDELIM\n` with a random delimiter, so any value (multi-line too) is safe.
    fn key_value(name: &str, value: &str) -> Result<String, RunnerError> {
        use rand::Rng;
        let delimiter = format!("ghadelimiter_{:032x}", rand::thread_rng().gen::<u128>());
        if name.contains(&delimiter) || value.contains(&delimiter) {
            return Err(RunnerError::Delimiter { name: name.into() });
        }
        Ok(format!("{name}<<{delimiter}\n{value}\n{delimiter}\n"))
    }

    pub fn set_output(&self, name: &str, value: &str) -> Result<(), RunnerError> {
        self.append("output", "GITHUB_OUTPUT", &Self::key_value(name, value)?)
    }

    pub fn save_state(&self, name: &str, value: &str) -> Result<(), RunnerError> {
        self.append("state", "GITHUB_STATE", &Self::key_value(name, value)?)
    }

    /// Exports `name=value` to the environment of the job's later steps (`GITHUB_ENV`).
    pub fn export_var(&self, name: &str, value: &str) -> Result<(), RunnerError> {
        self.append("environment", "GITHUB_ENV", &Self::key_value(name, value)?)
    }

    pub fn summary(&self, markdown: &str) -> Result<(), RunnerError> {
        self.append("step summary", "GITHUB_STEP_SUMMARY", markdown)
    }
}

/// Parses a file written with `set_output`/`save_state` back into pairs (what the runner does).
pub fn parse_key_values(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some((name, delimiter)) = line.split_once("<<") {
            let mut value = Vec::new();
            for l in lines.by_ref() {
                if l == delimiter {
                    break;
                }
                value.push(l);
            }
            out.push((name.to_string(), value.join("\n")));
        } else if let Some((name, value)) = line.split_once('=') {
            out.push((name.to_string(), value.to_string()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_follow_the_runner_naming() {
        let env = ActionEnv::from_pairs([
            ("INPUT_WARM-POOL-MODE", " require "),
            ("INPUT_POOLS", "a\n\n b \n"),
            ("INPUT_MY_INPUT", "x"),
            ("INPUT_EMPTY", ""),
            ("STATE_lease-key", "k"),
        ]);
        assert_eq!(env.input("warm-pool-mode").as_deref(), Some("require"));
        assert_eq!(env.input_lines("pools"), ["a", "b"]);
        assert_eq!(env.input("my input").as_deref(), Some("x"));
        assert_eq!(env.input("empty"), None);
        assert!(env.required("empty").unwrap_err().to_string().contains("\"empty\""));
        assert_eq!(env.state("lease-key").as_deref(), Some("k"));
    }

    #[test]
    fn outputs_state_and_commands() {
        let dir = tempfile::tempdir().unwrap();
        let out_file = dir.path().join("out");
        let env = ActionEnv::from_pairs([("GITHUB_OUTPUT", out_file.to_str().unwrap())]);
        let mut buf = Vec::new();
        {
            let mut r = Runner::new(env, &mut buf);
            r.set_output("report", "{\n \"a\": 1\n}").unwrap();
            r.set_output("ids", "sbx_1 sbx_2").unwrap();
            r.add_mask("s3cr3t two");
            r.error("Pool a: not ready", "line1\nline2 100%");
            r.save_state("x", "y").unwrap(); // no GITHUB_STATE: ignored
        }
        let parsed = parse_key_values(&std::fs::read_to_string(&out_file).unwrap());
        assert_eq!(
            parsed,
            [("report".into(), "{\n \"a\": 1\n}".into()), ("ids".into(), "sbx_1 sbx_2".into())]
        );
        let printed = String::from_utf8(buf).unwrap();
        assert_eq!(
            printed,
            "::add-mask::s3cr3t\n::add-mask::two\n::error title=Pool a%3A not ready::line1%0Aline2 100%25\n"
        );
    }
}
