//! What every config section's validation shares: the error type and the
//! parsers for values written by people (domains, booleans).
//!
//! A leaf: it imports no other module of the crate, so each component's
//! `settings` module uses it without reaching back into [`crate::config`],
//! which aggregates the sections.

use hickory_proto::rr::Name;

/// A configuration problem: which file, which key, what is wrong.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    /// The config file (or `environment` for a bad variable).
    pub file: String,
    /// The key, e.g. `dns.listen`, or the variable name.
    pub key: String,
    /// What is wrong, in words.
    pub problem: String,
}

impl ConfigError {
    /// A problem with the environment variable `var`.
    pub fn env(var: &str, problem: impl Into<String>) -> Self {
        Self {
            file: "environment".into(),
            key: var.into(),
            problem: problem.into(),
        }
    }
}

/// How a section's validation names a problem: key and words in, the error
/// (with the file it came from) out.
pub type ErrorAt<'a> = &'a dyn Fn(&str, String) -> ConfigError;

/// Parses a domain written by a person (`.apps.example.com`, `consul`) into a
/// fully qualified lower-case name.
pub fn parse_domain(text: &str) -> Result<Name, String> {
    let trimmed = text.trim().trim_start_matches('.');
    if trimmed.is_empty() || trimmed == "." {
        return Err("must be a domain name such as `apps.example.com`".into());
    }
    let mut name = Name::from_ascii(trimmed).map_err(|e| format!("`{text}` is not a domain: {e}"))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// A boolean as PanteraS's variables write it: `true|1|yes|on` or
/// `false|0|no|off`, any case; the error says what was given.
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(format!("`{other}` is not true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_and_booleans_parse_as_people_write_them() {
        assert_eq!(
            parse_domain(".Apps.Example.com").unwrap().to_string(),
            "apps.example.com."
        );
        assert!(parse_domain(" . ").is_err());
        assert_eq!(parse_bool(" YES "), Ok(true));
        assert_eq!(parse_bool("off"), Ok(false));
        assert_eq!(parse_bool("maybe"), Err("`maybe` is not true or false".into()));
    }
}
