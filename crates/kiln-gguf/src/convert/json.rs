//! Typed access to the JSON files of a Hugging Face checkpoint, with errors that
//! name the file and the key.

use kiln_core::{Error, Result};
use serde_json::{Map, Value as Json};
use std::path::Path;

/// Reads and parses the JSON object in `path`.
pub(crate) fn read_object(path: &Path) -> Result<Map<String, Json>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Json::Object(map)) => Ok(map),
        Ok(other) => Err(Error::format(
            path.display().to_string(),
            format!("expected a JSON object, found {}", kind(&other)),
        )),
        Err(e) => Err(Error::format(path.display().to_string(), e.to_string())),
    }
}

/// A JSON object and the name of the file (or key path) it came from.
#[derive(Clone, Copy)]
pub(crate) struct Object<'a> {
    pub map: &'a Map<String, Json>,
    pub source: &'a str,
}

impl<'a> Object<'a> {
    pub fn new(map: &'a Map<String, Json>, source: &'a str) -> Object<'a> {
        Object { map, source }
    }

    /// The value of `key`, treating JSON `null` as absent.
    pub fn get(&self, key: &str) -> Option<&'a Json> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// An error about `key` of this object.
    pub fn error(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::format(format!("{} key {key:?}", self.source), msg)
    }

    fn expected(&self, key: &str, what: &str, found: &Json) -> Error {
        self.error(key, format!("expected {what}, found {}", describe(found)))
    }

    /// `key` as a non-negative integer, if present.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.expected(key, "a non-negative integer", v))
            })
            .transpose()
    }

    /// `key` as a non-negative integer; missing is an error.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.error(key, "key is missing"))
    }

    /// `key` as a number, if present.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.expected(key, "a number", v)))
            .transpose()
    }

    /// `key` as a number; missing is an error.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?
            .ok_or_else(|| self.error(key, "key is missing"))
    }

    /// `key` as a bool, if present.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.expected(key, "true or false", v))
            })
            .transpose()
    }

    /// `key` as a string, if present.
    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.expected(key, "a string", v)))
            .transpose()
    }

    /// `key` as an object, if present.
    pub fn opt_object(&self, key: &str) -> Result<Option<&'a Map<String, Json>>> {
        self.get(key)
            .map(|v| {
                v.as_object()
                    .ok_or_else(|| self.expected(key, "an object", v))
            })
            .transpose()
    }

    /// `key` as an array, if present.
    pub fn opt_array(&self, key: &str) -> Result<Option<&'a Vec<Json>>> {
        self.get(key)
            .map(|v| {
                v.as_array()
                    .ok_or_else(|| self.expected(key, "an array", v))
            })
            .transpose()
    }
}

/// A short description of a JSON value for error messages.
pub(crate) fn describe(v: &Json) -> String {
    match v {
        Json::String(s) => format!("the string {s:?}"),
        Json::Number(n) => format!("the number {n}"),
        Json::Bool(b) => format!("{b}"),
        other => kind(other).to_owned(),
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a bool",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}
