//! DNS wire format for the hot path: parse a query without allocating, turn an
//! upstream response into a reusable *template*, and finish a template for one
//! client by patching bytes in place.
//!
//! ```text
//!  query bytes ──parse_query──▶ ParsedQuery (borrowed: id, flags, qname, qtype, EDNS)
//!  upstream/local response ──make_template──▶ Template (ID 0, no OPT, lower-case
//!                                              question, offsets of every TTL)
//!  Template + ParsedQuery ──finish──▶ client response (ID, RD, question case, TTLs aged,
//!                                OPT appended when the client sent EDNS, TC when
//!                                it does not fit the client's UDP size)
//! ```
//!
//! Everything here is bounds-checked and returns `None`/`Err` on malformed input:
//! this code sees raw network bytes and must never panic.

/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// Largest UDP payload we accept from or offer to clients (RFC 6891 advice of
/// DNS flag day 2020: avoids IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// The UDP size a client without EDNS may receive (RFC 1035 4.2.1).
pub const PLAIN_UDP_LIMIT: usize = 512;
/// Longest cache key: 2 type + 2 class + 1 flags + 255 name.
pub const MAX_KEY_LEN: usize = 260;

/// Record type numbers used here.
pub mod rtype {
    /// IPv4 address.
    pub const A: u16 = 1;
    /// Name server.
    pub const NS: u16 = 2;
    /// Canonical name.
    pub const CNAME: u16 = 5;
    /// Start of authority.
    pub const SOA: u16 = 6;
    /// IPv6 address.
    pub const AAAA: u16 = 28;
    /// Service locator.
    pub const SRV: u16 = 33;
    /// EDNS pseudo-record.
    pub const OPT: u16 = 41;
    /// Zone transfer.
    pub const AXFR: u16 = 252;
    /// Incremental zone transfer.
    pub const IXFR: u16 = 251;
}

/// Response codes used here.
pub mod rcode {
    /// No error.
    pub const NOERROR: u8 = 0;
    /// Format error.
    pub const FORMERR: u8 = 1;
    /// Server failure.
    pub const SERVFAIL: u8 = 2;
    /// Name does not exist.
    pub const NXDOMAIN: u8 = 3;
    /// Not implemented.
    pub const NOTIMP: u8 = 4;
    /// Refused by policy.
    pub const REFUSED: u8 = 5;
}

const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_CD: u16 = 0x0010;
const OPCODE_MASK: u16 = 0x7800;

/// The EDNS(0) options of a query that matter to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// Advertised UDP payload size.
    pub payload: u16,
    /// The DNSSEC OK bit (copied into the response, RFC 3225).
    pub dnssec_ok: bool,
    /// EDNS version; anything but 0 gets BADVERS.
    pub version: u8,
}

/// How a query arrived, which bounds the response size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: the client's EDNS size, or 512.
    Udp,
    /// TCP: up to 65535 bytes.
    Tcp,
}

/// A parsed query borrowing the packet.
#[derive(Debug, Clone, Copy)]
pub struct ParsedQuery<'a> {
    /// The whole packet.
    pub packet: &'a [u8],
    /// Transaction ID.
    pub id: u16,
    /// Header flags word.
    pub flags: u16,
    /// The question name in wire form, as the client wrote it.
    pub qname: &'a [u8],
    /// Question type.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
    /// Offset just past the question section.
    pub question_end: usize,
    /// EDNS, when the client sent an OPT record.
    pub edns: Option<Edns>,
}

/// A [`ParsedQuery`] with its own copy of the packet, for a task to take
/// along: made from the parse, so the packet is not parsed again.
#[derive(Debug, Clone)]
pub struct OwnedQuery {
    packet: Box<[u8]>,
    /// Where the question name lies in `packet`.
    qname: std::ops::Range<usize>,
    id: u16,
    flags: u16,
    qtype: u16,
    qclass: u16,
    question_end: usize,
    edns: Option<Edns>,
}

impl OwnedQuery {
    /// The query, borrowing the copy.
    #[inline]
    pub fn get(&self) -> ParsedQuery<'_> {
        ParsedQuery {
            packet: &self.packet,
            id: self.id,
            flags: self.flags,
            qname: &self.packet[self.qname.clone()],
            qtype: self.qtype,
            qclass: self.qclass,
            question_end: self.question_end,
            edns: self.edns,
        }
    }
}

