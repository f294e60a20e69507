//! The key-value metadata of a GGUF file, in file order, with typed getters.

use crate::value::{Array, MetadataType, Value};
use kiln_core::{Error, Result};
use std::collections::HashMap;

/// GGUF metadata: unique keys mapped to values, kept in insertion (file) order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Metadata {
        Metadata::default()
    }

    /// Sets `key` to `value`, replacing an existing value in place (keeping its
    /// position) or appending a new key.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        let key = key.into();
        let value = value.into();
        match self.index.get(&key) {
            Some(&i) => self.entries[i].1 = value,
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
            }
        }
    }

    /// Appends `key`, which must not be present yet (the reader's insert: a file
    /// with a repeated key is malformed). Returns `false`, changing nothing, if the
    /// key is already present.
    pub(crate) fn insert_new(&mut self, key: String, value: Value) -> bool {
        if self.index.contains_key(&key) {
            return false;
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        true
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// The entries in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value of `key` as a `T` (see [`MetadataType::from_value`] for the
    /// conversions allowed). An error names the key and the type found when the key
    /// is missing or holds another type.
    pub fn get_as<T: MetadataType>(&self, key: &str) -> Result<T> {
        let value = self.require(key)?;
        T::from_value(value).ok_or_else(|| type_mismatch(key, T::VALUE_TYPE.name(), value))
    }

    /// `key` as a u32 (from any integer type that holds the value).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.get_as(key)
    }

    /// `key` as a u64 (from any integer type that holds the value).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get_as(key)
    }

    /// `key` as an f32 (the value must be stored as f32).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.get_as(key)
    }

    /// `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.get_as(key)
    }

    /// `key` as a string slice.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            Value::String(s) => Ok(s),
            other => Err(type_mismatch(key, "string", other)),
        }
    }

    /// `key` as an array.
    pub fn get_array(&self, key: &str) -> Result<&Array> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            other => Err(type_mismatch(key, "array", other)),
        }
    }

    fn require(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| Error::format(format!("metadata key {key:?}"), "key is missing"))
    }
}

fn type_mismatch(key: &str, expected: &str, found: &Value) -> Error {
    let found_desc = match found.as_integer() {
        Some(v) => format!("{} {v}", found.value_type()),
        None => found.value_type().name().to_owned(),
    };
    Error::format(
        format!("metadata key {key:?}"),
        format!("expected {expected}, found {found_desc}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_in_place_and_keeps_order() {
        let mut m = Metadata::new();
        m.set("a", 1u32);
        m.set("b", "two");
        m.set("a", 3u64);
        let keys: Vec<&str> = m.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(m.get("a"), Some(&Value::U64(3)));
        assert!(!m.insert_new("b".into(), Value::Bool(true)));
        assert_eq!(m.get_str("b").unwrap(), "two");
    }

    #[test]
    fn getter_errors_name_the_key_and_the_type_found() {
        let mut m = Metadata::new();
        m.set("llama.block_count", "32");
        m.set("llama.context_length", -4i32);
        let err = m.get_u32("llama.block_count").unwrap_err().to_string();
        assert!(err.contains("\"llama.block_count\""), "{err}");
        assert!(err.contains("expected u32, found string"), "{err}");
        let err = m.get_u32("llama.context_length").unwrap_err().to_string();
        assert!(err.contains("found i32 -4"), "{err}");
        let err = m.get_f32("missing.key").unwrap_err().to_string();
        assert!(
            err.contains("\"missing.key\"") && err.contains("missing"),
            "{err}"
        );
        let err = m.get_array("llama.block_count").unwrap_err().to_string();
        assert!(err.contains("expected array"), "{err}");
    }
}
