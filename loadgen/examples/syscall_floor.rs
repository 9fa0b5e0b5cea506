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
//! With `uring` or `uring-defer` as the fourth argument the same closed loop runs on io_uring
//! instead: every connection keeps a receive queued in the ring, a finished response queues the
//! next request's send, and one `io_uring_enter` a turn submits the turn's sends and receives
//! and waits for completions. That asks whether fewer syscalls a request would raise the floor
//! itself, before building an io_uring send loop into loadgen. `uring-defer` also sets up the
//! ring for one issuer that runs completion work only when it waits (`SINGLE_ISSUER`,
//! `DEFER_TASKRUN`, `COOP_TASKRUN`: Linux 6.1+), so the kernel interrupts the loop less.
//!
//! `cargo run --release -p loadgen --example syscall_floor -- 127.0.0.1:9100 [connections] [seconds] [epoll|uring|uring-defer]`
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
    let mode = args.get(4).map_or("epoll", |m| m.as_str());
    let counted = match mode {
        "epoll" => epoll_loop(&addr, conns, secs, req)?,
        #[cfg(target_os = "linux")]
        "uring" | "uring-defer" => uring::run(&addr, conns, secs, req, mode == "uring-defer")?,
        other => return Err(std::io::Error::other(format!("unknown mode `{other}`"))),
    };
    let (counted, cpu) = counted;
    println!(
        "{{\"tool\":\"syscall_floor\",\"mode\":\"{mode}\",\"connections\":{conns},\"seconds\":{secs},\"requests\":{counted},\"rps\":{:.0},\"cpu_s\":{cpu:.3}}}",
        counted as f64 / secs
    );
    Ok(())
}

/// When the run measures: from one second after `start` for `secs` seconds.
struct Window {
    from: Instant,
    end: Instant,
    measuring: bool,
    counted: u64,
    cpu0: f64,
}

impl Window {
    fn new(secs: f64) -> Window {
        let from = Instant::now() + Duration::from_secs(1);
        Window {
            from,
            end: from + Duration::from_secs_f64(secs),
            measuring: false,
            counted: 0,
            cpu0: 0.0,
        }
    }

    /// Starts counting once the warm-up is over; false once the run is over.
    fn go_on(&mut self) -> bool {
        let now = Instant::now();
        if !self.measuring && now >= self.from {
            (self.measuring, self.cpu0, self.counted) = (true, cpu_seconds(), 0);
        }
        now < self.end
    }

    /// (requests counted, CPU seconds) over the measured window.
    fn result(&self) -> (u64, f64) {
        (self.counted, cpu_seconds() - self.cpu0)
    }
}

/// The bare epoll loop: a `read` for every readable connection, a `write` for every response.
fn epoll_loop(addr: &str, conns: usize, secs: f64, req: &[u8]) -> std::io::Result<(u64, f64)> {
    // Safety: plain epoll calls on descriptors this process owns.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut all = Vec::with_capacity(conns);
    for i in 0..conns {
        let sock = TcpStream::connect(addr)?;
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
    let mut w = Window::new(secs);
    while w.go_on() {
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
                w.counted += 1;
                (&c.sock).write_all(req)?;
            }
        }
    }
    Ok(w.result())
}

#[cfg(target_os = "linux")]
mod uring {
    //! The io_uring closed loop (see the file's doc).
    use super::{response_len, Window};
    use io_uring::{opcode, squeue, types, IoUring};
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;

    /// Receive buffer per connection: a response here is ~140 bytes.
    const RECV: usize = 4096;

    /// Queues `e`, submitting what is queued first when the ring is full.
    fn push(ring: &mut IoUring, e: &squeue::Entry) -> std::io::Result<()> {
        // Safety: every buffer an entry points at (the request, the connections' receive
        // buffers) outlives the ring, and a receive buffer has one receive queued at a time.
        while unsafe { ring.submission().push(e) }.is_err() {
            ring.submit()?;
        }
        Ok(())
    }

    /// Runs `conns` connections for `secs` measured seconds; (requests, CPU seconds).
    pub fn run(
        addr: &str,
        conns: usize,
        secs: f64,
        req: &[u8],
        defer: bool,
    ) -> std::io::Result<(u64, f64)> {
        let mut b = IoUring::builder();
        if defer {
            b.setup_single_issuer()
                .setup_defer_taskrun()
                .setup_coop_taskrun();
        }
        let mut ring = b.setup_cqsize(4 * conns as u32).build(2 * conns as u32)?;
        let socks = (0..conns)
            .map(|_| {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                Ok(s)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let mut bufs = vec![[0u8; RECV]; conns];
        let mut acc: Vec<Vec<u8>> = vec![Vec::with_capacity(RECV); conns];
        // user_data: connection index × 2, + 1 for a send.
        let send = |i: usize| {
            opcode::Send::new(
                types::Fd(socks[i].as_raw_fd()),
                req.as_ptr(),
                req.len() as u32,
            )
            .build()
            .user_data((i as u64) << 1 | 1)
        };
        let recv = |i: usize, buf: &mut [u8; RECV]| {
            opcode::Recv::new(
                types::Fd(socks[i].as_raw_fd()),
                buf.as_mut_ptr(),
                RECV as u32,
            )
            .build()
            .user_data((i as u64) << 1)
        };
        for (i, buf) in bufs.iter_mut().enumerate() {
            push(&mut ring, &send(i))?;
            push(&mut ring, &recv(i, buf))?;
        }
        let mut w = Window::new(secs);
        let mut done = Vec::with_capacity(4 * conns);
        while w.go_on() {
            ring.submit_and_wait(1)?;
            done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            for (ud, res) in done.drain(..) {
                let i = (ud >> 1) as usize;
                if res < 0 {
                    return Err(std::io::Error::from_raw_os_error(-res));
                }
                if ud & 1 == 1 {
                    if res as usize != req.len() {
                        return Err(std::io::Error::other("a short send"));
                    }
                    continue;
                }
                if res == 0 {
                    return Err(std::io::Error::other("the server closed a connection"));
                }
                acc[i].extend_from_slice(&bufs[i][..res as usize]);
                while let Some(len) = response_len(&acc[i]) {
                    acc[i].drain(..len);
                    w.counted += 1;
                    push(&mut ring, &send(i))?;
                }
                push(&mut ring, &recv(i, &mut bufs[i]))?;
            }
        }
        Ok(w.result())
    }
}