impl ParsedQuery<'_> {
    /// This query with a copy of its packet.
    pub fn to_owned_query(&self) -> OwnedQuery {
        // `qname` lies inside `packet` (both come from the parse).
        let start = self.qname.as_ptr() as usize - self.packet.as_ptr() as usize;
        OwnedQuery {
            packet: self.packet.into(),
            qname: start..start + self.qname.len(),
            id: self.id,
            flags: self.flags,
            qtype: self.qtype,
            qclass: self.qclass,
            question_end: self.question_end,
            edns: self.edns,
        }
    }
}

/// Why a packet is not an answerable query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Too short for a header, or a response: never answered (no reflection loops).
    Drop,
    /// Answer with this RCODE and the header's ID (no question echoed).
    Reply {
        /// The request's ID.
        id: u16,
        /// The request's flags word (for RD and opcode echo).
        flags: u16,
        /// The error code.
        rcode: u8,
    },
}

fn u16_at(buf: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*buf.get(pos)?, *buf.get(pos + 1)?]))
}

fn u32_at(buf: &[u8], pos: usize) -> Option<u32> {
    let b = buf.get(pos..pos + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Skips a possibly compressed name starting at `pos`; returns the offset after it.
/// Pointers are followed only to validate them, and only backwards, so a loop
/// cannot keep us busy.
pub fn skip_name(buf: &[u8], mut pos: usize) -> Option<usize> {
    let mut end = None;
    let mut total = 0usize;
    let mut hops = 0;
    loop {
        let len = *buf.get(pos)? as usize;
        match len & 0xC0 {
            0x00 => {
                if len == 0 {
                    return Some(end.unwrap_or(pos + 1));
                }
                total += len + 1;
                if total > 255 || pos + 1 + len > buf.len() {
                    return None;
                }
                pos += 1 + len;
            }
            0xC0 => {
                let target = (u16_at(buf, pos)? & 0x3FFF) as usize;
                if end.is_none() {
                    end = Some(pos + 2);
                }
                hops += 1;
                if target >= pos || hops > 64 {
                    return None;
                }
                pos = target;
            }
            _ => return None, // 0x40/0x80: obsolete label types
        }
    }
}

/// Parses a query. Only standard queries with exactly one question are answerable.
pub fn parse_query(packet: &[u8]) -> Result<ParsedQuery<'_>, Malformed> {
    if packet.len() < HEADER_LEN {
        return Err(Malformed::Drop);
    }
    let id = u16_at(packet, 0).ok_or(Malformed::Drop)?;
    let flags = u16_at(packet, 2).ok_or(Malformed::Drop)?;
    if flags & FLAG_QR != 0 {
        return Err(Malformed::Drop);
    }
    let reply = |rcode| Malformed::Reply { id, flags, rcode };
    if flags & OPCODE_MASK != 0 {
        return Err(reply(rcode::NOTIMP));
    }
    let qdcount = u16_at(packet, 4).unwrap_or(0);
    let ancount = u16_at(packet, 6).unwrap_or(0);
    let nscount = u16_at(packet, 8).unwrap_or(0);
    let arcount = u16_at(packet, 10).unwrap_or(0);
    if qdcount != 1 {
        return Err(reply(rcode::FORMERR));
    }
    // The question name must be uncompressed (nothing precedes it to point at).
    let mut pos = HEADER_LEN;
    loop {
        let len = *packet.get(pos).ok_or(reply(rcode::FORMERR))? as usize;
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 || pos + 1 + len - HEADER_LEN > 254 || pos + 1 + len > packet.len() {
            return Err(reply(rcode::FORMERR));
        }
        pos += 1 + len;
    }
    let qname = &packet[HEADER_LEN..pos];
    let qtype = u16_at(packet, pos).ok_or(reply(rcode::FORMERR))?;
    let qclass = u16_at(packet, pos + 2).ok_or(reply(rcode::FORMERR))?;
    let question_end = pos + 4;

    let mut edns = None;
    let mut pos = question_end;
    let records = ancount as usize + nscount as usize + arcount as usize;
    for index in 0..records {
        let name_at = pos;
        pos = skip_name(packet, pos).ok_or(reply(rcode::FORMERR))?;
        let rr_type = u16_at(packet, pos).ok_or(reply(rcode::FORMERR))?;
        let class = u16_at(packet, pos + 2).ok_or(reply(rcode::FORMERR))?;
        let ttl = u32_at(packet, pos + 4).ok_or(reply(rcode::FORMERR))?;
        let rdlen = u16_at(packet, pos + 8).ok_or(reply(rcode::FORMERR))? as usize;
        pos += 10 + rdlen;
        if pos > packet.len() {
            return Err(reply(rcode::FORMERR));
        }
        if rr_type == rtype::OPT {
            let in_additional = index >= ancount as usize + nscount as usize;
            // RFC 6891 6.1.1: one OPT, in ADDITIONAL, owned by the root.
            if edns.is_some() || !in_additional || packet[name_at] != 0 {
                return Err(reply(rcode::FORMERR));
            }
            edns = Some(Edns {
                payload: class,
                dnssec_ok: ttl & 0x8000 != 0,
                version: (ttl >> 16) as u8,
            });
        }
    }
    Ok(ParsedQuery {
        packet,
        id,
        flags,
        qname,
        qtype,
        qclass,
        question_end,
        edns,
    })
}

impl ParsedQuery<'_> {
    /// Recursion desired.
    pub fn rd(&self) -> bool {
        self.flags & FLAG_RD != 0
    }

    /// Checking disabled (DNSSEC).
    pub fn cd(&self) -> bool {
        self.flags & FLAG_CD != 0
    }

    /// The most this client can take over UDP (RFC 6891 6.2.5, capped to ours).
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(e) => (e.payload.clamp(512, MAX_UDP_PAYLOAD)) as usize,
            None => PLAIN_UDP_LIMIT,
        }
    }

    /// The largest response this client may get on `transport`.
    pub fn response_limit(&self, transport: Transport) -> usize {
        match transport {
            Transport::Udp => self.udp_limit(),
            Transport::Tcp => 65535,
        }
    }

    /// Writes the cache key (type, class, DO/CD flags, lower-case name) into `buf`
    /// and returns the used part. Answers differ by these, never by ID or case.
    pub fn key<'b>(&self, buf: &'b mut [u8; MAX_KEY_LEN]) -> &'b [u8] {
        buf[0..2].copy_from_slice(&self.qtype.to_be_bytes());
        buf[2..4].copy_from_slice(&self.qclass.to_be_bytes());
        buf[4] = u8::from(self.edns.is_some_and(|e| e.dnssec_ok)) | (u8::from(self.cd()) << 1);
        let n = self.qname.len();
        for (dst, src) in buf[5..5 + n].iter_mut().zip(self.qname) {
            *dst = src.to_ascii_lowercase();
        }
        &buf[..5 + n]
    }
}

