//! A lean HTTP/1.1 client for the send path: each request's bytes (head and body) are built once
//! before the run, connections are plain `TcpStream`s kept in a stack of idle ones, and a response
//! is parsed only as far as timing needs (status, length or chunks). A general client spends most
//! of its per-request CPU on things a load generator does not need (header maps, pool keys,
//! per-request futures), and that CPU is the ceiling of an open loop on one core.
//!
//! Opens a new connection whenever none is idle, so the open loop is never capped by a pool.

use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What went wrong with one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeError {
    /// The TCP connect failed.
    Connect,
    /// The connection broke or the response was malformed.
    Io,
}

/// A response, as far as timing needs it.
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    /// Status code.
    pub status: u16,
    /// Streaming workloads: time from the send to each SSE event that carried output text.
    pub token_times: Vec<Duration>,
    /// Streaming workloads: output tokens, from the final `usage` when the server sent one.
    pub usage_tokens: Option<u64>,
    /// Streaming workloads: an `{"error": …}` event arrived. The status (200) was sent before
    /// the generation failed, so this is the only sign of the failure.
    pub stream_error: bool,
    /// When the request's bytes were handed to the socket (the write call began).
    pub written: Option<Instant>,
}

/// How an exchange on one connection failed.
enum Failed {
    /// Writing the request failed: the server never had all of it.
    Write,
    /// After the request was written.
    After(ExchangeError),
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Builds the full request bytes for one body.
pub fn request_bytes(path: &str, host: &str, headers: &[(String, String)], body: &[u8]) -> Bytes {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// Connections to one server.
pub struct Client {
    addr: SocketAddr,
    idle: Mutex<Vec<Conn>>,
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

fn find(h: &[u8], needle: &[u8]) -> Option<usize> {
    h.windows(needle.len()).position(|w| w == needle)
}

/// What a response's head says about reading the rest.
struct Head {
    status: u16,
    framing: Framing,
    keep_alive: bool,
}

/// Parses a response head (the bytes up to and including the blank line).
fn parse_head(head: &[u8]) -> Result<Head, ExchangeError> {
    let head = std::str::from_utf8(head).map_err(|_| ExchangeError::Io)?;
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or(ExchangeError::Io)?;
    let mut framing = Framing::UntilClose;
    let mut keep_alive = head.starts_with("HTTP/1.1");
    for line in head.split("\r\n").skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            framing = Framing::Length(v.parse().map_err(|_| ExchangeError::Io)?);
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            framing = Framing::Chunked;
        } else if k.eq_ignore_ascii_case("connection") {
            keep_alive = !v.eq_ignore_ascii_case("close");
        }
    }
    Ok(Head {
        status,
        framing,
        keep_alive,
    })
}

/// A whole response found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// Status code.
    pub status: u16,
    /// Its length in bytes (head, body and chunk framing).
    pub len: usize,
    /// The connection may carry another request after it.
    pub keep_alive: bool,
}

/// Whether `buf` starts with a whole response: `Ok(None)` while more bytes are needed, an error
/// when it is malformed or cut short by the end of the stream (`eof`: the peer closed it).
///
/// The same framing rules as [`Client::exchange`] (length, chunks, or until close), as one pure
/// function over the bytes read so far, for a send loop that reads sockets itself and parses
/// a response again as each read extends it (responses of a load test are small and most
/// arrive in one read).
pub fn complete_response(buf: &[u8], eof: bool) -> Result<Option<Complete>, ExchangeError> {
    let short = || {
        if eof {
            Err(ExchangeError::Io)
        } else {
            Ok(None)
        }
    };
    let Some(head_end) = find(buf, b"\r\n\r\n").map(|i| i + 4) else {
        return short();
    };
    let head = parse_head(&buf[..head_end])?;
    let whole = |len: usize| {
        Ok(Some(Complete {
            status: head.status,
            len,
            keep_alive: head.keep_alive,
        }))
    };
    match head.framing {
        Framing::Length(n) => {
            let end = head_end.checked_add(n).ok_or(ExchangeError::Io)?;
            if buf.len() >= end {
                whole(end)
            } else {
                short()
            }
        }
        Framing::Chunked => {
            let mut pos = head_end;
            loop {
                let Some(line_end) = find(&buf[pos..], b"\r\n").map(|i| pos + i) else {
                    return short();
                };
                let text =
                    std::str::from_utf8(&buf[pos..line_end]).map_err(|_| ExchangeError::Io)?;
                let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| ExchangeError::Io)?;
                // Data plus its CRLF (the last chunk: just the final CRLF, no trailers).
                let next = (line_end + 2)
                    .checked_add(size)
                    .and_then(|v| v.checked_add(2))
                    .ok_or(ExchangeError::Io)?;
                if buf.len() < next {
                    return short();
                }
                if size == 0 {
                    return whole(next);
                }
                pos = next;
            }
        }
        Framing::UntilClose if eof => Ok(Some(Complete {
            status: head.status,
            len: buf.len(),
            keep_alive: false,
        })),
        Framing::UntilClose => Ok(None),
    }
}

