//! A pacer that drives its own sockets: one epoll loop (through mio) per pacer thread, with
//! the schedule's next send on a timerfd in the same poll set.
//!
//! Why: on one core the async pacer reached 1.1–1.3× oha's rate where a bare epoll loop
//! reached 2.2× (`results/loadgen-floor-16core/`). Per request it paid a task, a tokio timeout
//! entry, a turn of the runtime (an `epoll_wait` plus tokio's own clock reads) for the send and
//! another for the response. Here a turn sends every arrival that is due (up to
//! [`MAX_BURST`]), then reads every socket that is ready, with one clock read for the batch of
//! responses, one per send (the send lag is measured at the write) and none of tokio's.
//!
//! It serves requests whose response is read whole; streaming workloads (token timings per
//! event) keep the async pacer. Both record the same [`Sample`]s: the schedule, the send lag
//! at the socket write, connection waits under a cap, timeouts, and a POST never sent twice
//! (a reused connection that fails before any byte of the request left is replaced; after
//! that, a failure is an error).

use super::linux;
use super::{dropped, record_unsent, sample, Sent, Share, WakeEstimate};
use crate::http1::{complete_response, Complete};
use crate::record::{self, Outcome};
use crate::schedule::Schedule;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Where and how a direct pacer sends.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The server.
    pub addr: SocketAddr,
    /// Per-request timeout, from the moment the request has a connection.
    pub timeout: Duration,
    /// This pacer's cap on open connections (requests wait for one); `None`: no cap, a new
    /// connection whenever a waiting request is not better served by one about to free up
    /// ([`Run::place`]).
    pub conns: Option<usize>,
}

/// The timerfd's token (connections are numbered from 0).
const TIMER: Token = Token(usize::MAX);

/// Overdue sends in one turn before the loop reads responses again. Responses that arrive
/// during a burst are stamped when the loop next polls, so a burst is kept to about the
/// self-check's 50 µs floor (a send costs 3–10 µs of a core on the hosts measured). On the
/// 2-core VM, asked 140,000 req/s with the one-core server the ceiling, one run each reached
/// 55.9k (64 a turn), 72.6k (8) and 69.7k (1).
const MAX_BURST: usize = 8;

/// One request from the moment it was due.
#[derive(Debug, Clone, Copy)]
struct Req {
    /// Which request of this pacer (tells a stale timeout from the current request).
    seq: u64,
    /// When the schedule wanted it sent.
    intended: Instant,
    /// When the loop got to it.
    dispatched: Instant,
    /// When it had a connection.
    acquired: Instant,
    /// Which pre-built request it sends.
    body: usize,
    /// When its first write began.
    written: Option<Instant>,
    /// Bytes of it written so far.
    off: usize,
}

/// Where a connection is.
enum State {
    /// Connecting, with the request that waits for it.
    Connecting(Req),
    /// Open and free.
    Idle,
    /// A request on it, being written or answered.
    Busy(Req),
}

/// One connection and the response bytes read so far.
struct Conn {
    sock: TcpStream,
    buf: Vec<u8>,
    filled: usize,
    state: State,
    /// It carried an earlier request (so a failed write may be the server's idle close).
    reused: bool,
}

/// A pacer's loop, made before its thread starts (so a failure to make it is reported).
pub(crate) struct Loop {
    target: Target,
    poll: Poll,
    /// The timerfd, and the (Instant, CLOCK_MONOTONIC) pair that maps one onto the other.
    timer: (OwnedFd, Instant, Duration),
}

/// A run's mutable state, kept apart from the poll set so handlers can borrow both.
struct Run {
    share: Share,
    target: Target,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    idle: Vec<usize>,
    open: usize,
    /// Requests due while no connection was idle, oldest first: each takes the next connection
    /// freed, or a new one ([`Run::place`]).
    waiting: VecDeque<Req>,
    /// (deadline, connection, request) in deadline order.
    deadlines: VecDeque<(Instant, usize, u64)>,
    /// Requests of this pacer not yet recorded.
    mine: usize,
    seq: u64,
    /// Connections freed by an answer so far (tells a turn that freed one, [`Run::place`]).
    freed: u64,
    /// The reactor's lateness after the timer fired, learned (and recorded) as the async
    /// pacer does.
    wake: WakeEstimate,
}

