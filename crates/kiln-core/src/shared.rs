//! Bytes shared by everything that points into them.

use std::ops::Range;
use std::sync::Arc;

/// Bytes shared by everything that points into them: a file's memory map or a
/// buffer, and a range of it. Cloning one shares the bytes, never copies them.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    end: usize,
}

impl SharedBytes {
    /// All of `owner`'s bytes (a memory map, a `Vec<u8>`, ...), shared from now on.
    pub fn new(owner: impl AsRef<[u8]> + Send + Sync + 'static) -> SharedBytes {
        let end = owner.as_ref().len();
        SharedBytes {
            owner: Arc::new(owner),
            start: 0,
            end,
        }
    }

    /// The bytes of `range` within these, sharing them; `None` when `range` does not
    /// lie within them.
    pub fn slice(&self, range: Range<usize>) -> Option<SharedBytes> {
        if range.start > range.end || range.end > self.end - self.start {
            return None;
        }
        Some(SharedBytes {
            owner: Arc::clone(&self.owner),
            start: self.start + range.start,
            end: self.start + range.end,
        })
    }
}

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        // `start..end` lies within the owner's bytes (checked when it was made),
        // which cannot change behind the `Arc`.
        &AsRef::<[u8]>::as_ref(&*self.owner)[self.start..self.end]
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBytes({} bytes)", self.end - self.start)
    }
}
