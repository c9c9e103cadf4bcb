//! `uring-tcp`: a TCP proxy on io_uring, the prototype of issue 23's "kernel
//! time below epoll's floor". It copies bytes between each client connection
//! and one backend connection (round-robin over the backends), as HAProxy's
//! `mode tcp` does for benches/lb-capped.sh's `tcp-limit` line, so the two
//! compare one event loop's kernel cost against the other's under the same
//! CPU cap.
//!
//! ```text
//!  multishot accept ─▶ socket + connect (to the next backend)
//!  multishot recv on both ends, into provided buffers (one group, 16 KiB each)
//!      ─▶ send to the other end (in order, one send in flight per direction)
//!      ─▶ the buffer given back (IORING_OP_PROVIDE_BUFFERS) once sent
//!  one io_uring_enter per loop: every completion handled, every new entry
//!  submitted together (batched submission)
//!  EOF on one end ─▶ a FIN to the other once what it sent is delivered
//!  EOF both ways, or an error ─▶ closed once no operation of theirs is in flight
//! ```
//!
//! Needs Linux 5.19 (multishot accept and recv; io_uring_disabled = 0).
//! One thread, no HTTP, no timeouts: a measuring instrument, not a product.
//!
//!   cargo bench --bench uring_tcp -- 127.0.0.1:8000 127.0.0.1:9001 127.0.0.1:9002
//!
//! Without arguments (as `cargo test --all-targets` runs it) it tests itself:
//! round trips through it to an echo backend.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

/// Entries of the submission queue.
const RING_ENTRIES: u32 = 4096;
/// Provided buffers, and the size of each.
const BUFFERS: u16 = 2048;
const BUFFER_SIZE: usize = 16 * 1024;
/// The buffer group of every recv.
const GROUP: u16 = 7;

/// What a completion is about (the low byte of its user data; the rest is the
/// connection's slot).
const ACCEPT: u64 = 1;
const CONNECT: u64 = 2;
const RECV_CLIENT: u64 = 3;
const RECV_BACKEND: u64 = 4;
const SEND_BACKEND: u64 = 5;
const SEND_CLIENT: u64 = 6;
const PROVIDE: u64 = 7;

/// One direction of a connection: buffers received and waiting to be sent
/// to the other end, the first of them possibly half sent.
#[derive(Default)]
struct Pipe {
    queue: VecDeque<(u16, usize, usize)>,
    sending: bool,
    /// The sending end has closed (recv gave 0): once drained, the
    /// receiving end gets a FIN (shutdown SHUT_WR), as HAProxy forwards it.
    eof: bool,
    /// That FIN is sent.
    fin_sent: bool,
}

impl Pipe {
    fn drained(&self) -> bool {
        self.queue.is_empty() && !self.sending
    }
}

struct Conn {
    client: RawFd,
    backend: RawFd,
    backend_addr: Box<libc::sockaddr_in>,
    connected: bool,
    to_backend: Pipe,
    to_client: Pipe,
    /// Operations of this connection in the ring.
    inflight: u32,
    closing: bool,
}

struct Proxy {
    ring: IoUring,
    buffers: Vec<u8>,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    backends: Vec<SocketAddr>,
    next_backend: usize,
    listener: RawFd,
}

fn user_data(slot: usize, kind: u64) -> u64 {
    (slot as u64) << 8 | kind
}