/// True when wire name `name` equals `zone` or lies below it (both lower-case
/// wire form; `name` may be mixed case).
pub fn name_in_zone(name: &[u8], zone: &[u8]) -> bool {
    if zone == [0] {
        return true;
    }
    // Walk label boundaries of `name`; compare the suffix at each boundary.
    let mut pos = 0;
    while pos < name.len() {
        let rest = &name[pos..];
        if rest.len() == zone.len() {
            return rest.eq_ignore_ascii_case(zone);
        }
        if rest.len() < zone.len() {
            return false;
        }
        pos += 1 + name[pos] as usize;
    }
    false
}

/// True when `name` (wire format, in `zone`) is a Consul service name:
/// `<labels>.service.<zone>` or, in a named datacenter,
/// `<labels>.service.<dc>.<zone>` (Consul's `[tag.]name.service[.dc].domain`).
pub fn is_service_name(name: &[u8], zone: &[u8]) -> bool {
    if !name_in_zone(name, zone) {
        return false;
    }
    // The labels before the zone: at most 127 in a valid name.
    let prefix = name.len() - zone.len();
    let mut starts = [0usize; 128];
    let (mut n, mut pos) = (0, 0);
    while pos < prefix && n < starts.len() {
        starts[n] = pos;
        n += 1;
        pos += 1 + name[pos] as usize;
    }
    let is_service = |i: usize| {
        let at = starts[i];
        let len = name[at] as usize;
        name.get(at + 1..at + 1 + len)
            .is_some_and(|l| l.eq_ignore_ascii_case(b"service"))
    };
    (n >= 2 && is_service(n - 1)) || (n >= 3 && is_service(n - 2))
}

/// A response made reusable: ID 0, no OPT record, lower-case question, and the
/// offset of every TTL so it can be aged.
#[derive(Debug, Clone)]
pub struct Template {
    /// Response bytes.
    pub wire: Box<[u8]>,
    /// Offsets of the 32-bit TTL fields.
    pub ttl_offsets: Box<[u16]>,
    /// Response code (low 4 bits).
    pub rcode: u8,
    /// Records in the answer section.
    pub answers: u16,
    /// Smallest TTL in the answer section (positive answers).
    pub min_answer_ttl: Option<u32>,
    /// RFC 2308 negative TTL: min(SOA TTL, SOA MINIMUM) from the authority section.
    pub negative_ttl: Option<u32>,
}

