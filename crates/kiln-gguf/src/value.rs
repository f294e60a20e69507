//! GGUF metadata values: the thirteen value types and typed access to them.

use kiln_core::{Error, Result, SharedBytes};

/// The type id a GGUF file stores before each metadata value (and before the items of
/// an array).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    /// Every value type, in id order (the id is the index).
    const BY_ID: [ValueType; 13] = [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::F32,
        ValueType::Bool,
        ValueType::String,
        ValueType::Array,
        ValueType::U64,
        ValueType::I64,
        ValueType::F64,
    ];

    /// The value type a GGUF type id names, if any.
    pub fn from_id(id: u32) -> Option<ValueType> {
        Self::BY_ID.get(usize::try_from(id).ok()?).copied()
    }

    /// The type id GGUF stores for this type.
    pub const fn id(self) -> u32 {
        self as u32
    }

    /// Lower-case name used in messages (`u32`, `string`, `array`).
    pub const fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        }
    }

    /// The bytes every value of this type occupies in a file, for the fixed-size
    /// types; `None` for strings and arrays.
    pub const fn fixed_len(self) -> Option<usize> {
        match self {
            ValueType::String | ValueType::Array => None,
            other => Some(other.min_encoded_len()),
        }
    }

    /// The fewest bytes one value of this type occupies in a file: its size for
    /// fixed-size types, the 8-byte length of an empty string, the 4-byte item type
    /// plus 8-byte count of an empty array.
    pub const fn min_encoded_len(self) -> usize {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

impl std::fmt::Display for ValueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// This value's GGUF type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// How many arrays deep this value is: 0 for a scalar or string, 1 for an array
    /// of scalars, 2 for an array of arrays of scalars, ...
    pub fn array_nesting(&self) -> usize {
        match self {
            Value::Array(a) if a.item_type() != ValueType::Array => 1,
            Value::Array(a) => 1 + a.iter().map(|v| v.array_nesting()).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// The value of any integer variant, widened; `None` for other variants.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }
}

/// A GGUF array: items of one type, which may itself be `Array` (each inner array
/// then has its own item type).
///
/// An array holds its items as the file encodes them, not as [`Value`]s: an array
/// read from a memory-mapped file is a view of the map, and one built in memory is
/// one buffer. Items are decoded when they are read ([`Array::iter`],
/// [`Array::get`]), so a file's large arrays cost no memory until they are used,
/// and only what is used. Cloning shares the items.
#[derive(Clone)]
pub struct Array {
    item_type: ValueType,
    len: usize,
    /// The items as GGUF encodes them (each string after its u64 length, each inner
    /// array after its item type and count), checked when the array was made.
    encoded: SharedBytes,
}

impl Array {
    /// An array of `items`, each of which must have type `item_type`.
    pub fn new(item_type: ValueType, items: Vec<Value>) -> Result<Array> {
        if let Some((i, bad)) = items
            .iter()
            .enumerate()
            .find(|(_, v)| v.value_type() != item_type)
        {
            return Err(Error::invalid(
                "gguf array",
                format!(
                    "item {i} is a {}, but the array's item type is {item_type}",
                    bad.value_type()
                ),
            ));
        }
        let mut encoded = Vec::new();
        for item in &items {
            encode_value(&mut encoded, item);
        }
        Ok(Array {
            item_type,
            len: items.len(),
            encoded: SharedBytes::new(encoded),
        })
    }

    /// An array of `len` items of `item_type` encoded in `encoded`, which the caller
    /// has checked: every item complete, strings UTF-8, bools 0 or 1, inner arrays
    /// of known item types and nested at most [`crate::MAX_ARRAY_NESTING`] deep.
    pub(crate) fn from_checked(item_type: ValueType, len: usize, encoded: SharedBytes) -> Array {
        Array {
            item_type,
            len,
            encoded,
        }
    }

    /// The type every item has.
    pub fn item_type(&self) -> ValueType {
        self.item_type
    }

    /// The items, decoded one by one, in file order.
    pub fn iter(&self) -> Items<'_> {
        Items {
            array: self,
            pos: 0,
            left: self.len,
        }
    }

    /// Item `i`, decoded; `None` past the end. Immediate for items of fixed size;
    /// strings and arrays are found by reading past the `i` before them.
    pub fn get(&self, i: usize) -> Option<Value> {
        if i >= self.len {
            return None;
        }
        match self.item_type.fixed_len() {
            Some(size) => decode(self.item_type, &self.encoded, &mut (i * size)),
            None => self.iter().nth(i),
        }
    }

    /// The number of items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the array has no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The items' bytes as GGUF stores them after the item type and count.
    pub(crate) fn encoded(&self) -> &[u8] {
        self.encoded.as_ref()
    }
}

impl PartialEq for Array {
    /// Arrays are equal when their item types and items are (floats compare as
    /// floats: NaN items make arrays unequal, as they make [`Value`]s unequal).
    fn eq(&self, other: &Array) -> bool {
        self.item_type == other.item_type && self.len == other.len && self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for Array {
    /// The item type, the length and the first items (all of them for short arrays).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 8;
        struct Preview<'a>(&'a Array);
        impl std::fmt::Debug for Preview<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut list = f.debug_list();
                list.entries(self.0.iter().take(SHOWN));
                if self.0.len > SHOWN {
                    list.entry(&format_args!("... {} more", self.0.len - SHOWN));
                }
                list.finish()
            }
        }
        f.debug_struct("Array")
            .field("item_type", &self.item_type)
            .field("len", &self.len)
            .field("items", &Preview(self))
            .finish()
    }
}

