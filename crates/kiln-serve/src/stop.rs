//! Stop strings over streamed text: text that might be the start of a stop string is
//! held back until it is known not to be one.

/// Text released by [`StopMatcher::push`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Text that is certainly before any stop string.
    pub text: String,
    /// Whether a stop string matched: generation ends, and `text` is everything
    /// before it.
    pub stopped: bool,
}

/// Finds the first occurrence of any of a set of stop strings in text that arrives in
/// pieces.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// A matcher for `stops`, which must not be empty strings (an empty one would
    /// match before any text).
    pub fn new(stops: Vec<String>) -> Self {
        debug_assert!(stops.iter().all(|s| !s.is_empty()));
        StopMatcher {
            stops,
            held: String::new(),
        }
    }

    /// Adds `piece`. Returns the text that can be released: everything up to the
    /// earliest stop string when one is now complete, else everything but the longest
    /// tail that is the start of some stop string.
    pub fn push(&mut self, piece: &str) -> Released {
        self.held.push_str(piece);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.held.truncate(at);
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.partial_tail();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Released {
            text,
            stopped: false,
        }
    }

    /// The held-back text, at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes of the longest suffix of the held text that is a proper prefix of a stop
    /// string (starting at a character boundary).
    fn partial_tail(&self) -> usize {
        let held = self.held.as_str();
        self.stops
            .iter()
            .flat_map(|stop| {
                (1..stop.len().min(held.len() + 1))
                    .rev()
                    .filter(|&n| held.is_char_boundary(held.len() - n))
                    .find(|&n| stop.starts_with(&held[held.len() - n..]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let r = m.push(p);
            out.push(r.text);
            if r.stopped {
                return (out, true, String::new());
            }
        }
        (out, false, m.flush())
    }

    #[test]
    fn a_stop_string_split_over_pieces_is_held_then_cut() {
        let (out, stopped, _) = run(&["END"], &["abc E", "N", "D tail"]);
        assert_eq!(out, ["abc ", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn a_false_start_is_released_once_it_cannot_match() {
        let (out, stopped, rest) = run(&["END"], &["xE", "Nd", "!"]);
        assert_eq!(out, ["x", "ENd", "!"]);
        assert!(!stopped);
        assert_eq!(rest, "");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["world", "lo w"], &["hello world"]);
        assert_eq!(out, ["hel"]);
        assert!(stopped);
    }

    #[test]
    fn held_text_is_flushed_at_the_end() {
        let (out, stopped, rest) = run(&["\n\n"], &["line\n"]);
        assert_eq!(out, ["line"]);
        assert!(!stopped);
        assert_eq!(rest, "\n");
    }

    #[test]
    fn multibyte_text_is_cut_at_character_boundaries() {
        // "é" is two bytes: text ending in it is held back whole while "éa" may follow.
        let (out, stopped, rest) = run(&["éa"], &["café", "b"]);
        assert_eq!(out, ["caf", "éb"]);
        assert!(!stopped);
        assert_eq!(rest, "");
        let (out, stopped, _) = run(&["éa"], &["café", "a!"]);
        assert_eq!(out, ["caf", ""]);
        assert!(stopped);
    }

    #[test]
    fn no_stops_release_everything() {
        let (out, stopped, rest) = run(&[], &["a", "b"]);
        assert_eq!(out, ["a", "b"]);
        assert!(!stopped && rest.is_empty());
    }
}
