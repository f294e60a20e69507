//! GPT-2's byte-level alphabet, in which `tokenizer.ggml.model = "gpt2"` vocabularies
//! spell their tokens: every byte is one printable character.

/// Whether byte `b` stands for itself in [`BYTE_CHARS`].
pub const fn is_printable_byte(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The number of bytes that do not stand for themselves.
pub const N_SHIFTED_BYTES: usize = 68;

/// GPT-2's byte-to-character map: a printable byte is its own character, the n-th
/// other byte (in byte order) is U+0100 + n.
pub const BYTE_CHARS: [char; 256] = byte_chars();

/// The bytes that map to U+0100, U+0101, ... in [`BYTE_CHARS`].
const SHIFTED_BYTES: [u8; N_SHIFTED_BYTES] = shifted_bytes();

const fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let code = if is_printable_byte(b as u8) {
            b as u32
        } else {
            shifted += 1;
            0xFF + shifted
        };
        table[b] = match char::from_u32(code) {
            Some(c) => c,
            None => panic!("U+0000..U+0143 are all characters"),
        };
        b += 1;
    }
    table
}

const fn shifted_bytes() -> [u8; N_SHIFTED_BYTES] {
    let mut table = [0u8; N_SHIFTED_BYTES];
    let mut n = 0;
    let mut b = 0usize;
    while b < 256 {
        if !is_printable_byte(b as u8) {
            table[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    table
}

/// The byte that `c` stands for in GPT-2's map, if any.
pub fn char_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    if code < 256 && is_printable_byte(code as u8) {
        return Some(code as u8);
    }
    let shifted = code.checked_sub(0x100)? as usize;
    SHIFTED_BYTES.get(shifted).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_round_trips_and_space_is_g_dot() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(BYTE_CHARS[b as usize]), Some(b));
        }
        assert_eq!(BYTE_CHARS[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_CHARS[b'\n' as usize], 'Ċ');
        assert_eq!(BYTE_CHARS[b'a' as usize], 'a');
        assert_eq!(BYTE_CHARS[0], '\u{100}');
        assert_eq!(BYTE_CHARS[0x7F], '\u{121}');
        assert_eq!(BYTE_CHARS[0xAD], '\u{143}');
        assert_eq!(BYTE_CHARS[0xE9], 'é');
        assert_eq!(char_to_byte('\u{144}'), None);
        assert_eq!(char_to_byte(' '), None);
    }
}
