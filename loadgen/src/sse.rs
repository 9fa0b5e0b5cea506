//! Server-sent events of OpenAI-style streaming generation, parsed as bytes arrive: which
//! events carry output text (the token times TTFT and inter-token latency are measured at), the
//! final `usage` (output tokens), and `[DONE]`.
//!
//! Socket reads are not tokens: one read can hold several events and one event can span reads,
//! so timing by reads (what a byte-level client sees) would misstate both TTFT and ITL.

/// Incremental SSE parser: feed body bytes in arrival order.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    /// Events that carried output text.
    pub text_events: usize,
    /// `usage.completion_tokens` from the last event that had it.
    pub completion_tokens: Option<u64>,
    /// `data: [DONE]` seen.
    pub done: bool,
    /// An `{"error": …}` event seen.
    pub error: bool,
}

impl SseParser {
    /// Consumes `bytes`; returns how many text-carrying events completed in them.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        self.buf.extend_from_slice(bytes);
        let mut found = 0;
        // Events end with a blank line; tolerate CRLF framing too.
        while let Some((end, sep)) = event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            if self.event(&event[..end]) {
                found += 1;
            }
        }
        found
    }

    /// Handles one event's lines; true when it carried output text.
    fn event(&mut self, ev: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(ev) else {
            return false;
        };
        let data: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect::<Vec<_>>()
            .join("\n");
        if data.trim() == "[DONE]" {
            self.done = true;
            return false;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else {
            return false;
        };
        if v.get("error").is_some_and(|e| !e.is_null()) {
            self.error = true;
        }
        if let Some(n) = v
            .get("usage")
            .and_then(|u| u.get("completion_tokens"))
            .and_then(|n| n.as_u64())
        {
            self.completion_tokens = Some(n);
        }
        let carries = v
            .get("choices")
            .and_then(|c| c.as_array())
            .is_some_and(|choices| {
                choices.iter().any(|c| {
                    let t = c
                        .get("text")
                        .or_else(|| c.get("delta").and_then(|d| d.get("content")));
                    t.and_then(|t| t.as_str()).is_some_and(|s| !s.is_empty())
                })
            });
        if carries {
            self.text_events += 1;
        }
        carries
    }
}

fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_and_packed_in_one_are_counted_once_each() {
        let mut p = SseParser::default();
        let a = r#"data: {"choices":[{"index":0,"text":" Par"}]}"#;
        let b = r#"data: {"choices":[{"index":0,"delta":{"content":"is"}}]}"#;
        let empty = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#;
        let usage = r#"data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        let all = format!("{a}\n\n{b}\n\n{empty}\n\n{usage}\n\ndata: [DONE]\n\n");
        let bytes = all.as_bytes();
        assert_eq!(p.feed(&bytes[..10]), 0);
        assert_eq!(p.feed(&bytes[10..a.len() + 2]), 1);
        assert_eq!(p.feed(&bytes[a.len() + 2..]), 1);
        assert_eq!(p.text_events, 2);
        assert_eq!(p.completion_tokens, Some(2));
        assert!(p.done && !p.error);
        let mut q = SseParser::default();
        assert_eq!(
            q.feed(b"data: {\"error\": {\"message\": \"boom\"}}\r\n\r\n"),
            0
        );
        assert!(q.error);
    }
}
