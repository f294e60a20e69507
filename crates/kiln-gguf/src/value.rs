//! GGUF metadata values: the thirteen value types and typed access to them.

use kiln_core::{Error, Result};

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
            Value::Array(a) => 1 + a.items.iter().map(Value::array_nesting).max().unwrap_or(0),
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
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    item_type: ValueType,
    items: Vec<Value>,
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
        Ok(Array { item_type, items })
    }

    /// The type every item has.
    pub fn item_type(&self) -> ValueType {
        self.item_type
    }

    /// The items, in file order.
    pub fn items(&self) -> &[Value] {
        &self.items
    }

    /// The number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the array has no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
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
        Value::Array(Array {
            item_type: T::VALUE_TYPE,
            items: items.into_iter().map(MetadataType::into_value).collect(),
        })
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