/// Builds a [`Template`] from a full response. `None` when it does not parse or has
/// no single question.
pub fn make_template(resp: &[u8]) -> Option<Template> {
    let mut wire = Vec::with_capacity(resp.len());
    let mut ttl_offsets = Vec::new();
    let meta = make_template_into(resp, &mut wire, &mut ttl_offsets)?;
    Some(Template {
        wire: wire.into_boxed_slice(),
        ttl_offsets: ttl_offsets.into_boxed_slice(),
        rcode: meta.rcode,
        answers: meta.answers,
        min_answer_ttl: meta.min_answer_ttl,
        negative_ttl: meta.negative_ttl,
    })
}

/// What [`make_template_into`] learnt about a response besides its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateMeta {
    /// Response code (low 4 bits).
    pub rcode: u8,
    /// Records in the answer section.
    pub answers: u16,
    /// Smallest TTL in the answer section.
    pub min_answer_ttl: Option<u32>,
    /// RFC 2308 negative TTL.
    pub negative_ttl: Option<u32>,
}

/// [`make_template`] into caller-owned buffers (cleared first), which keep
/// their capacity: the UDP workers' Consul answers allocate nothing.
pub fn make_template_into(resp: &[u8], wire: &mut Vec<u8>, ttl_offsets: &mut Vec<u16>) -> Option<TemplateMeta> {
    wire.clear();
    ttl_offsets.clear();
    if resp.len() < HEADER_LEN {
        return None;
    }
    let qd = u16_at(resp, 4)?;
    let an = u16_at(resp, 6)?;
    let ns = u16_at(resp, 8)?;
    let ar = u16_at(resp, 10)?;
    if qd != 1 {
        return None;
    }
    let qname_end = skip_name(resp, HEADER_LEN)?;
    let question_end = qname_end + 4;
    if question_end > resp.len() {
        return None;
    }
    wire.extend_from_slice(&resp[..question_end]);
    let mut min_answer_ttl: Option<u32> = None;
    let mut negative_ttl = None;
    let mut opt_seen = 0u16;
    let mut pos = question_end;
    let (an, ns, ar) = (an as usize, ns as usize, ar as usize);
    let total = an + ns + ar;
    for index in 0..total {
        let start = pos;
        pos = skip_name(resp, pos)?;
        let rr_type = u16_at(resp, pos)?;
        let ttl = u32_at(resp, pos + 4)?;
        let rdlen = u16_at(resp, pos + 8)? as usize;
        let rdata = pos + 10;
        let end = rdata + rdlen;
        if end > resp.len() {
            return None;
        }
        if rr_type == rtype::OPT {
            // RFC 6891 6.1.1: one OPT, in ADDITIONAL. Anywhere else the reply is
            // malformed; not last, dropping it could break later compression
            // pointers, so that (legal, rare) layout is re-encoded instead.
            if index < an + ns || opt_seen > 0 {
                return None;
            }
            if index + 1 != total {
                return make_template_into(&reencode_without_opt(resp)?, wire, ttl_offsets);
            }
            opt_seen += 1;
            pos = end;
            continue;
        }
        let ttl_at = wire.len() + (pos + 4 - start);
        ttl_offsets.push(u16::try_from(ttl_at).ok()?);
        if index < an {
            min_answer_ttl = Some(min_answer_ttl.map_or(ttl, |m| m.min(ttl)));
        } else if index < an + ns && rr_type == rtype::SOA && rdlen >= 20 {
            let minimum = u32_at(resp, end - 4)?;
            negative_ttl = Some(ttl.min(minimum));
        }
        // Copying a record keeps its compression pointers valid: everything
        // before it is copied verbatim and only a final OPT is left out.
        wire.extend_from_slice(&resp[start..end]);
        pos = end;
    }
    wire[0] = 0;
    wire[1] = 0;
    let ar_left = (ar - usize::from(opt_seen)) as u16;
    wire[10..12].copy_from_slice(&ar_left.to_be_bytes());
    for b in &mut wire[HEADER_LEN..qname_end] {
        b.make_ascii_lowercase();
    }
    Some(TemplateMeta {
        rcode: resp[3] & 0x0F,
        answers: an as u16,
        min_answer_ttl,
        negative_ttl,
    })
}

/// The same response without its OPT record, re-encoded by hickory.
fn reencode_without_opt(resp: &[u8]) -> Option<Vec<u8>> {
    let mut message = hickory_proto::op::Message::from_vec(resp).ok()?;
    message.edns = None;
    message.to_vec().ok()
}

