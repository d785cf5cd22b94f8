//! Walking the YAML value tree: each accessor checks a key's type and names its path
//! in the error (`spec.containers[0].image must be a string`).

use serde_yaml::{Mapping, Value};

use super::checks::join;
use crate::error::{Error, Result};

/// Walks one manifest's value tree; `source` (the file) starts every error message.
pub(super) struct Walker<'a> {
    source: &'a str,
}

impl<'a> Walker<'a> {
    pub(super) fn new(source: &'a str) -> Self {
        Walker { source }
    }
}

impl Walker<'_> {
    pub(super) fn err(&self, path: &str, what: &str) -> Error {
        Error::Manifest {
            file: self.source.to_string(),
            detail: format!("{path} {what}"),
        }
    }

    /// A value at `path` that a check refused (a name, a quantity).
    pub(super) fn bad(&self, path: &str) -> impl FnOnce(Error) -> Error + '_ {
        let path = path.to_string();
        move |e| self.err(&path, &e.to_string())
    }

    pub(super) fn unsupported(&self, path: &str) -> Error {
        self.err(path, "is not supported yet")
    }

    /// The mapping at `path`, after checking it has only `known` keys.
    pub(super) fn map<'v>(&self, v: &'v Value, path: &str, known: &[&str]) -> Result<&'v Mapping> {
        let m = v
            .as_mapping()
            .ok_or_else(|| self.err(path, "must be a mapping"))?;
        for key in m.keys() {
            let k = key
                .as_str()
                .ok_or_else(|| self.err(path, "has a key that is not a string"))?;
            if !known.contains(&k) {
                return Err(self.unsupported(&join(path, k)));
            }
        }
        Ok(m)
    }

    pub(super) fn string(&self, m: &Mapping, path: &str, key: &str) -> Result<Option<String>> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(&join(path, key), "must be a string")),
        }
    }

    pub(super) fn required(&self, m: &Mapping, path: &str, key: &str) -> Result<String> {
        match self.string(m, path, key)? {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(self.err(&join(path, key), "is required")),
        }
    }

    pub(super) fn boolean(&self, m: &Mapping, path: &str, key: &str) -> Result<bool> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.err(&join(path, key), "must be true or false")),
        }
    }

    pub(super) fn int(&self, m: &Mapping, path: &str, key: &str) -> Result<Option<i64>> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(&join(path, key), "must be an integer")),
            Some(_) => Err(self.err(&join(path, key), "must be an integer")),
        }
    }

    pub(super) fn list<'v>(&self, m: &'v Mapping, path: &str, key: &str) -> Result<&'v [Value]> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(&[]),
            Some(Value::Sequence(s)) => Ok(s),
            Some(_) => Err(self.err(&join(path, key), "must be a list")),
        }
    }

    pub(super) fn strings(&self, m: &Mapping, path: &str, key: &str) -> Result<Vec<String>> {
        let p = join(path, key);
        self.list(m, path, key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(&format!("{p}[{i}]"), "must be a string"))
            })
            .collect()
    }
}