impl Proxy {
    fn push(&mut self, entry: squeue::Entry) {
        // Full: submit what is there and try again.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit().expect("io_uring_enter");
        }
    }

    fn buffer(&self, bid: u16) -> *const u8 {
        self.buffers[bid as usize * BUFFER_SIZE..].as_ptr()
    }

    fn give_back(&mut self, bid: u16) {
        let addr = self.buffer(bid) as *mut u8;
        let entry = opcode::ProvideBuffers::new(addr, BUFFER_SIZE as i32, 1, GROUP, bid)
            .build()
            .user_data(PROVIDE);
        self.push(entry);
    }

    fn arm_accept(&mut self) {
        let entry = opcode::AcceptMulti::new(types::Fd(self.listener))
            .build()
            .user_data(ACCEPT);
        self.push(entry);
    }

    fn arm_recv(&mut self, slot: usize, backend: bool) {
        let Some(conn) = self.conns[slot].as_mut() else { return };
        let (fd, kind) = if backend {
            (conn.backend, RECV_BACKEND)
        } else {
            (conn.client, RECV_CLIENT)
        };
        conn.inflight += 1;
        let entry = opcode::RecvMulti::new(types::Fd(fd), GROUP)
            .build()
            .user_data(user_data(slot, kind));
        self.push(entry);
    }

    fn accepted(&mut self, client: RawFd) {
        let backend = self.backends[self.next_backend % self.backends.len()];
        self.next_backend += 1;
        let SocketAddr::V4(v4) = backend else {
            panic!("IPv4 backends only")
        };
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        for s in [client, fd] {
            let one: libc::c_int = 1;
            unsafe {
                libc::setsockopt(
                    s,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                );
            }
        }
        let addr = Box::new(libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        });
        let conn = Conn {
            client,
            backend: fd,
            backend_addr: addr,
            connected: false,
            to_backend: Pipe::default(),
            to_client: Pipe::default(),
            inflight: 1,
            closing: false,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.conns[s] = Some(conn);
                s
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        let c = self.conns[slot].as_ref().unwrap();
        let entry = opcode::Connect::new(
            types::Fd(fd),
            (&*c.backend_addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
        .build()
        .user_data(user_data(slot, CONNECT));
        self.push(entry);
        self.arm_recv(slot, false);
    }

    /// Sends the next queued buffer of one direction, unless one is in flight.
    fn pump(&mut self, slot: usize, to_backend: bool) {
        let Some(conn) = self.conns[slot].as_mut() else { return };
        if conn.closing || (to_backend && !conn.connected) {
            return;
        }
        let (fd, kind, pipe) = if to_backend {
            (conn.backend, SEND_BACKEND, &mut conn.to_backend)
        } else {
            (conn.client, SEND_CLIENT, &mut conn.to_client)
        };
        if pipe.sending {
            return;
        }
        let Some(&(bid, off, len)) = pipe.queue.front() else {
            return;
        };
        pipe.sending = true;
        conn.inflight += 1;
        let ptr = unsafe { self.buffers.as_ptr().add(bid as usize * BUFFER_SIZE + off) };
        let entry = opcode::Send::new(types::Fd(fd), ptr, (len - off) as u32)
            .build()
            .user_data(user_data(slot, kind));
        self.push(entry);
    }

    /// An end has closed (recv gave 0): its FIN goes on once its data has;
    /// both ends closed and drained, the connection ends.
    fn half_close(&mut self, slot: usize) {
        let Some(conn) = self.conns[slot].as_mut() else { return };
        for (pipe, fd) in [(&mut conn.to_backend, conn.backend), (&mut conn.to_client, conn.client)] {
            if pipe.eof && pipe.drained() && !pipe.fin_sent {
                pipe.fin_sent = true;
                unsafe { libc::shutdown(fd, libc::SHUT_WR) };
            }
        }
        if conn.to_backend.fin_sent && conn.to_client.fin_sent {
            self.close(slot);
        }
    }

    /// Ends a connection: both ends shut down (their recvs then complete),
    /// closed and forgotten once nothing of theirs is in flight.
    fn close(&mut self, slot: usize) {
        let Some(conn) = self.conns[slot].as_mut() else { return };
        if !conn.closing {
            conn.closing = true;
            unsafe {
                libc::shutdown(conn.client, libc::SHUT_RDWR);
                libc::shutdown(conn.backend, libc::SHUT_RDWR);
            }
        }
        if conn.inflight > 0 {
            return;
        }
        let conn = self.conns[slot].take().unwrap();
        unsafe {
            libc::close(conn.client);
            libc::close(conn.backend);
        }
        for (bid, _, _) in conn.to_backend.queue.into_iter().chain(conn.to_client.queue) {
            self.give_back(bid);
        }
        self.free.push(slot);
    }

    fn complete(&mut self, data: u64, result: i32, flags: u32) {
        let kind = data & 0xff;
        let slot = (data >> 8) as usize;
        match kind {
            ACCEPT => {
                if result >= 0 {
                    self.accepted(result);
                }
                if !cqueue::more(flags) {
                    self.arm_accept();
                }
            }
            PROVIDE => assert!(
                result >= 0,
                "provide buffers: {}",
                std::io::Error::from_raw_os_error(-result)
            ),
            CONNECT => {
                let Some(conn) = self.conns[slot].as_mut() else { return };
                conn.inflight -= 1;
                if result < 0 || conn.closing {
                    self.close(slot);
                    return;
                }
                conn.connected = true;
                self.arm_recv(slot, true);
                self.pump(slot, true);
            }
            RECV_CLIENT | RECV_BACKEND => {
                let from_backend = kind == RECV_BACKEND;
                let more = cqueue::more(flags);
                let bid = cqueue::buffer_select(flags);
                let Some(conn) = self.conns[slot].as_mut() else {
                    if let Some(bid) = bid {
                        self.give_back(bid);
                    }
                    return;
                };
                if !more {
                    conn.inflight -= 1;
                }
                match (result, bid) {
                    (n, Some(bid)) if n > 0 && !conn.closing => {
                        let pipe = if from_backend {
                            &mut conn.to_client
                        } else {
                            &mut conn.to_backend
                        };
                        pipe.queue.push_back((bid, 0, n as usize));
                        self.pump(slot, !from_backend);
                        if !more {
                            self.arm_recv(slot, from_backend);
                        }
                    }
                    (0, None) if !conn.closing => {
                        let pipe = if from_backend {
                            &mut conn.to_client
                        } else {
                            &mut conn.to_backend
                        };
                        pipe.eof = true;
                        self.half_close(slot);
                    }
                    (n, bid) => {
                        let retry = n == -libc::ENOBUFS && !conn.closing;
                        if let Some(bid) = bid {
                            self.give_back(bid);
                        }
                        if retry {
                            // Out of buffers for a moment: listen again.
                            self.arm_recv(slot, from_backend);
                        } else {
                            self.close(slot);
                        }
                    }
                }
            }
            SEND_BACKEND | SEND_CLIENT => {
                let to_backend = kind == SEND_BACKEND;
                let Some(conn) = self.conns[slot].as_mut() else { return };
                conn.inflight -= 1;
                let pipe = if to_backend {
                    &mut conn.to_backend
                } else {
                    &mut conn.to_client
                };
                pipe.sending = false;
                if result <= 0 || conn.closing {
                    self.close(slot);
                    return;
                }
                let front = pipe
                    .queue
                    .front_mut()
                    .expect("a send completes its queue's first buffer");
                front.1 += result as usize;
                let sent = (front.1 == front.2).then(|| pipe.queue.pop_front().unwrap().0);
                let eof = pipe.eof;
                if let Some(bid) = sent {
                    self.give_back(bid);
                }
                self.pump(slot, to_backend);
                if eof {
                    self.half_close(slot);
                }
            }
            _ => unreachable!("user data {data:#x}"),
        }
    }

    fn run(&mut self) -> ! {
        loop {
            self.ring.submit_and_wait(1).expect("io_uring_enter");
            let completions: Vec<(u64, i32, u32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags()))
                .collect();
            for (data, result, flags) in completions {
                self.complete(data, result, flags);
            }
        }
    }
}

