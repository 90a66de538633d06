//! The generated references in `docs/`: the CLI from its clap definition, the HTTP API from the served
//! OpenAPI document. A test (`server/tests/docs.rs`) keeps the files equal to what these render.

use std::fmt::Write;

use clap::CommandFactory;

/// `docs/cli.md`: every command with its description, usage and flags.
pub fn cli_reference() -> String {
    let mut out = String::from(
        "# CLI reference\n\n\
         Generated from the CLI's own definition (`warmpool help` prints the same). Every command takes \
         `--endpoint` (`WARMPOOL_ENDPOINT`), `--token` (`WARMPOOL_TOKEN`) and `--json`; durations are \
         written `500ms`, `30s`, `10m`, `2h`. A command whose output is cut off (`warmpool pool list | head -1`) \
         ends quietly, as Unix tools do: SIGPIPE ends it (exit status 141 in a shell), with nothing on stderr.\n",
    );
    let mut root = crate::cli::Cli::command();
    root.build();
    for sub in root.get_subcommands() {
        command(&mut out, sub, "warmpool");
    }
    out
}

fn command(out: &mut String, cmd: &clap::Command, parent: &str) {
    let name = format!("{parent} {}", cmd.get_name());
    if cmd.get_name() == "help" {
        return;
    }
    let subs: Vec<&clap::Command> = cmd.get_subcommands().filter(|c| c.get_name() != "help").collect();
    if !subs.is_empty() {
        let _ =
            writeln!(out, "\n## `{name}`\n\n{}", cmd.get_about().map(|a| a.to_string()).unwrap_or_default());
        for sub in subs {
            command(out, sub, &name);
        }
        return;
    }
    let _ =
        writeln!(out, "\n### `{name}`\n\n{}\n", cmd.get_about().map(|a| a.to_string()).unwrap_or_default());
    let usage = cmd.clone().bin_name(&name).render_usage().to_string();
    let _ = writeln!(out, "```text\n{}\n```\n", usage.trim_start_matches("Usage: "));
    let globals = ["endpoint", "token", "json", "help"];
    let args: Vec<&clap::Arg> =
        cmd.get_arguments().filter(|a| !globals.contains(&a.get_id().as_str())).collect();
    if args.is_empty() {
        return;
    }
    out.push_str("| argument | description |\n|---|---|\n");
    for arg in args {
        let flag = match (arg.get_long(), arg.get_short()) {
            (Some(long), Some(short)) => format!("`-{short}`, `--{long}`"),
            (Some(long), None) => format!("`--{long}`"),
            (None, Some(short)) => format!("`-{short}`"),
            (None, None) => format!(
                "`{}`",
                arg.get_value_names()
                    .and_then(|v| v.first())
                    .map_or_else(|| arg.get_id().to_string().to_uppercase(), |v| v.to_string())
            ),
        };
        let mut help =
            arg.get_help().map(|h| h.to_string()).unwrap_or_default().replace('|', "\\|").replace('\n', " ");
        let defaults: Vec<String> =
            arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        if !defaults.is_empty() {
            let _ = write!(help, " (default: `{}`)", defaults.join(","));
        }
        if let Some(env) = arg.get_env() {
            let _ = write!(help, " (env: `{}`)", env.to_string_lossy());
        }
        let _ = writeln!(out, "| {flag} | {help} |");
    }
}

/// `docs/api.md`: every operation, grouped by tag, with its parameters, body and answer.
pub fn api_reference() -> String {
    let doc = crate::http::openapi::json();
    let mut out = String::from(
        "# HTTP API reference\n\n\
         Generated from the OpenAPI document the server serves at `GET /v1/openapi.json` (feed that to a \
         client generator). Every call but the first four takes `Authorization: Bearer <token>`. Errors \
         answer `{\"error\": {\"code\", \"message\", \"details\"}}`: `invalid_request` 400 \
         (`details.field` names the field), `unauthorized` 401, `forbidden` 403 (the caller may not do this, \
         whatever the input; `details.field` names the field when one is to blame), `not_found` 404 (also for another \
         account's resources), `conflict` 409, `payload_too_large` 413, `quota_exceeded` 429, \
         `warm_pool_unavailable` 503, `service_unavailable` 503, `internal` 500. Unknown JSON fields are \
         rejected; bodies over 1 MiB too.\n",
    );
    let mut by_tag: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let order = ["server", "templates", "builds", "pools", "sandboxes", "accounts"];
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            let tag = op["tags"][0].as_str().unwrap_or("other").to_string();
            let mut row = format!(
                "### `{} {path}`\n\n{}\n",
                method.to_uppercase(),
                op["summary"].as_str().unwrap_or("")
            );
            for p in op["parameters"].as_array().into_iter().flatten() {
                let _ = write!(
                    row,
                    "\n- {} `{}` ({}{}): {}",
                    p["in"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or(""),
                    schema_name(&p["schema"]),
                    if p["required"] == true { "" } else { ", optional" },
                    p["description"].as_str().unwrap_or("")
                );
            }
            if let Some(body) = op["requestBody"]["content"]["application/json"]["schema"].as_object() {
                let _ = write!(row, "\n- body: {}", schema_name(&serde_json::Value::Object(body.clone())));
            }
            for (status, response) in
                op["responses"].as_object().into_iter().flatten().filter(|(s, _)| *s != "default")
            {
                let (kind, schema) = response["content"]
                    .as_object()
                    .and_then(|c| c.iter().next())
                    .map_or(("".to_string(), "".to_string()), |(kind, c)| {
                        (kind.clone(), schema_name(&c["schema"]))
                    });
                let _ = write!(
                    row,
                    "\n- answers {status} {schema}{}",
                    if kind.is_empty() { String::new() } else { format!(" (`{kind}`)") }
                );
            }
            row.push('\n');
            by_tag.entry(tag).or_default().push(row);
        }
    }
    for tag in order
        .iter()
        .map(|t| t.to_string())
        .chain(by_tag.keys().filter(|t| !order.contains(&t.as_str())).cloned().collect::<Vec<_>>())
    {
        let Some(rows) = by_tag.get(&tag) else { continue };
        let _ = writeln!(out, "\n## {}\n", capitalize(&tag));
        for row in rows {
            let _ = writeln!(out, "{row}");
        }
    }
    out.push_str("\n## Schemas\n\nField by field, as JSON Schema (OpenAPI 3.1):\n");
    for (name, schema) in doc["components"]["schemas"].as_object().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\n### {name}\n\n```json\n{}\n```",
            serde_json::to_string_pretty(schema).unwrap_or_default()
        );
    }
    out
}

fn schema_name(schema: &serde_json::Value) -> String {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("[{name}](#{})", name.to_lowercase());
    }
    if let Some(variants) = schema["oneOf"].as_array() {
        return variants.iter().map(schema_name).collect::<Vec<_>>().join(" or ");
    }
    match &schema["type"] {
        serde_json::Value::String(t) if t == "array" => format!("array of {}", schema_name(&schema["items"])),
        serde_json::Value::String(t) => format!("`{t}`"),
        serde_json::Value::Array(types) => {
            types.iter().map(|t| format!("`{}`", t.as_str().unwrap_or(""))).collect::<Vec<_>>().join(" or ")
        }
        _ => "any".to_string(),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}