/// How the TTLs of a template are rewritten for one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtlRewrite {
    /// As stored (local answers).
    Keep,
    /// Minus the seconds the answer has been cached, never below 0.
    Age(u32),
    /// Every TTL set to this value (stale answers, RFC 8767 suggests 30 s).
    Fixed(u32),
}

/// Finishes `template` for the client that sent `query` into `out`; `limit` is the
/// largest response the transport allows (UDP size or 65535 for TCP).
pub fn finish(template: &Template, query: &ParsedQuery<'_>, ttl: TtlRewrite, limit: usize, out: &mut Vec<u8>) {
    finish_parts(&template.wire, &template.ttl_offsets, query, ttl, limit, out);
}

/// [`finish`] from a template's parts (as [`make_template_into`] leaves them).
pub fn finish_parts(
    wire: &[u8],
    ttl_offsets: &[u16],
    query: &ParsedQuery<'_>,
    ttl: TtlRewrite,
    limit: usize,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(wire);
    out[0..2].copy_from_slice(&query.id.to_be_bytes());
    // Echo RD and CD; we always offer recursion; the template carries QR, AA, RCODE.
    let mut flags = u16::from_be_bytes([out[2], out[3]]) & !(FLAG_RD | FLAG_CD | FLAG_TC);
    flags |= (query.flags & (FLAG_RD | FLAG_CD)) | FLAG_RA;
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    // Echo the client's spelling of the question (0x20 randomisation).
    let qn = query.qname.len();
    if out.len() >= HEADER_LEN + qn {
        out[HEADER_LEN..HEADER_LEN + qn].copy_from_slice(query.qname);
    }
    match ttl {
        TtlRewrite::Keep => {}
        TtlRewrite::Age(0) => {}
        TtlRewrite::Age(elapsed) => {
            for &off in ttl_offsets.iter() {
                let off = off as usize;
                if let Some(field) = out.get_mut(off..off + 4) {
                    let t = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
                    field.copy_from_slice(&t.saturating_sub(elapsed).to_be_bytes());
                }
            }
        }
        TtlRewrite::Fixed(value) => {
            for &off in ttl_offsets.iter() {
                let off = off as usize;
                if let Some(field) = out.get_mut(off..off + 4) {
                    field.copy_from_slice(&value.to_be_bytes());
                }
            }
        }
    }
    let opt_len = if query.edns.is_some() { 11 } else { 0 };
    if out.len() + opt_len > limit {
        // RFC 2181 9: set TC and send what certainly fits: header and question.
        let question_end = HEADER_LEN + qn + 4;
        out.truncate(question_end.min(out.len()));
        out[6..12].fill(0);
        let flags = u16::from_be_bytes([out[2], out[3]]) | FLAG_TC;
        out[2..4].copy_from_slice(&flags.to_be_bytes());
    }
    if let Some(edns) = query.edns {
        push_opt(out, edns.dnssec_ok, 0);
    }
}

/// Appends our OPT record (payload [`MAX_UDP_PAYLOAD`]) and counts it.
fn push_opt(out: &mut Vec<u8>, dnssec_ok: bool, extended_rcode: u8) {
    out.push(0); // root owner
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&MAX_UDP_PAYLOAD.to_be_bytes());
    out.push(extended_rcode);
    out.push(0); // version
    out.push(if dnssec_ok { 0x80 } else { 0 });
    out.push(0);
    out.extend_from_slice(&[0, 0]); // no options
    let ar = u16::from_be_bytes([out[10], out[11]]).wrapping_add(1);
    out[10..12].copy_from_slice(&ar.to_be_bytes());
}

/// An error response echoing the question of a parsed query (RFC 1035 4.1.1).
/// BADVERS (16) is expressed through the OPT extended RCODE (RFC 6891 6.1.3).
pub fn error_response(query: &ParsedQuery<'_>, rcode: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&query.packet[..query.question_end]);
    let flags = FLAG_QR | FLAG_RA | (query.flags & (FLAG_RD | FLAG_CD)) | (rcode & 0x0F);
    out[2..4].copy_from_slice(&flags.to_be_bytes());
    out[4..6].copy_from_slice(&1u16.to_be_bytes());
    out[6..12].fill(0);
    if let Some(edns) = query.edns {
        push_opt(out, edns.dnssec_ok, (rcode >> 4) as u8);
    }
}