impl Client {
    /// A client for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Client {
            addr,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends pre-built request bytes and reads the whole response. `record_stream` records body
    /// arrival times (time to first token, inter-token gaps).
    ///
    /// A POST is never sent twice. An idle connection the server has closed is found before
    /// use (a non-blocking read sees its EOF) and replaced; a reused connection that fails
    /// while the request is being written is retried once on a fresh one (the server never had
    /// the whole request). Once written, a connection that closes before any response byte is
    /// an `Io` error: the server may have accepted the request and dropped it, and resending
    /// would hide that (and count it as a connect failure when the server is gone).
    pub async fn exchange(
        &self,
        req: &Bytes,
        sent: Instant,
        record_stream: bool,
    ) -> Result<Exchange, ExchangeError> {
        if let Some(conn) = self.live_idle() {
            match self.on(conn, req, sent, record_stream).await {
                Ok(x) => return Ok(x),
                Err(Failed::Write) => {} // the request never left: a fresh connection is safe
                Err(Failed::After(e)) => return Err(e),
            }
        }
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|_| ExchangeError::Connect)?;
        let _ = stream.set_nodelay(true);
        self.on(
            Conn {
                stream,
                buf: Vec::with_capacity(4096),
            },
            req,
            sent,
            record_stream,
        )
        .await
        .map_err(|f| match f {
            Failed::Write => ExchangeError::Io,
            Failed::After(e) => e,
        })
    }

    /// The most recently idled connection the server has not closed meanwhile.
    fn live_idle(&self) -> Option<Conn> {
        loop {
            let c = self.idle.lock().expect("idle stack").pop()?;
            // Nothing has arrived since its response was read (that read drained the socket
            // and cleared its readiness, and the reactor has seen no event since): open and
            // quiet, known without a syscall. At 80,000 req/s on one core the probe below,
            // on every reuse, was one read call per request.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            if c.stream.poll_read_ready(&mut cx).is_pending() {
                return Some(c);
            }
            let mut probe = [0u8; 1];
            match c.stream.try_read(&mut probe) {
                // Nothing to read: open and quiet, as an idle connection should be.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(c),
                // EOF, an error, or stray bytes: not reusable.
                _ => continue,
            }
        }
    }

    /// Runs one exchange on `c`.
    async fn on(
        &self,
        mut c: Conn,
        req: &Bytes,
        sent: Instant,
        record: bool,
    ) -> Result<Exchange, Failed> {
        c.buf.clear();
        // The send lag ends here: the kernel's own transmit time (on loopback it includes the
        // receiver's protocol work) is network time, as it is for any client.
        let written = Instant::now();
        if c.stream.write_all(req).await.is_err() {
            return Err(Failed::Write);
        }
        self.read_response(c, sent, record)
            .await
            .map(|mut x| {
                x.written = Some(written);
                x
            })
            .map_err(Failed::After)
    }

    /// Reads one response on `c` after its request was written.
    async fn read_response(
        &self,
        mut c: Conn,
        sent: Instant,
        record: bool,
    ) -> Result<Exchange, ExchangeError> {
        // Head.
        let head_end = loop {
            if let Some(i) = find(&c.buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = read_more(&mut c).await.map_err(|_| ExchangeError::Io)?;
            if n == 0 {
                return Err(ExchangeError::Io);
            }
        };
        let Head {
            status,
            framing,
            mut keep_alive,
        } = parse_head(&c.buf[..head_end])?;
        let mut x = Exchange {
            status,
            ..Exchange::default()
        };
        // Streaming: events are parsed as their bytes arrive and timed when they complete.
        let mut sse = crate::sse::SseParser::default();
        let mut mark = |x: &mut Exchange, data: &[u8]| {
            if record {
                let n = sse.feed(data);
                if n > 0 {
                    let at = sent.elapsed();
                    x.token_times.extend(std::iter::repeat_n(at, n));
                }
                x.usage_tokens = sse.completion_tokens;
                x.stream_error = sse.error;
            }
        };
        let mut pos = head_end;
        match framing {
            Framing::Length(len) => {
                // A stream may come with a length too (a server or proxy that buffers it):
                // its events are parsed as they arrive all the same.
                let mut fed = pos;
                loop {
                    let upto = c.buf.len().min(pos + len);
                    if upto > fed {
                        let data = c.buf[fed..upto].to_vec();
                        mark(&mut x, &data);
                        fed = upto;
                    }
                    if c.buf.len() >= pos + len {
                        break;
                    }
                    if read_more(&mut c).await.map_err(|_| ExchangeError::Io)? == 0 {
                        return Err(ExchangeError::Io);
                    }
                }
            }
            Framing::Chunked => loop {
                // Chunk size line.
                let line_end = loop {
                    if let Some(i) = find(&c.buf[pos..], b"\r\n") {
                        break pos + i;
                    }
                    if read_more(&mut c).await.map_err(|_| ExchangeError::Io)? == 0 {
                        return Err(ExchangeError::Io);
                    }
                };
                let size_text =
                    std::str::from_utf8(&c.buf[pos..line_end]).map_err(|_| ExchangeError::Io)?;
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| ExchangeError::Io)?;
                pos = line_end + 2;
                // Data plus its CRLF (the last chunk: just the final CRLF, no trailers expected).
                while c.buf.len() < pos + size + 2 {
                    if read_more(&mut c).await.map_err(|_| ExchangeError::Io)? == 0 {
                        return Err(ExchangeError::Io);
                    }
                }
                if size == 0 {
                    break;
                }
                let data = c.buf[pos..pos + size].to_vec();
                mark(&mut x, &data);
                pos += size + 2;
            },
            Framing::UntilClose => {
                keep_alive = false;
                loop {
                    let before = c.buf.len();
                    if read_more(&mut c).await.map_err(|_| ExchangeError::Io)? == 0 {
                        break;
                    }
                    let data = c.buf[before..].to_vec();
                    mark(&mut x, &data);
                }
            }
        }
        if keep_alive {
            self.idle.lock().expect("idle stack").push(c);
        }
        Ok(x)
    }
}

