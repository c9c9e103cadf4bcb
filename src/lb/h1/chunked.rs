//! The chunked transfer coding (RFC 9112 §7.1), decoded incrementally and
//! strictly: sizes of at most 16 hex digits, chunk extensions bounded and
//! skipped, every line ended by CRLF (a bare LF or a stray byte is an error),
//! trailer fields bounded and skipped.
//!
//! ```text
//!  bytes as they arrive ─▶ Decoder::step ─▶ Step { consumed, data range, done }
//!  (the caller forwards each data range, then steps on from `consumed`)
//! ```

use std::ops::Range;

/// Hex digits a chunk size may have.
const MAX_SIZE_DIGITS: u8 = 16;

/// Bytes of chunk extensions one size line may carry.
const MAX_EXTENSION_BYTES: u32 = 4096;

/// Bytes of trailer fields a body may end with.
const MAX_TRAILER_BYTES: u32 = 16 * 1024;

/// What is wrong with a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A size that is no hex number, or too long.
    #[error("a malformed chunk size")]
    Size,
    /// A line not ended by CRLF, or data not followed by CRLF.
    #[error("a chunk line not ended by CRLF")]
    LineEnd,
    /// Chunk extensions or trailers beyond their bounds, or control bytes in them.
    #[error("chunk extensions or trailer fields too large or malformed")]
    Extra,
}

/// One step of decoding: `consumed` bytes of the input are used up; `data`
/// (within them) is body data to pass on; `done` once the last chunk and the
/// trailers are read (the bytes after `consumed` are the next message's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input used up.
    pub consumed: usize,
    /// Body data within them.
    pub data: Option<Range<usize>>,
    /// The body has ended.
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the size's hex digits.
    Size { digits: u8, value: u64 },
    /// After the size: extensions until CR.
    Extension { bytes: u32, value: u64 },
    /// CR seen at the end of a size line; LF next.
    SizeLf { value: u64 },
    /// Inside a chunk's data.
    Data { remaining: u64 },
    /// After a chunk's data: CR next.
    DataCr,
    /// After a chunk's data: LF next.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// CR seen at the end of a trailer line; LF next.
    TrailerLf { empty: bool },
    /// The body has ended.
    Done,
}

