//! The answers a UDP worker sends from its client socket: up to 64 a
//! batch, sent with one `sendmmsg` ([`crate::net::udp_batch::SendBatch`]). Both the
//! worker's own loop (`udp.rs`) and its Consul client (`inline.rs`) write
//! into it.

use crate::net::udp_batch::{Control, OnSendError, ReplyFrom, SendBatch};

/// Answers sent per syscall at most (cached ones and Consul's, which may fan
/// out to several merged clients); a full batch is sent at once.
const OUT: usize = 64;
/// Capacity of an answer buffer, made once (a larger answer grows it).
const ANSWER_CAPACITY: usize = 4096;

/// Answers to send from the client socket: up to 64 (`OUT`), sent with one
/// `sendmmsg`; the headers are pointed into `bufs` and `addrs` right before
/// it, which are allocated once and never resized.
pub struct Outbox {
    fd: libc::c_int,
    bufs: Vec<Vec<u8>>,
    addrs: Box<[libc::sockaddr_storage; OUT]>,
    addr_lens: [libc::socklen_t; OUT],
    /// Where each answer goes out from (a wildcard socket: the address asked).
    froms: [ReplyFrom; OUT],
    controls: Box<[Control; OUT]>,
    batch: SendBatch<OUT>,
    len: usize,
}

impl Outbox {
    /// An empty outbox for the client socket `fd`.
    pub fn new(fd: libc::c_int) -> Self {
        Outbox {
            fd,
            bufs: (0..OUT).map(|_| Vec::with_capacity(ANSWER_CAPACITY)).collect(),
            // SAFETY: all-zero is a valid value for this plain C struct.
            addrs: Box::new(unsafe { std::mem::zeroed() }),
            addr_lens: [0; OUT],
            froms: [ReplyFrom::Any; OUT],
            controls: Box::new([Control::default(); OUT]),
            batch: SendBatch::default(),
            len: 0,
        }
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer for the next answer (the batch is sent first when full);
    /// [`Outbox::push`] queues what was written into it.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        if self.len == OUT {
            self.flush();
        }
        &mut self.bufs[self.len]
    }

    /// Queues the answer just written into [`Outbox::buf`] for `addr`, sent
    /// from `from` (the address the question was sent to, on a wildcard socket).
    pub fn push(&mut self, addr: &libc::sockaddr_storage, len: libc::socklen_t, from: ReplyFrom) {
        if self.len == OUT {
            // `buf` was not called first: nothing was written for this answer.
            return;
        }
        self.addrs[self.len] = *addr;
        self.addr_lens[self.len] = len;
        self.froms[self.len] = from;
        self.len += 1;
    }

    /// Sends the queued answers.
    pub fn flush(&mut self) {
        let count = self.len;
        for i in 0..count {
            self.batch
                .set(i, &self.bufs[i], Some((&self.addrs[i], self.addr_lens[i])));
            if self.froms[i] != ReplyFrom::Any {
                let len = self.froms[i].write(&mut self.controls[i]);
                self.batch.set_control(i, &self.controls[i], len);
            }
        }
        // SAFETY: messages [0, count) were just pointed at `bufs`, `addrs` and
        // `controls`, which nothing changes before `send` returns.
        unsafe {
            // A full send buffer or an unreachable client: skip that answer
            // (UDP clients retry) rather than stall the loop.
            self.batch.send(self.fd, count, |_, _| OnSendError::Skip);
        }
        self.len = 0;
    }
}
