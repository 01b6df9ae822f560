//! Server-sent events framing: encoding `data:` events and an incremental
//! decoder that turns a byte stream split at arbitrary points into events.

/// The terminal event of an OpenAI stream.
pub const DONE: &str = "[DONE]";

/// Frames one `data:` event. Payloads with newlines are split across
/// several `data:` lines, as the SSE specification requires.
pub fn encode_data(payload: &str) -> String {
    let mut out = String::with_capacity(payload.len() + 8);
    for line in payload.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// Incremental SSE decoder: feed it chunks, collect complete event payloads
/// (the `data:` lines of each event joined by newlines).
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of a line not complete yet.
    buf: Vec<u8>,
    /// The `data:` lines of the event being read, joined by newlines.
    data: Option<String>,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes and returns the payloads of every event they complete.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(len) = self.buf[start..].iter().position(|b| *b == b'\n') {
            let mut line = &self.buf[start..start + len];
            start += len + 1;
            if let Some(l) = line.strip_suffix(b"\r") {
                line = l;
            }
            if line.is_empty() {
                events.extend(self.data.take());
                continue;
            }
            if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                // Valid UTF-8 (all but broken upstreams) takes the validator's
                // fast ASCII path; `from_utf8_lossy` walks chunk by chunk.
                let rest = match std::str::from_utf8(rest) {
                    Ok(s) => std::borrow::Cow::Borrowed(s),
                    Err(_) => String::from_utf8_lossy(rest),
                };
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&rest);
                    }
                    None => self.data = Some(rest.into_owned()),
                }
            }
            // Comments (":") and other fields (event:, id:, retry:) are ignored.
        }
        self.buf.drain(..start);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_single_and_multiline() {
        assert_eq!(encode_data("{}"), "data: {}\n\n");
        assert_eq!(encode_data("a\nb"), "data: a\ndata: b\n\n");
    }

    #[test]
    fn decoder_handles_arbitrary_splits() {
        let stream = format!(
            "{}: keepalive\n\n{}{}",
            encode_data(r#"{"a":1}"#),
            encode_data("x\ny"),
            encode_data(DONE)
        );
        for split in 1..stream.len() {
            let mut d = SseDecoder::new();
            let (a, b) = stream.as_bytes().split_at(split);
            let mut ev = d.feed(a);
            ev.extend(d.feed(b));
            assert_eq!(ev, vec![r#"{"a":1}"#, "x\ny", DONE], "split at {split}");
        }
    }

    #[test]
    fn decoder_accepts_crlf_and_no_space() {
        let mut d = SseDecoder::new();
        assert_eq!(d.feed(b"data:1\r\n\r\n"), vec!["1"]);
    }

    #[test]
    fn decoder_keeps_invalid_utf8_as_replacement_and_empty_data_lines() {
        let mut d = SseDecoder::new();
        assert_eq!(d.feed(b"data: a\xff\ndata:\n\n"), vec!["a\u{fffd}\n"]);
        // A blank line with no data lines before it is no event.
        assert!(d.feed(b"\n\n").is_empty());
    }
}