/// An incremental decoder of one chunked body.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
    trailer_bytes: u32,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self {
            state: State::Size { digits: 0, value: 0 },
            trailer_bytes: 0,
        }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from the start of `input` until a data range is found, the
    /// input is used up, or the body ends.
    pub fn step(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let mut at = 0;
        while at < input.len() {
            let b = input[at];
            self.state = match self.state {
                State::Done => break,
                State::Data { remaining } => {
                    let available = (input.len() - at) as u64;
                    let take = remaining.min(available) as usize;
                    let data = at..at + take;
                    self.state = if take as u64 == remaining {
                        State::DataCr
                    } else {
                        State::Data {
                            remaining: remaining - take as u64,
                        }
                    };
                    return Ok(Step {
                        consumed: at + take,
                        data: Some(data),
                        done: false,
                    });
                }
                State::Size { digits, value } => match hex(b) {
                    Some(d) if digits < MAX_SIZE_DIGITS => State::Size {
                        digits: digits + 1,
                        value: value << 4 | u64::from(d),
                    },
                    Some(_) => return Err(ChunkError::Size),
                    None if digits == 0 => return Err(ChunkError::Size),
                    None if b == b'\r' => State::SizeLf { value },
                    None if b == b';' || b == b' ' || b == b'\t' => State::Extension { bytes: 1, value },
                    None => return Err(ChunkError::Size),
                },
                State::Extension { bytes, value } => match b {
                    b'\r' => State::SizeLf { value },
                    _ if bytes >= MAX_EXTENSION_BYTES => return Err(ChunkError::Extra),
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => State::Extension {
                        bytes: bytes + 1,
                        value,
                    },
                    _ => return Err(ChunkError::Extra),
                },
                State::SizeLf { value } => match b {
                    b'\n' if value == 0 => State::TrailerStart,
                    b'\n' => State::Data { remaining: value },
                    _ => return Err(ChunkError::LineEnd),
                },
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(ChunkError::LineEnd),
                },
                State::DataLf => match b {
                    b'\n' => State::Size { digits: 0, value: 0 },
                    _ => return Err(ChunkError::LineEnd),
                },
                State::TrailerStart => match b {
                    b'\r' => State::TrailerLf { empty: true },
                    _ => self.trailer_byte(b)?,
                },
                State::Trailer => match b {
                    b'\r' => State::TrailerLf { empty: false },
                    _ => self.trailer_byte(b)?,
                },
                State::TrailerLf { empty } => match b {
                    b'\n' if empty => {
                        self.state = State::Done;
                        return Ok(Step {
                            consumed: at + 1,
                            data: None,
                            done: true,
                        });
                    }
                    b'\n' => State::TrailerStart,
                    _ => return Err(ChunkError::LineEnd),
                },
            };
            at += 1;
        }
        Ok(Step {
            consumed: at,
            data: None,
            done: self.state == State::Done,
        })
    }

    /// One byte of a trailer line (not CR): bounded, no control bytes.
    fn trailer_byte(&mut self, b: u8) -> Result<State, ChunkError> {
        self.trailer_bytes += 1;
        if self.trailer_bytes > MAX_TRAILER_BYTES {
            return Err(ChunkError::Extra);
        }
        match b {
            b'\n' => Err(ChunkError::LineEnd),
            b'\t' | 0x20..=0x7e | 0x80..=0xff => Ok(State::Trailer),
            _ => Err(ChunkError::Extra),
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `body` fed in pieces of `piece` bytes: the data and the bytes
    /// left after the body.
    fn decode(body: &[u8], piece: usize) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut d = Decoder::new();
        let mut data = Vec::new();
        let mut at = 0;
        while at < body.len() {
            let end = (at + piece).min(body.len());
            let mut from = at;
            while from < end {
                let step = d.step(&body[from..end])?;
                if let Some(r) = step.data {
                    data.extend_from_slice(&body[from + r.start..from + r.end]);
                }
                from += step.consumed;
                if step.done {
                    return Ok((data, body.len() - from));
                }
                if step.consumed == 0 {
                    break;
                }
            }
            at = end;
        }
        Err(ChunkError::LineEnd)
    }

    #[test]
    fn bodies_decode_in_any_pieces() {
        let body = b"5\r\nhello\r\n1;ext=\"a b\"\r\n \r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, body.len()] {
            let (data, left) = decode(body, piece).unwrap();
            assert_eq!(data, b"hello 0123456789", "pieces of {piece}");
            assert_eq!(left, 4, "the next message stays unread");
        }
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for (body, want) in [
            (&b"x\r\n"[..], ChunkError::Size),
            (b"\r\n", ChunkError::Size),
            (b"-5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"0x5\r\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"11111111111111111\r\n", ChunkError::Size),
            (b"5\nhello\r\n0\r\n\r\n", ChunkError::Size),
            (b"5\r\nhello\n0\r\n\r\n", ChunkError::LineEnd),
            (b"5\r\nhelloX\r\n0\r\n\r\n", ChunkError::LineEnd),
            (b"0\r\n\n", ChunkError::LineEnd),
            (b"0\r\nA: b\n\r\n", ChunkError::LineEnd),
            (b"5;\x00\r\n", ChunkError::Extra),
        ] {
            assert_eq!(
                decode(body, body.len()),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let long_ext = [&b"1;"[..], &[b'a'; 5000], b"\r\nx\r\n0\r\n\r\n"].concat();
        assert_eq!(decode(&long_ext, 512), Err(ChunkError::Extra));
        let long_trailer = [&b"0\r\nT: "[..], &[b'a'; 20_000], b"\r\n\r\n"].concat();
        assert_eq!(decode(&long_trailer, 512), Err(ChunkError::Extra));
    }

    #[test]
    fn the_largest_size_is_sixteen_digits() {
        let mut d = Decoder::new();
        let step = d.step(b"ffffffffffffffff\r\nab").unwrap();
        assert_eq!(step.data, Some(18..20));
        assert!(!d.is_done());
    }
}