impl<'a> IntoIterator for &'a Array {
    type Item = Value;
    type IntoIter = Items<'a>;
    fn into_iter(self) -> Items<'a> {
        self.iter()
    }
}

/// The items of an [`Array`], decoded as they are reached.
#[derive(Clone, Debug)]
pub struct Items<'a> {
    array: &'a Array,
    /// Offset of the next item in the array's encoded bytes.
    pos: usize,
    left: usize,
}

impl Iterator for Items<'_> {
    type Item = Value;

    fn next(&mut self) -> Option<Value> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let value = decode(self.array.item_type, &self.array.encoded, &mut self.pos);
        if value.is_none() {
            // Unreachable for checked bytes; end rather than yield garbage.
            self.left = 0;
        }
        value
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }

    fn nth(&mut self, n: usize) -> Option<Value> {
        if n >= self.left {
            self.left = 0;
            return None;
        }
        let item_type = self.array.item_type;
        let bytes = self.array.encoded.as_ref();
        for _ in 0..n {
            if skip(item_type, bytes, &mut self.pos).is_none() {
                self.left = 0;
                return None;
            }
        }
        self.left -= n;
        self.next()
    }
}

impl ExactSizeIterator for Items<'_> {}

/// Appends `value`'s GGUF encoding (without its type id) to `buf`.
pub(crate) fn encode_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I8(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => buf.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => buf.push(u8::from(*v)),
        Value::String(s) => {
            buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
            buf.extend_from_slice(s.as_bytes());
        }
        Value::Array(a) => {
            buf.extend_from_slice(&a.item_type.id().to_le_bytes());
            buf.extend_from_slice(&(a.len as u64).to_le_bytes());
            buf.extend_from_slice(a.encoded());
        }
    }
}

/// `n` bytes of `bytes` at `*pos`, moving `*pos` past them.
fn take<'b>(bytes: &'b [u8], pos: &mut usize, n: usize) -> Option<&'b [u8]> {
    let out = bytes.get(*pos..pos.checked_add(n)?)?;
    *pos += n;
    Some(out)
}

fn take_array<const N: usize>(bytes: &[u8], pos: &mut usize) -> Option<[u8; N]> {
    take(bytes, pos, N)?.try_into().ok()
}

/// A u64 length or count at `*pos`, as a `usize`.
fn take_len(bytes: &[u8], pos: &mut usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(take_array(bytes, pos)?)).ok()
}