impl Loop {
    /// A poll set with the pacer's timer in it.
    pub(crate) fn new(target: Target) -> std::io::Result<Loop> {
        let poll = Poll::new()?;
        let timer = linux::raw_timerfd().ok_or_else(std::io::Error::last_os_error)?;
        poll.registry().register(
            &mut SourceFd(&timer.0.as_raw_fd()),
            TIMER,
            Interest::READABLE,
        )?;
        Ok(Loop {
            target,
            poll,
            timer,
        })
    }

    /// Sends this pacer's share of the schedule and waits for every answer (or its timeout),
    /// then hands its wake-up delays to its collector and drops `alive`.
    pub(crate) fn run(self, share: Share) {
        let Loop {
            target,
            mut poll,
            timer,
        } = self;
        let mut sched = Schedule::new(share.arrival, share.rate, share.seed);
        let mut run = Run {
            target,
            share,
            conns: Vec::new(),
            free: Vec::new(),
            idle: Vec::new(),
            open: 0,
            waiting: VecDeque::new(),
            deadlines: VecDeque::new(),
            mine: 0,
            seq: 0,
            freed: 0,
            wake: WakeEstimate::new(),
        };
        let mut events = Events::with_capacity(1024);
        let mut i = 0usize;
        let mut next = run.next_arrival(&mut sched, &mut i);
        // The arrival whose wait is planned, and the instant the timer is armed for then (none:
        // spun); `armed` until the timer fires (to learn how late it woke).
        let mut plan: Option<(Instant, Option<Instant>)> = None;
        let mut armed: Option<Instant> = None;
        loop {
            let now = Instant::now();
            run.expire(&poll, now);
            // A stop, or a saturated pacer reaching the end, sends nothing more.
            if run.share.stop.load(Ordering::Relaxed) || now >= run.share.end {
                if let Some(t) = next.take() {
                    record_unsent(&run.share, Some(t), &mut sched, i);
                }
            }
            let mut burst = 0;
            while let Some(intended) = next {
                if intended > now || burst == MAX_BURST {
                    break;
                }
                run.dispatch(&poll, intended, now, i - 1);
                burst += 1;
                next = run.next_arrival(&mut sched, &mut i);
            }
            if next.is_none() && run.mine == 0 {
                break;
            }
            let timeout = match next {
                // Still overdue: read what is ready and come straight back.
                Some(t) if t <= now => Some(Duration::ZERO),
                Some(t) => {
                    // Sleep or spin is decided once an arrival: the timer is armed early by
                    // the learned wake-up latency, or, when the gap is shorter, the whole gap
                    // is spun (and the estimate decays).
                    if plan.map(|(at, _)| at) != Some(t) {
                        let wake_at = t - run.wake.early();
                        let (fd, base, mono) = &timer;
                        let sleep = (wake_at > Instant::now()
                            && linux::arm(fd, *mono + (wake_at - *base)))
                        .then_some(wake_at);
                        if sleep.is_none() {
                            run.wake.spun();
                        }
                        plan = Some((t, sleep));
                        armed = sleep;
                    }
                    let now = Instant::now();
                    match plan.and_then(|(_, sleep)| sleep) {
                        // Until the timer or a socket (the timeout only backs the timer up).
                        Some(w) if now < w => Some(run.until_deadline(now).min(t - now)),
                        // Within the wake-up latency of the send: spin, reading responses.
                        _ => Some(Duration::ZERO),
                    }
                }
                None => Some(run.until_deadline(now)),
            };
            // Requests that may get a new connection do not wait out a sleep for it.
            let timeout = if run.waiting.is_empty() || !run.may_open() {
                timeout
            } else {
                Some(Duration::ZERO)
            };
            if poll.poll(&mut events, timeout).is_err() {
                // EINTR and the like: go round again.
                continue;
            }
            let t = Instant::now();
            let freed = run.freed;
            for ev in events.iter() {
                if ev.token() == TIMER {
                    if linux::drain(&timer.0) {
                        if let Some(at) = armed.take() {
                            let late = t.saturating_duration_since(at).as_secs_f64() * 1e6;
                            run.wake.saw(late);
                        }
                    }
                    continue;
                }
                run.on_event(&poll, ev, t);
            }
            run.place(&poll, next.is_some_and(|n| n <= t), run.freed != freed);
        }
        let _ = record::lock(&run.share.col).histos.wake.add(&run.wake.seen);
        let _ = poll
            .registry()
            .deregister(&mut SourceFd(&timer.0.as_raw_fd()));
        drop(run.share.alive);
    }
}