/// Runs the proxy on `listener` (never returns).
fn serve(listener: TcpListener, backends: Vec<SocketAddr>) -> ! {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_cqsize(RING_ENTRIES * 4)
        .build(RING_ENTRIES)
        .expect("io_uring_setup (Linux 5.19+, kernel.io_uring_disabled = 0)");
    let mut proxy = Proxy {
        ring,
        buffers: vec![0u8; BUFFERS as usize * BUFFER_SIZE],
        conns: Vec::new(),
        free: Vec::new(),
        backends,
        next_backend: 0,
        listener: listener.as_raw_fd(),
    };
    let all = opcode::ProvideBuffers::new(proxy.buffers.as_mut_ptr(), BUFFER_SIZE as i32, BUFFERS, GROUP, 0)
        .build()
        .user_data(PROVIDE);
    proxy.push(all);
    proxy.arm_accept();
    // The listener's fd must outlive the loop, which never ends.
    std::mem::forget(listener);
    proxy.run()
}

/// `cargo test --all-targets` runs this bench with no arguments: a round
/// trip through the proxy to an echo backend, both directions and a
/// half-close (the client's FIN reaches the backend, the backend's the client).
fn self_test() {
    use std::io::{Read, Write};
    let backend = TcpListener::bind("127.0.0.1:0").expect("bind the echo backend");
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in backend.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut all = Vec::new();
                let _ = conn.read_to_end(&mut all);
                let _ = conn.write_all(&all);
            });
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let proxy_addr = listener.local_addr().unwrap();
    std::thread::spawn(move || serve(listener, vec![backend_addr]));
    for round in 0..3 {
        let mut client = std::net::TcpStream::connect(proxy_addr).expect("connect to the proxy");
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let sent = vec![b'a' + round; 100_000];
        client.write_all(&sent).expect("send through the proxy");
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).expect("read the echo back");
        assert_eq!(got.len(), sent.len(), "round {round}: the echo came back whole");
        assert!(got == sent, "round {round}: the echo came back unchanged");
    }
    eprintln!("uring_tcp: self-test passed (3 round trips of 100 kB with half-close)");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.is_empty() {
        self_test();
        return;
    }
    if args.len() < 2 {
        eprintln!("usage: uring_tcp LISTEN BACKEND [BACKEND ...]");
        std::process::exit(64);
    }
    let listener = TcpListener::bind(&args[0]).unwrap_or_else(|e| panic!("bind {}: {e}", args[0]));
    let backends: Vec<SocketAddr> = args[1..]
        .iter()
        .map(|b| b.parse().unwrap_or_else(|e| panic!("backend {b}: {e}")))
        .collect();
    eprintln!("uring_tcp: listening on {} ({} backends)", args[0], backends.len());
    serve(listener, backends)
}
