//! Fuzzes `lockguard::frame::FrameScanner`: however a byte stream is split into reads, the
//! scanner must report the same messages and the same error as when it is fed whole, and both
//! must agree with a simple whole-buffer model of the framing rules.
//!
//! Input layout (so seeds can be written by hand):
//! - byte 0: bit 0 picks the direction (0 = client → server interests, 1 = server → client);
//! - byte 1: number of cut points `k` (taken modulo 64);
//! - next `2k` bytes: cut points, big-endian u16, each taken modulo `stream.len() + 1`;
//! - the rest: the stream.

use lockguard::frame::{FrameError, FrameScanner, Interests, CLIENT_INTERESTS, SERVER_INTERESTS};

/// What the scanner reported: each message (tag, body length, captured prefix), then how the
/// stream ended (`Ok(at_boundary)` or the error).
type Report = (Vec<(u8, u32, Vec<u8>)>, Result<bool, FrameError>);

fn scan(interests: &'static Interests, parts: &[&[u8]]) -> Report {
    let mut scanner = FrameScanner::new(interests);
    let mut seen = Vec::new();
    for part in parts {
        let fed = scanner.feed(part, |m| {
            assert!(m.body_prefix.len() <= m.body_len as usize);
            seen.push((m.tag, m.body_len, m.body_prefix.to_vec()))
        });
        if let Err(e) = fed {
            return (seen, Err(e));
        }
    }
    (seen, Ok(scanner.at_boundary()))
}

/// How many body bytes the scanner captures for `tag` (`None`: skipped). Written out here, not
/// read from the scanner, so the model is an independent statement of what the proxy needs: if
/// the scanner's tables change on purpose, change these with them.
fn capture_size(server: bool, tag: u8) -> Option<u32> {
    const STATEMENT: u32 = 1024 + 128;
    if server {
        match tag {
            b'K' => Some(4 + 256),
            b'Z' => Some(1),
            b'E' => Some(64),
            _ => None,
        }
    } else {
        match tag {
            b'Q' | b'P' => Some(STATEMENT),
            b'E' | b'S' | b'F' | b'c' | b'f' | b'X' => Some(0),
            _ => None,
        }
    }
}

/// The framing rules over a whole buffer: 5-byte headers, lengths 4..=1 GiB + 4, interesting
/// messages reported once their capture (capped at the body length) has arrived.
fn model(server: bool, stream: &[u8]) -> Report {
    let mut seen = Vec::new();
    let mut at = 0;
    while stream.len() - at >= 5 {
        let tag = stream[at];
        let length = u32::from_be_bytes([
            stream[at + 1],
            stream[at + 2],
            stream[at + 3],
            stream[at + 4],
        ]);
        if !(4..=0x4000_0004).contains(&length) {
            return (seen, Err(FrameError { tag, length }));
        }
        let body_len = length - 4;
        let body = &stream[at + 5..];
        if let Some(capture) = capture_size(server, tag) {
            let want = capture.min(body_len) as usize;
            if body.len() >= want {
                seen.push((tag, body_len, body[..want].to_vec()));
            }
        }
        if (body.len() as u64) < u64::from(body_len) {
            return (seen, Ok(false));
        }
        at += 5 + body_len as usize;
    }
    (seen, Ok(at == stream.len()))
}

/// The checks for one fuzz input.
pub fn check(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let server = data[0] & 1 == 1;
    let interests: &'static Interests = if server {
        &SERVER_INTERESTS
    } else {
        &CLIENT_INTERESTS
    };
    let k = (data[1] % 64) as usize;
    let Some(cut_bytes) = data.get(2..2 + 2 * k) else {
        return;
    };
    let stream = &data[2 + 2 * k..];
    let mut cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as usize % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut parts = Vec::with_capacity(k + 1);
    let mut from = 0;
    for cut in cuts {
        parts.push(&stream[from..cut]);
        from = cut;
    }
    parts.push(&stream[from..]);

    let whole = scan(interests, &[stream]);
    let split = scan(interests, &parts);
    assert_eq!(
        whole,
        split,
        "split at {:?}",
        parts.iter().map(|p| p.len()).collect::<Vec<_>>()
    );
    let one_by_one: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(whole, scan(interests, &one_by_one), "fed byte by byte");
    assert_eq!(whole, model(server, stream), "the framing rules");
}