/// A header-only error response for packets whose question could not be read.
pub fn header_error(id: u16, request_flags: u16, rcode: u8, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    let flags = FLAG_QR | FLAG_RA | (request_flags & (OPCODE_MASK | FLAG_RD)) | u16::from(rcode & 0x0F);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
}

/// Builds the query we send upstream for `query`'s question: our `id`, the name
/// with every letter's case drawn at random (0x20, draft-vixie-dnsext-dns0x20:
/// a spoofer must guess those bits too, see [`answers_question`]), RD as asked,
/// and our own OPT with the client's DO bit.
pub fn upstream_query(query: &ParsedQuery<'_>, id: u16, recursion: bool, payload: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    let flags = if recursion { FLAG_RD } else { 0 } | (query.flags & FLAG_CD);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    // Length octets are at most 63, below every letter, so only label bytes
    // change case.
    let mut bits = 0u64;
    let mut left = 0u32;
    out.extend(query.qname.iter().map(|&b| {
        let b = b.to_ascii_lowercase();
        if !b.is_ascii_lowercase() {
            return b;
        }
        if left == 0 {
            bits = rand::random();
            left = 64;
        }
        left -= 1;
        let upper = bits & 1 == 1;
        bits >>= 1;
        if upper { b.to_ascii_uppercase() } else { b }
    }));
    out.extend_from_slice(&query.qtype.to_be_bytes());
    out.extend_from_slice(&query.qclass.to_be_bytes());
    out.push(0);
    out.extend_from_slice(&rtype::OPT.to_be_bytes());
    out.extend_from_slice(&payload.to_be_bytes());
    let dnssec_ok = query.edns.is_some_and(|e| e.dnssec_ok);
    out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
}

/// True when `resp` answers the question in `request`: same ID, QR set, one
/// question equal to ours byte for byte, the 0x20 case included. A check
/// against spoofed or stray datagrams: servers echo the question as asked
/// (RFC 1035 4.1.1; Consul, unbound, BIND and dnsmasq do), a forger who did
/// not see it must guess ID and case.
pub fn answers_question(request: &[u8], resp: &[u8]) -> bool {
    if resp.len() < HEADER_LEN || request.len() < HEADER_LEN || resp[0..2] != request[0..2] {
        return false;
    }
    if resp[2] & 0x80 == 0 {
        return false;
    }
    let Some(req_end) = skip_name(request, HEADER_LEN).map(|e| e + 4) else {
        return false;
    };
    let Some(resp_q) = resp.get(HEADER_LEN..req_end) else {
        return false;
    };
    u16_at(resp, 4) == Some(1) && resp_q == &request[HEADER_LEN..req_end]
}

/// The TC bit of a response.
pub fn is_truncated(resp: &[u8]) -> bool {
    resp.len() > 2 && u16::from_be_bytes([resp[2], resp[3]]) & FLAG_TC != 0
}

/// A name in lower-case, uncompressed wire form (for zone membership checks).
pub fn name_to_wire(name: &hickory_proto::rr::Name) -> Vec<u8> {
    use hickory_proto::serialize::binary::BinEncodable;
    name.to_lowercase().to_bytes().unwrap_or_else(|_| vec![0])
}

/// Renders a wire name as text (`web.service.consul.`), for logs and tests.
pub fn name_to_string(name: &[u8]) -> String {
    let mut s = String::new();
    let mut pos = 0;
    while let Some(&len) = name.get(pos) {
        if len == 0 {
            break;
        }
        let label = name.get(pos + 1..pos + 1 + len as usize).unwrap_or_default();
        s.push_str(&String::from_utf8_lossy(label));
        s.push('.');
        pos += 1 + len as usize;
    }
    if s.is_empty() { ".".into() } else { s }
}

