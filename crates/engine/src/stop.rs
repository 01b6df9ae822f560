//! Text assembly for streamed generation: UTF-8 reassembly of token bytes
//! and stop-sequence matching that never emits text a stop string could
//! still swallow.

/// Collects token bytes and releases the longest valid UTF-8 prefix, so a
/// multi-byte character split across tokens is never emitted broken.
#[derive(Debug, Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // An invalid (not merely incomplete) sequence is replaced.
                let cut = if e.error_len().is_some() {
                    self.pending.len()
                } else {
                    valid
                };
                let head: Vec<u8> = self.pending.drain(..cut).collect();
                String::from_utf8_lossy(&head).into_owned()
            }
        }
    }

    /// Whatever is left at the end (lossily decoded).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Matches stop sequences over a stream of text pieces.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// Result of feeding text to a [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub struct StopStep {
    /// Text safe to emit now.
    pub emit: String,
    /// A stop sequence matched: generation must end after `emit`.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopStep {
        if self.stops.is_empty() {
            return StopStep {
                emit: text.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(text);
        // Earliest full match wins.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return StopStep {
                emit,
                stopped: true,
            };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > keep && self.held.ends_with(&s[..i]) {
                    keep = i;
                }
            }
        }
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        StopStep {
            emit,
            stopped: false,
        }
    }

    /// Releases held-back text when generation ends without a match.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_tokens() {
        let mut a = Utf8Assembler::default();
        let bytes = "é€".as_bytes();
        assert_eq!(a.push(&bytes[..1]), "");
        assert_eq!(a.push(&bytes[1..3]), "é");
        assert_eq!(a.push(&bytes[3..]), "€");
        assert_eq!(a.finish(), "");
        assert_eq!(a.push(&[0xff, b'a']), "\u{fffd}a");
    }

    #[test]
    fn stop_across_pieces() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E").emit, "hello ");
        let s = m.push("NDING");
        assert_eq!(
            s,
            StopStep {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn held_text_released_when_no_match() {
        let mut m = StopMatcher::new(vec!["\n\n".into()]);
        assert_eq!(m.push("a\n").emit, "a");
        assert_eq!(m.push("b").emit, "\nb");
        assert_eq!(m.push("\n").emit, "");
        assert_eq!(m.finish(), "\n");
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("x").emit, "x");
    }

    #[test]
    fn earliest_match_wins() {
        let mut m = StopMatcher::new(vec!["c".into(), "ab".into()]);
        let s = m.push("xabc");
        assert_eq!(s.emit, "x");
        assert!(s.stopped);
    }
}
