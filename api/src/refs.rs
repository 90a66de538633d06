//! Template refs: `name`, `name:tag` or `name@bld_…`.

use crate::error::{validate_name, FieldError};
use crate::id_prefix;

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
        build_id: String,
    },
}

impl TemplateRef {
    pub fn parse(field: &str, value: &str) -> Result<TemplateRef, FieldError> {
        if let Some((name, build_id)) = value.split_once('@') {
            validate_name(field, name)?;
            if !build_id.starts_with(id_prefix::BUILD) || build_id.len() <= id_prefix::BUILD.len() {
                return Err(FieldError::new(field, format!("{build_id:?} is not a build id (bld_…)")));
            }
            return Ok(TemplateRef::Build { name: name.into(), build_id: build_id.into() });
        }
        if let Some((name, tag)) = value.split_once(':') {
            validate_name(field, name)?;
            validate_name(field, tag)?;
            return Ok(TemplateRef::Tag { name: name.into(), tag: tag.into() });
        }
        // A bare template id is accepted wherever a name is.
        if !value.starts_with(id_prefix::TEMPLATE) {
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
            TemplateRef::Build { name: "api".into(), build_id: "bld_1".into() }
        );
        assert!(TemplateRef::parse("t", "api@x").is_err());
        assert!(TemplateRef::parse("t", "Api").is_err());
        assert!(TemplateRef::parse("t", "api:").is_err());
        assert!(TemplateRef::parse("t", "../etc").is_err());
    }
}
