//! Property-based fuzzing of loadgen's parsers: the SSE parser (any bytes, split anywhere,
//! give the same result as in one piece, never a panic), the HTTP/1.1 response reader (a
//! real socket from a server answering arbitrary bytes: an outcome, never a panic or a hang)
//! and the epoll send loop's whole-response check (the same end whatever the reads).
//! CI runs few cases; `scripts/fuzz.sh` runs many.

use bytes::Bytes;
use loadgen::http1::{complete_response, request_bytes, Client};
use loadgen::sse::SseParser;
use proptest::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// SSE-shaped bytes: events built from plausible lines, with random bytes mixed in.
fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        Just(b"data: {\"choices\": [{\"text\": \"a\"}]}".to_vec()),
        Just(b"data: {\"choices\": [{\"delta\": {\"content\": \"b\"}}]}".to_vec()),
        Just(b"data: {\"usage\": {\"completion_tokens\": 7}}".to_vec()),
        Just(b"data: {\"error\": {\"message\": \"x\"}}".to_vec()),
        Just(b"data: [DONE]".to_vec()),
        Just(b": comment".to_vec()),
        Just(b"event: x".to_vec()),
        prop::collection::vec(any::<u8>(), 0..24),
    ];
    let sep = prop_oneof![
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n\n".to_vec())
    ];
    prop::collection::vec((line, sep), 0..12).prop_map(|v| {
        v.into_iter()
            .flat_map(|(l, s)| l.into_iter().chain(s))
            .collect()
    })
}

fn http_response() -> impl Strategy<Value = Vec<u8>> {
    let status = prop_oneof![
        Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
        Just(b"HTTP/1.1 503 Busy\r\n".to_vec()),
        Just(b"HTTP/1.0 200 OK\r\n".to_vec()),
        Just(b"HTTP/1.1 20".to_vec()),
        prop::collection::vec(any::<u8>(), 0..16),
    ];
    let header = prop_oneof![
        Just(b"Content-Length: 5\r\n".to_vec()),
        Just(b"Content-Length: 99999999999999999999\r\n".to_vec()),
        Just(b"Content-Length: -1\r\n".to_vec()),
        Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
        Just(b"Connection: close\r\n".to_vec()),
        Just(b"X: \xff\xfe\r\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..16),
    ];
    let body = prop_oneof![
        Just(b"hello".to_vec()),
        Just(b"5\r\nhello\r\n0\r\n\r\n".to_vec()),
        Just(b"zz\r\nhello\r\n".to_vec()),
        Just(b"ffffffffffffffffffff\r\n".to_vec()),
        Just(b"1a\r\ndata: [DONE]\n\n\r\n0\r\n\r\n".to_vec()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    (
        status,
        prop::collection::vec(header, 0..4),
        prop::option::of(Just(b"\r\n".to_vec())),
        body,
    )
        .prop_map(|(s, h, end, b)| {
            let mut out = s;
            h.into_iter().for_each(|h| out.extend(h));
            out.extend(end.unwrap_or_default());
            out.extend(b);
            out
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn sse_parsing_is_the_same_whatever_the_split(bytes in sse_bytes(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6)) {
        let mut whole = SseParser::default();
        let n_whole = whole.feed(&bytes);
        let mut split = SseParser::default();
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        at.sort();
        let (mut n_split, mut from) = (0, 0);
        for to in at.into_iter().chain([bytes.len()]) {
            n_split += split.feed(&bytes[from..to]);
            from = to;
        }
        prop_assert_eq!(n_whole, n_split);
        prop_assert_eq!(whole.completion_tokens, split.completion_tokens);
        prop_assert_eq!((whole.done, whole.error), (split.done, split.error));
    }

    /// The epoll send loop's check for a whole response, on any bytes: never a panic, and
    /// where the bytes hold a whole response of length L, every shorter prefix is "not yet"
    /// (so a response read in pieces ends at the same byte as one read at once).
    #[test]
    fn a_whole_response_is_found_at_the_same_byte_whatever_the_reads(bytes in http_response(), eof in any::<bool>()) {
        let full = complete_response(&bytes, eof);
        if let Ok(Some(c)) = full {
            prop_assert!(c.len <= bytes.len());
            for cut in 0..c.len {
                prop_assert_eq!(complete_response(&bytes[..cut], false), Ok(None), "cut {}", cut);
            }
            if !eof {
                prop_assert_eq!(complete_response(&bytes[..c.len], false), full);
            }
        }
    }
}

#[test]
fn the_response_reader_survives_any_bytes() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // One listener for the whole run (binding one per case exhausts the host's ports in a
    // long run); each case's response is what the next accepted connection gets.
    let next: Arc<Mutex<Vec<u8>>> = Arc::default();
    let addr = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let next = next.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let resp = next.lock().unwrap().clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(&resp).await;
                });
            }
        });
        addr
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases()));
    runner
        .run(&(http_response(), any::<bool>()), |(resp, stream)| {
            *next.lock().unwrap() = resp;
            rt.block_on(async {
                let client = Client::new(addr);
                let req: Bytes = request_bytes("/v1/completions", "x", &[], b"{}");
                // The reader ends (an exchange or an error) once the server closes; the
                // timeout only guards the test against a hang, which would be a failure.
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.exchange(&req, Instant::now(), stream),
                )
                .await;
                prop_assert!(r.is_ok(), "the reader hung");
                Ok(())
            })
        })
        .unwrap();
}
