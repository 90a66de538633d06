//! Resource ids, one type per kind: a `SandboxId` cannot be passed where a `BuildId` is meant. On the wire each is
//! a plain string with its kind's prefix (`sbx_…`); reading one with another prefix is refused with the field's
//! path, like any other bad value. Each derefs to `&str`, so code that only reads an id takes `&str`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

macro_rules! ids {
    ($($(#[$doc:meta])* $name:ident = $prefix:literal, $what:literal;)*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(try_from = "String", into = "String")]
        #[schema(value_type = String)]
        pub struct $name(String);

        impl $name {
            /// What every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;

            /// The id whose part after the prefix is `suffix` (a fresh id takes random hex); the suffix is made of
            /// letters, digits, `-` and `_`.
            pub fn from_suffix(suffix: impl fmt::Display) -> Self {
                let id = format!("{}{suffix}", Self::PREFIX);
                debug_assert!(Self::is(&id), "{id:?} is not a valid id");
                $name(id)
            }

            /// `value` as an id of this kind, or a 400 naming `field`.
            pub fn parse(field: &str, value: &str) -> Result<Self, FieldError> {
                Self::try_from(value.to_string()).map_err(|message| FieldError::new(field, message))
            }

            /// Whether `value` is this kind's prefix followed by letters, digits, `-` or `_` (an id is safe as a
            /// file name and in a URL path).
            pub fn is(value: &str) -> bool {
                value.strip_prefix(Self::PREFIX).is_some_and(|rest| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(value: String) -> Result<Self, String> {
                if Self::is(&value) {
                    Ok($name(value))
                } else {
                    Err(format!("{value:?} is not {} id ({}…)", $what, Self::PREFIX))
                }
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl From<&$name> for String {
            fn from(id: &$name) -> String {
                id.0.clone()
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// An id names its sandbox's (or build's) directory on a host.
        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                self.0.as_ref()
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    )*};
}

ids! {
    /// A template: `tpl_…`.
    TemplateId = "tpl_", "a template";
    /// A build of a template: `bld_…`.
    BuildId = "bld_", "a build";
    /// A sandbox: `sbx_…`.
    SandboxId = "sbx_", "a sandbox";
    /// A warm pool: `twp_…`.
    PoolId = "twp_", "a warm pool";
    /// An account: `acc_…`.
    AccountId = "acc_", "an account";
    /// An API token (not its secret): `tok_…`.
    TokenId = "tok_", "a token";
    /// A trust policy: `trp_…`.
    TrustPolicyId = "trp_", "a trust policy";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_is_the_plain_string_and_the_prefix_is_checked() {
        let id: SandboxId = serde_json::from_str("\"sbx_1a\"").unwrap();
        assert_eq!(id, "sbx_1a");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"sbx_1a\"");
        for bad in ["\"bld_1a\"", "\"sbx_\"", "\"\"", "\"1a\"", "\"sbx_../x\"", "\"sbx_a/b\""] {
            let e = serde_json::from_str::<SandboxId>(bad).unwrap_err().to_string();
            assert!(e.contains("is not a sandbox id (sbx_…)"), "{bad}: {e}");
        }
        let e = PoolId::parse("pool_id", "tpl_x").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("pool_id", "\"tpl_x\" is not a warm pool id (twp_…)")
        );
        assert_eq!(BuildId::from_suffix("00ff").as_str(), "bld_00ff");
        assert!(AccountId::is("acc_default") && !AccountId::is("acc_") && !AccountId::is("tok_1"));
    }
}
