//! Small builders for tf-provider schemas, and the mapping from the API's field paths
//! (`warm_processes[1].probes.readiness.exec.command`) to Terraform attribute paths
//! (`warm_process[1].readiness_probe[0].exec[0].command`), so plan-time errors point at the right line.

use std::collections::HashMap;

use tf_provider::schema::{Attribute, AttributeConstraint, AttributeType, Block, Description, NestedBlock};
use tf_provider::AttributePath;

pub fn attr(attr_type: AttributeType, constraint: AttributeConstraint, description: &str) -> Attribute {
    Attribute {
        attr_type,
        description: Description::plain(description.to_string()),
        constraint,
        ..Default::default()
    }
}

pub fn string(constraint: AttributeConstraint, description: &str) -> Attribute {
    attr(AttributeType::String, constraint, description)
}

pub fn number(constraint: AttributeConstraint, description: &str) -> Attribute {
    attr(AttributeType::Number, constraint, description)
}

pub fn boolean(constraint: AttributeConstraint, description: &str) -> Attribute {
    attr(AttributeType::Bool, constraint, description)
}

pub fn string_list(constraint: AttributeConstraint, description: &str) -> Attribute {
    attr(AttributeType::List(Box::new(AttributeType::String)), constraint, description)
}

pub fn string_map(constraint: AttributeConstraint, description: &str) -> Attribute {
    attr(AttributeType::Map(Box::new(AttributeType::String)), constraint, description)
}

pub fn block(
    description: &str,
    attributes: Vec<(&str, Attribute)>,
    blocks: Vec<(&str, NestedBlock)>,
) -> Block {
    Block {
        version: 1,
        description: Description::plain(description.to_string()),
        attributes: attributes.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<HashMap<_, _>>(),
        blocks: blocks.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        deprecated: false,
    }
}

/// Reports an API field error `(path, message)` on the matching attribute, so Terraform shows its file and line.
pub fn field_error(diags: &mut tf_provider::Diagnostics, (field, message): (String, String)) {
    diags.error(format!("Invalid {field}"), message, attribute_path(&field));
}

/// Blocks with "at most one" nesting: Terraform addresses their attributes through index 0.
const SINGLE_BLOCKS: [&str; 10] = [
    "readiness",
    "resources",
    "exec",
    "http_get",
    "tcp_socket",
    "process",
    "startup_probe",
    "readiness_probe",
    "liveness_probe",
    "timeouts",
];

/// Maps an API field path to the attribute path of the provider's schema.
pub fn attribute_path(api_path: &str) -> AttributePath {
    let mut parts: Vec<String> = Vec::new();
    let mut iter = api_path.split('.').peekable();
    while let Some(part) = iter.next() {
        let part = match part {
            "build" => match iter.next() {
                Some(next) => format!("build_{next}"),
                None => "build_steps".into(),
            },
            "probes" => match iter.next() {
                Some(kind) => format!("{}_probe", kind.split('[').next().unwrap_or(kind)),
                None => "readiness_probe".into(),
            },
            other => other.replace("warm_processes", "warm_process"),
        };
        parts.push(part);
    }
    let mut path: Option<AttributePath> = None;
    for part in parts {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n.to_string(), rest.trim_end_matches(']').parse::<i64>().ok()),
            None => (part.clone(), None),
        };
        let is_map_key = path.is_some() && !name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        path = Some(match path {
            None => AttributePath::new(name.clone()),
            Some(p) if is_map_key => p.key(name.clone()),
            Some(p) => p.attribute(name.clone()),
        });
        if let Some(i) = index {
            path = path.map(|p| p.index(i));
        } else if SINGLE_BLOCKS.contains(&name.as_str()) {
            path = path.map(|p| p.index(0));
        }
    }
    path.unwrap_or_else(AttributePath::root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths_map_to_schema_paths() {
        assert_eq!(
            attribute_path("warm_processes[1].cwd").to_string(),
            AttributePath::new("warm_process").index(1).attribute("cwd").to_string()
        );
        assert_eq!(
            attribute_path("warm_processes[0].probes.readiness.exec.command").to_string(),
            AttributePath::new("warm_process")
                .index(0)
                .attribute("readiness_probe")
                .index(0)
                .attribute("exec")
                .index(0)
                .attribute("command")
                .to_string()
        );
        assert_eq!(
            attribute_path("build.steps[2]").to_string(),
            AttributePath::new("build_steps").index(2).to_string()
        );
        assert_eq!(
            attribute_path("resources.cpu").to_string(),
            AttributePath::new("resources").index(0).attribute("cpu").to_string()
        );
        assert_eq!(attribute_path("max_ready").to_string(), AttributePath::new("max_ready").to_string());
    }
}