/// How many of `waiting` requests get a new connection this turn, with `room` left under the
/// cap: none when `busy_will_free` (the loop is behind, this turn freed a connection and others
/// are still busy: see [`Run::place`]), else all of them up to [`MAX_BURST`] a turn.
fn connects_now(waiting: usize, room: usize, busy_will_free: bool) -> usize {
    if busy_will_free {
        0
    } else {
        waiting.min(room).min(MAX_BURST)
    }
}

impl Run {
    /// The next arrival of this pacer's share, or `None` once the schedule ends (the run's end,
    /// or a stop). An arrival already overdue at the end is returned (the loop then records it
    /// and the rest as unsent: see [`record_unsent`]).
    fn next_arrival(&self, sched: &mut Schedule, i: &mut usize) -> Option<Instant> {
        let s = &self.share;
        s.next_mine(sched, i)
            .filter(|_| !s.stop.load(Ordering::Relaxed))
    }

    /// Time until the earliest request deadline (a long sleep when none).
    fn until_deadline(&self, now: Instant) -> Duration {
        self.deadlines
            .front()
            .map_or(Duration::from_secs(1), |(d, _, _)| {
                d.saturating_duration_since(now)
            })
    }

    /// Sends arrival `index` (due at `intended`), or queues or drops it.
    fn dispatch(&mut self, poll: &Poll, intended: Instant, now: Instant, index: usize) {
        let s = &self.share;
        if s.in_flight.load(Ordering::Relaxed) >= s.cap {
            record::lock(&s.col).record(&dropped(intended, now));
            return;
        }
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        self.mine += 1;
        self.seq += 1;
        let req = Req {
            seq: self.seq,
            intended,
            dispatched: now,
            acquired: now,
            body: index % s.bodies.len(),
            written: None,
            off: 0,
        };
        match self.idle.pop() {
            Some(c) => self.start(poll, c, req, now),
            // A new connection waits for the next turn's responses (see [`Run::place`]).
            None => self.waiting.push_back(req),
        }
    }

    /// Connections the cap still allows (unbounded without one).
    fn room(&self) -> usize {
        self.target
            .conns
            .map_or(usize::MAX, |cap| cap.saturating_sub(self.open))
    }

    /// Whether the connection cap leaves room for another connection.
    fn may_open(&self) -> bool {
        self.room() > 0
    }

    /// Opens connections (up to [`MAX_BURST`] a turn) for the requests still waiting after a
    /// turn's responses freed what they freed, except while the loop is `behind` (another
    /// arrival is already due) and the turn `freed` a connection: then the loop's own time is
    /// what is short, and connections already open free up as fast as it can use them.
    ///
    /// Why: a connect costs the loop far more than a send (the ephemeral-port search grows
    /// with the thousands of sockets a run leaves in TIME_WAIT). A loop that connected for
    /// every overdue request fell further behind with each one and did not recover: on the
    /// 2-core VM, asked 40,000 req/s, one stall left it 242 ms behind with ~16,000
    /// connections opened, where the same loop given 64 connections held 40,000 req/s at a
    /// 25 µs send-lag p99. A turn that frees nothing while requests wait means the server
    /// holds every connection, and then more are what the open loop needs.
    fn place(&mut self, poll: &Poll, behind: bool, freed: bool) {
        let busy = self.open > self.idle.len();
        for _ in 0..connects_now(self.waiting.len(), self.room(), behind && freed && busy) {
            let req = self.waiting.pop_front().expect("counted");
            self.connect(poll, req, Instant::now());
        }
    }

    /// Puts `req` on idle connection `c`, which it now holds.
    fn start(&mut self, poll: &Poll, c: usize, mut req: Req, now: Instant) {
        req.acquired = now;
        self.deadlines
            .push_back((now + self.target.timeout, c, req.seq));
        let conn = self.conns[c].as_mut().expect("an idle connection exists");
        conn.state = State::Busy(req);
        conn.reused = true;
        self.write(poll, c);
    }

