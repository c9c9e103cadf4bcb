//! A PanteraS `restricted/` folder: `common`, `host` and `overwrite`, read in
//! that order as `generate_yml.sh` sourced them, over the process environment.
//!
//! ```text
//!  process environment ◀── common ◀── host ◀── overwrite   (later wins, as in sh)
//!        └──────────── Layered: Env ──▶ config::load, roles::plan
//! ```
//!
//! The files are shell, but only its assignment part is read: `KEY=value`,
//! `export KEY=value`, `'single'` and `"double"` quotes, `$VAR`, `${VAR}` and
//! `${VAR:-default}` expanded from what is set so far, `#` comments. Anything
//! else (a command, an `if`) is an error naming the file and line: it would
//! have run in PanteraS and cannot be honoured here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::env::Env;

/// The files of a restricted folder, in the order they are read.
pub const FILES: [&str; 3] = ["common", "host", "overwrite"];

/// Why a restricted folder could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RestrictedError {
    /// The folder is not there.
    #[error("the restricted folder {0} does not exist")]
    NoFolder(PathBuf),
    /// A file could not be read.
    #[error("could not read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not an assignment.
    #[error("{path} line {line}: {problem}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// What is wrong.
        problem: Unreadable,
    },
}

/// Why a line of a restricted file cannot be read as a plain assignment.
#[derive(Debug, thiserror::Error)]
pub enum Unreadable {
    /// Not `KEY=value`.
    #[error("`{0}` is not a KEY=value assignment")]
    NotAssignment(String),
    /// A quote or `${` left open.
    #[error("a {0} is not closed")]
    Unclosed(&'static str),
    /// `` `...` `` or `$(...)`: Wayfinder reads values, it runs nothing.
    #[error("command substitution {0} is not read")]
    Substitution(&'static str),
    /// Words after the value, which a shell would run as a command.
    #[error("`{0}` after the value would run as a command")]
    Command(String),
}

/// The variables of a restricted folder over a base environment.
pub struct Layered<'a> {
    vars: HashMap<String, String>,
    /// The file and line that set each of `vars`.
    origins: HashMap<String, (PathBuf, usize)>,
    /// The files that were there, in the order read.
    pub read: Vec<PathBuf>,
    base: &'a dyn Env,
}

impl std::fmt::Debug for Layered<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layered")
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl Env for Layered<'_> {
    fn get(&self, key: &str) -> Option<String> {
        match self.vars.get(key) {
            // Set in a file, empty or not: the shell's value wins.
            Some(v) => Some(v.clone()).filter(|v| !v.trim().is_empty()),
            None => self.base.get(key),
        }
    }

    fn origin(&self, key: &str) -> Option<String> {
        match self.origins.get(key) {
            Some((path, line)) => Some(format!("{} line {line}", path.display())),
            None => self.base.origin(key),
        }
    }
}

