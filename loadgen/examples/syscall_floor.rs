//! The kernel's floor for an HTTP generator on one core: `C` keep-alive connections on one
//! thread, each always with one request outstanding (a closed loop), driven by a bare epoll
//! loop. Per request there is one `write` and one `read` (plus a share of one `epoll_wait`), and
//! nothing else: no async runtime, no timers, no histograms, no pacing, the response parsed only
//! as far as its end.
//!
//! Why: issue 17 asks loadgen for 1.5× oha's rate on one core. Both tools pay the same kernel
//! cost per request on loopback TCP (the send, the delivery to the server, the response's
//! receive), and on the hosts measured that cost is most of a generator core. What this bare
//! loop reaches on a core is therefore about the most any generator using these syscalls could
//! send there, so it bounds what cutting loadgen's own user-space work could still gain.
//!
//! `cargo run --release -p loadgen --example syscall_floor -- 127.0.0.1:9100 [connections] [seconds]`
//! prints one JSON line: requests per second over the measured seconds (after 1 s of warm-up)
//! and the process's CPU seconds in that time.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// One connection: its socket and the bytes of the response read so far.
struct Conn {
    sock: TcpStream,
    buf: Vec<u8>,
}

/// The length of the complete response at the start of `buf`, if it is all there: headers up
/// to the blank line, then `Content-Length` bytes.
fn response_len(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let body: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= end + body).then_some(end + body)
}

fn cpu_seconds() -> f64 {
    // Safety: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:9100".into());
    let conns: usize = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(64);
    let secs: f64 = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(5.0);
    let body = r#"{"input":"the model serves requests with dynamic batching"}"#;
    let req = format!(
        "POST /v1/embeddings HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let req = req.as_bytes();
    // Safety: plain epoll calls on descriptors this process owns.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut all = Vec::with_capacity(conns);
    for i in 0..conns {
        let sock = TcpStream::connect(&addr)?;
        sock.set_nodelay(true)?;
        sock.set_nonblocking(true)?;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, sock.as_raw_fd(), &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        (&sock).write_all(req)?;
        all.push(Conn {
            sock,
            buf: Vec::with_capacity(4096),
        });
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut chunk = vec![0u8; 65536];
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(1);
    let end = measure_from + Duration::from_secs_f64(secs);
    let (mut counted, mut cpu0, mut measuring) = (0u64, 0.0, false);
    loop {
        let now = Instant::now();
        if !measuring && now >= measure_from {
            (measuring, cpu0, counted) = (true, cpu_seconds(), 0);
        }
        if now >= end {
            break;
        }
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let c = &mut all[ev.u64 as usize];
            match (&c.sock).read(&mut chunk) {
                Ok(0) => return Err(std::io::Error::other("the server closed a connection")),
                Ok(k) => c.buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
            while let Some(len) = response_len(&c.buf) {
                c.buf.drain(..len);
                counted += 1;
                (&c.sock).write_all(req)?;
            }
        }
    }
    let cpu = cpu_seconds() - cpu0;
    println!(
        "{{\"tool\":\"syscall_floor\",\"connections\":{conns},\"seconds\":{secs},\"requests\":{counted},\"rps\":{:.0},\"cpu_s\":{cpu:.3}}}",
        counted as f64 / secs
    );
    Ok(())
}