    /// Opens a connection for `req`.
    fn connect(&mut self, poll: &Poll, mut req: Req, now: Instant) {
        req.acquired = now;
        let sock = match TcpStream::connect(self.target.addr) {
            Ok(s) => s,
            Err(_) => return self.finish(&req, Instant::now(), Outcome::Connect),
        };
        let c = match self.free.pop() {
            Some(c) => c,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        let mut conn = Conn {
            sock,
            buf: vec![0; 4096],
            filled: 0,
            state: State::Connecting(req),
            reused: false,
        };
        // Edge-triggered, both ways, for its whole life: writable once connected (and when a
        // long request can go on), readable when a response arrives.
        if poll
            .registry()
            .register(
                &mut conn.sock,
                Token(c),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.free.push(c);
            return self.finish(&req, Instant::now(), Outcome::Connect);
        }
        self.conns[c] = Some(conn);
        self.open += 1;
        self.deadlines
            .push_back((now + self.target.timeout, c, req.seq));
    }

    /// Writes what is left of connection `c`'s request.
    fn write(&mut self, poll: &Poll, c: usize) {
        let conn = self.conns[c].as_mut().expect("a live connection");
        let State::Busy(req) = &mut conn.state else {
            return;
        };
        let bytes = &self.share.bodies[req.body];
        while req.off < bytes.len() {
            if req.written.is_none() {
                // The send lag ends here, as in the async client.
                req.written = Some(Instant::now());
            }
            match conn.sock.write(&bytes[req.off..]) {
                Ok(0) => break,
                Ok(n) => req.off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    let (req, reused) = (*req, conn.reused);
                    if req.off == 0 && reused {
                        // The server closed the idle connection and none of the request left:
                        // a fresh connection is safe, in this one's place under a cap.
                        self.drop_conn(poll, c);
                        return self.connect(poll, req, req.acquired);
                    }
                    self.close(poll, c);
                    return self.finish(&req, Instant::now(), Outcome::Io);
                }
            }
        }
    }