#[cfg(test)]
mod tests {
    #[test]
    fn service_names_in_this_or_another_datacenter() {
        let wire = |n: &str| name_to_wire(&Name::from_ascii(n).unwrap());
        let zone = wire("consul.");
        for yes in [
            "web.service.consul.",
            "v1.web.service.consul.",
            "web.Service.dc2.consul.",
        ] {
            assert!(is_service_name(&wire(yes), &zone), "{yes}");
        }
        for no in [
            "service.consul.",
            "service.dc1.consul.",
            "web.node.consul.",
            "web.service.dc1.x.consul.",
            "web.service.example.com.",
            "consul.",
        ] {
            assert!(!is_service_name(&wire(no), &zone), "{no}");
        }
    }

    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery};
    use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::A};
    use std::str::FromStr;

    fn query_bytes(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(Name::from_str(name).unwrap(), rtype));
        if edns {
            let mut e = hickory_proto::op::Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// A query taken along by a task is the same query, without parsing again.
    #[test]
    fn an_owned_query_is_the_parsed_one() {
        let packet = query_bytes("Web.Service.Consul.", RecordType::SRV, true);
        let parsed = parse_query(&packet).unwrap();
        let owned = parsed.to_owned_query();
        drop(packet);
        let back = owned.get();
        let again = query_bytes("Web.Service.Consul.", RecordType::SRV, true);
        let want = parse_query(&again).unwrap();
        assert_eq!(back.packet, want.packet);
        assert_eq!(back.qname, want.qname);
        assert_eq!(
            (
                back.id,
                back.flags,
                back.qtype,
                back.qclass,
                back.question_end,
                back.edns
            ),
            (
                want.id,
                want.flags,
                want.qtype,
                want.qclass,
                want.question_end,
                want.edns
            )
        );
    }

    #[test]
    fn parses_a_plain_query_and_edns() {
        let mut bytes = query_bytes("web.service.consul.", RecordType::SRV, true);
        bytes[13] = b'W'; // hickory encodes lower case; clients may not (0x20)
        let q = parse_query(&bytes).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.qtype, 33);
        assert_eq!(name_to_string(q.qname), "Web.service.consul.");
        assert_eq!(q.edns.unwrap().payload, 4096);
        assert_eq!(q.udp_limit(), MAX_UDP_PAYLOAD as usize);
        let mut buf = [0u8; MAX_KEY_LEN];
        let key = q.key(&mut buf).to_vec();
        let other = query_bytes("web.service.consul.", RecordType::SRV, true);
        let q2 = parse_query(&other).unwrap();
        assert_eq!(key, q2.key(&mut buf));
        assert_eq!(
            parse_query(&query_bytes("a.", RecordType::A, false))
                .unwrap()
                .udp_limit(),
            512
        );
    }

    #[test]
    fn malformed_packets_never_panic() {
        assert_eq!(parse_query(&[]).unwrap_err(), Malformed::Drop);
        assert_eq!(parse_query(&[0; 11]).unwrap_err(), Malformed::Drop);
        // zero questions
        assert!(matches!(
            parse_query(&[0; 12]).unwrap_err(),
            Malformed::Reply { rcode: 1, .. }
        ));
        // label longer than the packet
        let mut p = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 50, b'a'];
        assert!(matches!(
            parse_query(&p).unwrap_err(),
            Malformed::Reply { rcode: 1, .. }
        ));
        // compression pointer loop in the additional section
        p = query_bytes("a.", RecordType::A, false);
        p[11] = 1;
        p.extend_from_slice(&[0xC0, 0x1d, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]);
        let _ = parse_query(&p);
        // random bytes
        let mut x: u32 = 12345;
        for len in 0..600 {
            let pkt: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                    (x >> 24) as u8
                })
                .collect();
            let _ = parse_query(&pkt);
            let _ = make_template(&pkt);
            let _ = skip_name(&pkt, 0);
        }
    }

    #[test]
    fn oversized_labels_and_names_are_formerr() {
        let mut p = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 64];
        p.extend_from_slice(&[b'a'; 64]);
        p.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(matches!(
            parse_query(&p).unwrap_err(),
            Malformed::Reply { rcode: 1, .. }
        ));
        let mut p = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..5 {
            p.push(63);
            p.extend_from_slice(&[b'a'; 63]);
        }
        p.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(matches!(
            parse_query(&p).unwrap_err(),
            Malformed::Reply { rcode: 1, .. }
        ));
    }

    #[test]
    fn responses_and_opcodes_are_not_answered_as_queries() {
        let mut p = query_bytes("a.", RecordType::A, false);
        p[2] |= 0x80;
        assert_eq!(parse_query(&p).unwrap_err(), Malformed::Drop);
        p[2] = 0x28; // UPDATE
        assert!(matches!(
            parse_query(&p).unwrap_err(),
            Malformed::Reply { rcode: 4, .. }
        ));
    }

    fn response(name: &str, ttl: u32, count: usize) -> Vec<u8> {
        let mut m = Message::new(0x9999, MessageType::Response, OpCode::Query);
        let n = Name::from_str(name).unwrap();
        m.add_query(HQuery::query(n.clone(), RecordType::A));
        for i in 0..count {
            m.add_answer(Record::from_rdata(n.clone(), ttl, RData::A(A::new(10, 0, 0, i as u8))));
        }
        let mut e = hickory_proto::op::Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
        m.to_vec().unwrap()
    }

    #[test]
    fn template_strips_opt_and_finishes_per_client() {
        let t = make_template(&response("WWW.example.org.", 300, 2)).unwrap();
        assert_eq!(t.min_answer_ttl, Some(300));
        assert_eq!(t.ttl_offsets.len(), 2);
        assert_eq!(u16::from_be_bytes([t.wire[10], t.wire[11]]), 0);
        let mut qb = query_bytes("www.example.org.", RecordType::A, true);
        qb[17..24].copy_from_slice(b"EXAMPLE");
        let q = parse_query(&qb).unwrap();
        let mut out = Vec::new();
        finish(&t, &q, TtlRewrite::Age(100), 4096, &mut out);
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries[0].name().to_string(), "www.EXAMPLE.org.");
        assert_eq!(m.answers.len(), 2);
        assert_eq!(m.answers[0].ttl, 200);
        assert!(m.edns.is_some());
        // A stale rewrite pins every TTL.
        finish(&t, &q, TtlRewrite::Fixed(30), 4096, &mut out);
        assert_eq!(Message::from_vec(&out).unwrap().answers[1].ttl, 30);
    }

    #[test]
    fn too_big_for_the_client_sets_tc_and_keeps_the_question() {
        let t = make_template(&response("big.example.", 60, 40)).unwrap();
        let qb = query_bytes("big.example.", RecordType::A, false);
        let q = parse_query(&qb).unwrap();
        let mut out = Vec::new();
        finish(&t, &q, TtlRewrite::Keep, q.udp_limit(), &mut out);
        let m = Message::from_vec(&out).unwrap();
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
        finish(&t, &q, TtlRewrite::Keep, 65535, &mut out);
        assert_eq!(Message::from_vec(&out).unwrap().answers.len(), 40);
    }

    #[test]
    fn zone_membership_is_by_label() {
        let zone = b"\x06consul\x00";
        assert!(name_in_zone(b"\x03web\x07service\x06Consul\x00", zone));
        assert!(name_in_zone(b"\x06consul\x00", zone));
        assert!(!name_in_zone(b"\x08myconsul\x00", zone));
        assert!(!name_in_zone(b"\x03com\x00", zone));
        assert!(name_in_zone(b"\x03com\x00", b"\x00"));
    }

    #[test]
    fn upstream_query_round_trips_and_answer_check() {
        let qb = query_bytes("Web.Service.Consul.", RecordType::SRV, false);
        let q = parse_query(&qb).unwrap();
        let mut up = Vec::new();
        upstream_query(&q, 7, false, 4096, &mut up);
        let parsed = parse_query(&up).unwrap();
        assert_eq!(parsed.id, 7);
        assert_eq!(name_to_string(parsed.qname).to_ascii_lowercase(), "web.service.consul.");
        assert_eq!(parsed.edns.unwrap().payload, 4096);
        let mut resp = up.clone();
        resp[2] |= 0x80;
        assert!(answers_question(&up, &resp));
        resp[1] = 8;
        assert!(!answers_question(&up, &resp));
    }

    #[test]
    fn upstream_names_carry_random_case_and_answers_must_echo_it() {
        let name = "abcdefghijklmnopqrstuvwxyz.abcdefghijklmnopqrstuvwxyz.abcdefghijklmnopqrstuvwxyz.example.";
        let qb = query_bytes(name, RecordType::A, false);
        let q = parse_query(&qb).unwrap();
        let mut spellings = std::collections::HashSet::new();
        let mut up = Vec::new();
        for _ in 0..8 {
            upstream_query(&q, 7, true, 1232, &mut up);
            let parsed = parse_query(&up).unwrap();
            let spelled = name_to_string(parsed.qname);
            assert_eq!(spelled.to_ascii_lowercase(), name, "only the case changes");
            spellings.insert(spelled);
        }
        assert!(spellings.len() > 1, "the case is drawn per query: {spellings:?}");
        // The same question in another case is not an answer to ours.
        let mut resp = up.clone();
        resp[2] |= 0x80;
        assert!(answers_question(&up, &resp));
        let at = HEADER_LEN + 1;
        resp[at] ^= 0x20;
        assert!(!answers_question(&up, &resp), "a case-flipped echo is refused");
        // Digits and hyphens are sent as they are.
        let qb = query_bytes("123-45.", RecordType::A, false);
        upstream_query(&parse_query(&qb).unwrap(), 1, true, 1232, &mut up);
        assert_eq!(&up[HEADER_LEN..HEADER_LEN + 8], b"\x06123-45\x00");
    }
}