impl<'a> Layered<'a> {
    /// Reads `dir`'s `common`, `host`, `overwrite` (each optional) over `base`.
    pub fn read(dir: &Path, base: &'a dyn Env) -> Result<Self, RestrictedError> {
        if !dir.is_dir() {
            return Err(RestrictedError::NoFolder(dir.to_path_buf()));
        }
        let mut layered = Layered {
            vars: HashMap::new(),
            origins: HashMap::new(),
            read: Vec::new(),
            base,
        };
        for name in FILES {
            let path = dir.join(name);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(RestrictedError::Read { path, source }),
            };
            layered
                .apply(&text, &path)
                .map_err(|(line, problem)| RestrictedError::Line {
                    path: path.clone(),
                    line,
                    problem,
                })?;
            layered.read.push(path);
        }
        Ok(layered)
    }

    /// Applies the assignments of one file.
    fn apply(&mut self, text: &str, path: &Path) -> Result<(), (usize, Unreadable)> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").map_or(line, str::trim_start);
            let Some((key, value)) = line.split_once('=') else {
                return Err((i + 1, Unreadable::NotAssignment(line.to_string())));
            };
            if key.is_empty()
                || key.starts_with(|c: char| c.is_ascii_digit())
                || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err((i + 1, Unreadable::NotAssignment(line.to_string())));
            }
            let value = self.word(value).map_err(|p| (i + 1, p))?;
            self.vars.insert(key.to_string(), value);
            self.origins.insert(key.to_string(), (path.to_path_buf(), i + 1));
        }
        Ok(())
    }

    /// The value of one shell word (quotes and expansions), up to a comment.
    fn word(&self, text: &str) -> Result<String, Unreadable> {
        let mut out = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' => loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => out.push(c),
                        None => return Err(Unreadable::Unclosed("' quote")),
                    }
                },
                '"' => loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => out.push(c),
                            Some(c) => {
                                out.push('\\');
                                out.push(c);
                            }
                            None => return Err(Unreadable::Unclosed("\" quote")),
                        },
                        Some('$') => self.expand(&mut chars, &mut out)?,
                        Some('`') => return Err(Unreadable::Substitution("`...`")),
                        Some(c) => out.push(c),
                        None => return Err(Unreadable::Unclosed("\" quote")),
                    }
                },
                '$' => self.expand(&mut chars, &mut out)?,
                '`' => return Err(Unreadable::Substitution("`...`")),
                '\\' => {
                    if let Some(c) = chars.next() {
                        out.push(c);
                    }
                }
                c if c.is_whitespace() => {
                    // `KEY=value # note` ends at the space; anything but a
                    // comment after it would be a command.
                    let rest: String = chars.collect();
                    let rest = rest.trim();
                    if rest.is_empty() || rest.starts_with('#') {
                        break;
                    }
                    return Err(Unreadable::Command(rest.to_string()));
                }
                c => out.push(c),
            }
        }
        Ok(out)
    }

    /// `$VAR`, `${VAR}` or `${VAR:-default}` / `${VAR-default}`, after its `$`.
    fn expand(&self, chars: &mut std::iter::Peekable<std::str::Chars<'_>>, out: &mut String) -> Result<(), Unreadable> {
        let value_of = |name: &str| -> Option<String> {
            match self.vars.get(name) {
                Some(v) => Some(v.clone()),
                None => self.base.get(name),
            }
        };
        if chars.peek() == Some(&'(') {
            return Err(Unreadable::Substitution("$(...)"));
        }
        if chars.peek() == Some(&'{') {
            chars.next();
            let mut inner = String::new();
            loop {
                match chars.next() {
                    Some('}') => break,
                    Some(c) => inner.push(c),
                    None => return Err(Unreadable::Unclosed("${")),
                }
            }
            let (name, default, empty_too) = match (inner.split_once(":-"), inner.split_once('-')) {
                (Some((n, d)), _) => (n, Some(d), true),
                (None, Some((n, d))) => (n, Some(d), false),
                (None, None) => (inner.as_str(), None, false),
            };
            match (value_of(name), default) {
                (Some(v), Some(d)) if empty_too && v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {}
            }
            return Ok(());
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                chars.next();
            } else {
                break;
            }
        }
        if name.is_empty() {
            out.push('$');
        } else if let Some(v) = value_of(&name) {
            out.push_str(&v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn files_are_read_in_order_over_the_environment() {
        let dir = folder(&[
            ("common", "MASTER=${MASTER:-true}\nCONSUL_DC=dc1\n"),
            (
                "host",
                "# PanteraS README's lines\nIP=10.0.0.1\nCONSUL_HOSTS=\"-join=m1 -join=m2\"\nexport CONSUL_DC='eu west'\n",
            ),
            ("overwrite", "CONSUL_DC=\"$CONSUL_DC-2\" # the last word\n"),
        ]);
        let env = base(&[("MASTER", "false"), ("SLAVE", "true")]);
        let layered = Layered::read(dir.path(), &env).unwrap();
        assert_eq!(
            layered.get("MASTER").as_deref(),
            Some("false"),
            "${{MASTER:-true}} keeps the env"
        );
        assert_eq!(layered.get("SLAVE").as_deref(), Some("true"), "from the environment");
        assert_eq!(layered.get("IP").as_deref(), Some("10.0.0.1"));
        assert_eq!(layered.get("CONSUL_HOSTS").as_deref(), Some("-join=m1 -join=m2"));
        assert_eq!(layered.get("CONSUL_DC").as_deref(), Some("eu west-2"));
        assert_eq!(layered.read.len(), 3);
        let host = dir.path().join("host").display().to_string();
        assert_eq!(layered.origin("IP"), Some(format!("{host} line 2")));
        let overwrite = dir.path().join("overwrite").display().to_string();
        assert_eq!(
            layered.origin("CONSUL_DC"),
            Some(format!("{overwrite} line 1")),
            "the last wins"
        );
        assert_eq!(layered.origin("SLAVE"), None, "from the environment");
    }

    #[test]
    fn a_file_wins_over_the_environment_as_in_sh() {
        let dir = folder(&[("host", "MASTER=false\nLISTEN_IP=\n")]);
        let env = base(&[("MASTER", "true"), ("LISTEN_IP", "10.0.0.9")]);
        let layered = Layered::read(dir.path(), &env).unwrap();
        assert_eq!(layered.get("MASTER").as_deref(), Some("false"));
        assert_eq!(layered.get("LISTEN_IP"), None, "set empty in the file: unset");
    }

    #[test]
    fn what_is_not_an_assignment_is_an_error_with_its_line() {
        for (text, needle) in [
            ("IP=1.2.3.4\necho hi\n", "line 2"),
            ("IP=$(hostname -i)\n", "command substitution"),
            ("IP=`hostname -i`\n", "command substitution"),
            ("A=b c\n", "would run as a command"),
            ("A=\"open\n", "not closed"),
            ("1A=x\n", "not a KEY=value"),
        ] {
            let dir = folder(&[("host", text)]);
            let e = Layered::read(dir.path(), &base(&[])).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("host"), "{text:?}: {e}");
        }
        let e = Layered::read(Path::new("/nonexistent/restricted"), &base(&[])).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