    /// Handles one readiness event of a connection.
    fn on_event(&mut self, poll: &Poll, ev: &mio::event::Event, t: Instant) {
        let c = ev.token().0;
        let Some(conn) = self.conns.get_mut(c).and_then(Option::as_mut) else {
            return;
        };
        match conn.state {
            State::Connecting(req) => {
                let failed = ev.is_error()
                    || matches!(conn.sock.take_error(), Ok(Some(_)) | Err(_))
                    || ev.is_read_closed() && !ev.is_readable();
                if failed {
                    self.close(poll, c);
                    return self.finish(&req, t, Outcome::Connect);
                }
                match conn.sock.peer_addr() {
                    Ok(_) => {
                        let _ = conn.sock.set_nodelay(true);
                        conn.state = State::Busy(req);
                        self.write(poll, c);
                    }
                    // Not yet: a spurious wake-up.
                    Err(e) if e.kind() == ErrorKind::NotConnected => {}
                    Err(_) => {
                        self.close(poll, c);
                        self.finish(&req, t, Outcome::Connect);
                    }
                }
            }
            State::Idle => {
                // Anything on an idle connection (EOF, an error, stray bytes) ends it.
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.idle.retain(|&i| i != c);
                    self.close(poll, c);
                }
            }
            State::Busy(req) => {
                if ev.is_writable() && req.off < self.share.bodies[req.body].len() {
                    self.write(poll, c);
                }
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    self.read(poll, c, t, ev.is_read_closed());
                }
            }
        }
    }

    /// Reads what connection `c` has and finishes its request when its response is whole.
    ///
    /// Reading stops as soon as the response is whole, without the read that would return
    /// `WouldBlock`: a request has one response, so nothing more is due on the connection until
    /// the next request (2,000 req/s under `strace -c`: 16,000 reads for 8,000 requests, half
    /// of them `WouldBlock`). Under edge-triggered epoll that leaves no data unseen: anything
    /// the server sends later (stray bytes, its close) raises a new event, and a close already
    /// there when this event was raised is `closed`, which keeps the connection from reuse.
    fn read(&mut self, poll: &Poll, c: usize, t: Instant, closed: bool) {
        let Some(conn) = self.conns[c].as_mut() else {
            return;
        };
        let State::Busy(req) = conn.state else {
            return;
        };
        let mut eof = false;
        let mut failed = false;
        let mut whole = None;
        loop {
            if conn.filled == conn.buf.len() {
                conn.buf.resize(conn.buf.len() * 2, 0);
            }
            match conn.sock.read(&mut conn.buf[conn.filled..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    conn.filled += n;
                    if let Ok(Some(c)) = complete_response(&conn.buf[..conn.filled], false) {
                        whole = Some(c);
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let parsed = if failed {
            Err(crate::http1::ExchangeError::Io)
        } else if whole.is_some() {
            Ok(whole)
        } else {
            complete_response(&conn.buf[..conn.filled], eof)
        };
        let whole_written = req.off >= self.share.bodies[req.body].len();
        match parsed {
            Ok(None) => {}
            Ok(Some(Complete {
                status,
                len,
                keep_alive,
            })) => {
                let reusable = keep_alive && !eof && !closed && len == conn.filled && whole_written;
                conn.filled = 0;
                let outcome = if (200..300).contains(&status) {
                    Outcome::Ok { tokens: None }
                } else {
                    Outcome::Status(status)
                };
                if reusable {
                    conn.state = State::Idle;
                    self.release(poll, c, t);
                } else {
                    self.close(poll, c);
                }
                self.finish(&req, t, outcome);
            }
            Err(_) => {
                self.close(poll, c);
                self.finish(&req, t, Outcome::Io);
            }
        }
    }

    /// Connection `c` is free: the oldest waiting request takes it, or it goes idle.
    fn release(&mut self, poll: &Poll, c: usize, now: Instant) {
        self.freed = self.freed.wrapping_add(1);
        match self.waiting.pop_front() {
            Some(req) => self.start(poll, c, req, now),
            None => self.idle.push(c),
        }
    }

    /// Closes connection `c` (its request, if any, is the caller's to finish); under a
    /// connection cap the oldest waiting request connects in its place.
    fn close(&mut self, poll: &Poll, c: usize) {
        self.drop_conn(poll, c);
        if self.may_open() {
            if let Some(req) = self.waiting.pop_front() {
                self.connect(poll, req, Instant::now());
            }
        }
    }

    /// Closes connection `c` and frees its slot.
    fn drop_conn(&mut self, poll: &Poll, c: usize) {
        if let Some(mut conn) = self.conns[c].take() {
            let _ = poll.registry().deregister(&mut conn.sock);
            self.free.push(c);
            self.open -= 1;
        }
    }

    /// Times out requests past their deadline, and drops the entries of finished requests from
    /// the front of the queue. Without that pruning the queue held an entry for every request
    /// of the last `--timeout` (30 s at 400,000 req/s: 12 million); with it, it holds about
    /// the requests in flight, as requests mostly finish in the order they were sent.
    fn expire(&mut self, poll: &Poll, now: Instant) {
        while let Some(&(deadline, c, seq)) = self.deadlines.front() {
            let current =
                self.conns
                    .get(c)
                    .and_then(Option::as_ref)
                    .and_then(|conn| match conn.state {
                        State::Busy(r) | State::Connecting(r) if r.seq == seq => Some(r),
                        _ => None,
                    });
            let Some(req) = current else {
                self.deadlines.pop_front();
                continue;
            };
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            // The connection is in an unknown state (a late response may still come): it is not
            // reused.
            self.close(poll, c);
            self.finish(&req, now, Outcome::Timeout);
        }
    }

    /// Records a finished request and counts it out. A request that never reached its write
    /// (a failed connect) counts its whole time as its own, as in the async client.
    fn finish(&mut self, req: &Req, done: Instant, outcome: Outcome) {
        self.share.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.mine -= 1;
        let r = Sent {
            acquired: req.acquired,
            written: req.written.unwrap_or(done),
            done,
            outcome,
        };
        record::lock(&self.share.col).record(&sample(req.intended, req.dispatched, r));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_behind_waits_for_its_busy_connections_instead_of_opening_more() {
        // Behind, with connections freeing up: no connect, however many wait.
        assert_eq!(connects_now(500, usize::MAX, true), 0);
        // On time, or nothing freed this turn (the server holds them): a burst of connects.
        assert_eq!(connects_now(500, usize::MAX, false), MAX_BURST);
        assert_eq!(connects_now(3, usize::MAX, false), 3);
        // Never past the cap.
        assert_eq!(connects_now(500, 2, false), 2);
        assert_eq!(connects_now(500, 0, false), 0);
    }
}