/// Decodes the value of type `t` at `*pos` in checked bytes and moves past it;
/// `None` only if the bytes are not what they were checked to be.
fn decode(t: ValueType, shared: &SharedBytes, pos: &mut usize) -> Option<Value> {
    let bytes = shared.as_ref();
    Some(match t {
        ValueType::U8 => Value::U8(u8::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::I8 => Value::I8(i8::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(take_array(bytes, pos)?)),
        ValueType::Bool => Value::Bool(take_array::<1>(bytes, pos)?[0] != 0),
        ValueType::String => {
            let len = take_len(bytes, pos)?;
            Value::String(std::str::from_utf8(take(bytes, pos, len)?).ok()?.to_owned())
        }
        ValueType::Array => {
            let item_type = ValueType::from_id(u32::from_le_bytes(take_array(bytes, pos)?))?;
            let len = take_len(bytes, pos)?;
            let start = *pos;
            skip_items(item_type, len, bytes, pos)?;
            Value::Array(Array::from_checked(
                item_type,
                len,
                shared.slice(start..*pos)?,
            ))
        }
    })
}

/// Moves `*pos` past one value of type `t` in checked bytes.
fn skip(t: ValueType, bytes: &[u8], pos: &mut usize) -> Option<()> {
    match t.fixed_len() {
        Some(size) => take(bytes, pos, size).map(drop),
        None if t == ValueType::String => {
            let len = take_len(bytes, pos)?;
            take(bytes, pos, len).map(drop)
        }
        None => {
            let item_type = ValueType::from_id(u32::from_le_bytes(take_array(bytes, pos)?))?;
            let len = take_len(bytes, pos)?;
            skip_items(item_type, len, bytes, pos)
        }
    }
}

/// Moves `*pos` past `len` values of type `t` in checked bytes: at once for items
/// of fixed size.
fn skip_items(t: ValueType, len: usize, bytes: &[u8], pos: &mut usize) -> Option<()> {
    match t.fixed_len() {
        Some(size) => take(bytes, pos, len.checked_mul(size)?).map(drop),
        None => (0..len).try_for_each(|_| skip(t, bytes, pos)),
    }
}

/// A Rust type that maps to one GGUF value type, for building values and for the
/// typed getters of [`crate::Metadata`].
pub trait MetadataType: Sized {
    /// The GGUF type values of this Rust type are stored as.
    const VALUE_TYPE: ValueType;
    /// Wraps `self` as a [`Value`].
    fn into_value(self) -> Value;
    /// Reads a `Self` out of `value`: exactly for floats, bools and strings; for
    /// integers, from any integer variant whose value `Self` holds without loss.
    fn from_value(value: &Value) -> Option<Self>;
}

macro_rules! integer_metadata_type {
    ($($rust:ty => $variant:ident),* $(,)?) => {$(
        impl MetadataType for $rust {
            const VALUE_TYPE: ValueType = ValueType::$variant;
            fn into_value(self) -> Value {
                Value::$variant(self)
            }
            fn from_value(value: &Value) -> Option<Self> {
                value.as_integer().and_then(|v| <$rust>::try_from(v).ok())
            }
        }
    )*};
}

integer_metadata_type!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, u64 => U64, i64 => I64);

macro_rules! exact_metadata_type {
    ($($rust:ty => $variant:ident),* $(,)?) => {$(
        impl MetadataType for $rust {
            const VALUE_TYPE: ValueType = ValueType::$variant;
            fn into_value(self) -> Value {
                Value::$variant(self)
            }
            fn from_value(value: &Value) -> Option<Self> {
                match value {
                    Value::$variant(v) => Some(v.clone()),
                    _ => None,
                }
            }
        }
    )*};
}

exact_metadata_type!(f32 => F32, f64 => F64, bool => Bool, String => String);

impl<T: MetadataType> From<T> for Value {
    fn from(v: T) -> Value {
        v.into_value()
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_owned())
    }
}

impl From<Array> for Value {
    fn from(a: Array) -> Value {
        Value::Array(a)
    }
}

impl<T: MetadataType> From<Vec<T>> for Value {
    /// An array of `T::VALUE_TYPE` items.
    fn from(items: Vec<T>) -> Value {
        let len = items.len();
        let mut encoded = Vec::new();
        for item in items {
            encode_value(&mut encoded, &item.into_value());
        }
        Value::Array(Array::from_checked(
            T::VALUE_TYPE,
            len,
            SharedBytes::new(encoded),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_match_the_gguf_specification() {
        let spec = [
            (0, "u8"),
            (1, "i8"),
            (2, "u16"),
            (3, "i16"),
            (4, "u32"),
            (5, "i32"),
            (6, "f32"),
            (7, "bool"),
            (8, "string"),
            (9, "array"),
            (10, "u64"),
            (11, "i64"),
            (12, "f64"),
        ];
        for (id, name) in spec {
            let t = ValueType::from_id(id).unwrap();
            assert_eq!((t.id(), t.name()), (id, name));
        }
        assert_eq!(ValueType::from_id(13), None);
        assert_eq!(ValueType::from_id(u32::MAX), None);
    }

    #[test]
    fn integers_convert_only_without_loss() {
        assert_eq!(u32::from_value(&Value::U8(7)), Some(7));
        assert_eq!(u32::from_value(&Value::I64(1 << 40)), None);
        assert_eq!(u32::from_value(&Value::I32(-1)), None);
        assert_eq!(i8::from_value(&Value::U64(127)), Some(127));
        assert_eq!(u32::from_value(&Value::F32(3.0)), None);
        assert_eq!(f32::from_value(&Value::F64(3.0)), None);
    }

    #[test]
    fn array_new_rejects_mixed_items() {
        let err = Array::new(ValueType::U32, vec![Value::U32(1), Value::I32(2)]).unwrap_err();
        assert!(err.to_string().contains("item 1 is a i32"), "{err}");
        let ok = Array::new(ValueType::U32, vec![Value::U32(1)]).unwrap();
        assert_eq!(ok.len(), 1);
    }
}