async fn read_more(c: &mut Conn) -> std::io::Result<usize> {
    // read_buf fills spare capacity without zeroing it first.
    c.buf.reserve(16 * 1024);
    c.stream.read_buf(&mut c.buf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `complete_response` on every prefix of `whole`: incomplete until the whole of it.
    fn whole_only_at_the_end(whole: &[u8], expect: Complete) {
        for cut in 0..whole.len() {
            assert_eq!(
                complete_response(&whole[..cut], false),
                Ok(None),
                "cut at {cut}"
            );
            assert_eq!(
                complete_response(&whole[..cut], true),
                Err(ExchangeError::Io),
                "closed at {cut}"
            );
        }
        assert_eq!(complete_response(whole, false), Ok(Some(expect)));
        // A next response's bytes after it do not change where it ends.
        let mut more = whole.to_vec();
        more.extend_from_slice(b"HTTP/1.1 200");
        assert_eq!(complete_response(&more, false), Ok(Some(expect)));
    }

    #[test]
    fn a_response_is_whole_only_when_its_framing_says_so() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        whole_only_at_the_end(
            r,
            Complete {
                status: 200,
                len: r.len(),
                keep_alive: true,
            },
        );
        let r = b"HTTP/1.1 503 Busy\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n5;x=1\r\nhello\r\n0\r\n\r\n";
        whole_only_at_the_end(
            r,
            Complete {
                status: 503,
                len: r.len(),
                keep_alive: false,
            },
        );
        let r = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        whole_only_at_the_end(
            r,
            Complete {
                status: 200,
                len: r.len(),
                keep_alive: false,
            },
        );
    }

    #[test]
    fn a_response_without_framing_ends_with_the_connection() {
        let r = b"HTTP/1.1 200 OK\r\n\r\npartial body";
        assert_eq!(complete_response(r, false), Ok(None));
        assert_eq!(
            complete_response(r, true),
            Ok(Some(Complete {
                status: 200,
                len: r.len(),
                keep_alive: false
            }))
        );
    }

    #[test]
    fn malformed_or_overflowing_framing_is_an_error_not_a_panic() {
        for r in [
            &b"HTTP/1.1 2x0 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
            b"HTTP/1.1 200 OK\r\nX: \xff\r\n\r\n",
        ] {
            assert_eq!(complete_response(r, false), Err(ExchangeError::Io), "{r:?}");
        }
    }
}
