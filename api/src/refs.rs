//! Template refs: `name`, `name:tag` or `name@bld_…`.

use crate::error::{validate_name, FieldError};
use crate::ids::{BuildId, TemplateId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateRef {
    /// The template's newest ready build.
    Name(String),
    Tag {
        name: String,
        tag: String,
    },
    Build {
        name: String,
        build_id: BuildId,
    },
}

impl TemplateRef {
    pub fn parse(field: &str, value: &str) -> Result<TemplateRef, FieldError> {
        if let Some((name, build_id)) = value.split_once('@') {
            validate_name(field, name)?;
            let build_id = BuildId::parse(field, build_id)?;
            return Ok(TemplateRef::Build { name: name.into(), build_id });
        }
        if let Some((name, tag)) = value.split_once(':') {
            validate_name(field, name)?;
            validate_name(field, tag)?;
            return Ok(TemplateRef::Tag { name: name.into(), tag: tag.into() });
        }
        // A bare template id is accepted wherever a name is.
        if !TemplateId::is(value) {
            validate_name(field, value)?;
        }
        Ok(TemplateRef::Name(value.into()))
    }

    pub fn name(&self) -> &str {
        match self {
            TemplateRef::Name(n) | TemplateRef::Tag { name: n, .. } | TemplateRef::Build { name: n, .. } => n,
        }
    }

    pub fn tag(&self) -> Option<&str> {
        match self {
            TemplateRef::Tag { tag, .. } => Some(tag),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(TemplateRef::parse("t", "api").unwrap(), TemplateRef::Name("api".into()));
        assert_eq!(
            TemplateRef::parse("t", "api:stable").unwrap(),
            TemplateRef::Tag { name: "api".into(), tag: "stable".into() }
        );
        assert_eq!(
            TemplateRef::parse("t", "api@bld_1").unwrap(),
            TemplateRef::Build { name: "api".into(), build_id: BuildId::parse("b", "bld_1").unwrap() }
        );
        assert!(TemplateRef::parse("t", "api@x").is_err());
        assert!(TemplateRef::parse("t", "Api").is_err());
        assert!(TemplateRef::parse("t", "api:").is_err());
        assert!(TemplateRef::parse("t", "../etc").is_err());
    }
}
