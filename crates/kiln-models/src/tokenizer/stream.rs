//! Incremental detokenization for streaming output.

use super::{TokenId, Tokenizer};

/// Turns generated token ids into text as they arrive, emitting text only at UTF-8
/// character boundaries: a character whose bytes span several tokens (byte tokens,
/// byte-level pieces of an emoji) is held back until it is complete. Pieces are
/// those of [`Tokenizer::token_to_piece`] without special tokens' texts (what
/// llama.cpp's CLI prints); bytes that can never form a character are emitted as
/// U+FFFD as soon as that is known.
#[derive(Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    render_special: bool,
    pending: Vec<u8>,
}

impl<'t> StreamDecoder<'t> {
    /// A decoder over `tokenizer`; `render_special` makes control tokens print their
    /// text (llama.cpp's `--special`).
    pub fn new(tokenizer: &'t Tokenizer, render_special: bool) -> StreamDecoder<'t> {
        StreamDecoder {
            tokenizer,
            render_special,
            pending: Vec::new(),
        }
    }

    /// Adds token `id`; returns the text that became complete, if any.
    pub fn push(&mut self, id: TokenId) -> Option<String> {
        let piece = self.tokenizer.token_to_piece(id, self.render_special);
        self.pending.extend_from_slice(piece);
        self.take_complete()
    }

    /// Returns whatever is still held back (an incomplete character at the end of
    /// generation, as U+FFFD), leaving the decoder empty.
    pub fn flush(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        (!rest.is_empty()).then(|| String::from_utf8_lossy(&rest).into_owned())
    }

    /// Removes and returns the longest prefix of the pending bytes that is complete:
    /// valid UTF-8, with invalid sequences replaced by U+FFFD; only a truncated
    /// character at the very end stays pending.
    fn take_complete(&mut self) -> Option<String> {
        let mut text = String::new();
        let mut done = 0;
        while done < self.pending.len() {
            match std::str::from_utf8(&self.pending[done..]) {
                Ok(valid) => {
                    text.push_str(valid);
                    done = self.pending.len();
                }
                Err(e) => {
                    let valid_end = done + e.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&self.pending[done..valid_end]));
                    match e.error_len() {
                        Some(invalid) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            done = valid_end + invalid;
                        }
                        None => {
                            done = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..done);
        (!text.is_empty()).then_some(text)
    }
}
