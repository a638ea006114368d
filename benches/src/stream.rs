//! A realistic server → client byte stream, the input of the frame-scanner benchmarks.
//!
//! What a proxy in front of an OLTP application mostly forwards is query results: a
//! RowDescription, DataRows (many small ones, the odd wide one), CommandComplete and
//! ReadyForQuery, with ParseComplete/BindComplete in front when the client uses the extended
//! protocol. The generator mixes point lookups (one row) with listings (up to a few hundred
//! rows), and column values from a few bytes (integers, NULLs) to a couple of KiB (JSON, text
//! blobs). It is deterministic, so every run scans the same bytes.

use lockguard::protocol::backend as tag;
use lockguard::protocol::put_message;

/// What a generated stream contains, to report alongside the throughput.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub bytes: usize,
    pub messages: usize,
    pub data_rows: usize,
}

impl StreamStats {
    /// Mean message size in bytes (header included).
    pub fn mean_message_len(&self) -> f64 {
        self.bytes as f64 / self.messages.max(1) as f64
    }
}

/// Generates at least `min_len` bytes of whole query results (the stream ends at a message
/// boundary, after a ReadyForQuery).
pub fn server_stream(min_len: usize, seed: u64) -> (Vec<u8>, StreamStats) {
    let mut rng = XorShift(seed | 1);
    let mut out = Vec::with_capacity(min_len + 64 * 1024);
    let mut stats = StreamStats::default();
    let mut value = Vec::new();
    while out.len() < min_len {
        if rng.below(2) == 0 {
            put(&mut out, &mut stats, tag::PARSE_COMPLETE, &[]);
            put(&mut out, &mut stats, tag::BIND_COMPLETE, &[]);
        }
        let columns = 2 + rng.below(9) as usize;
        put(
            &mut out,
            &mut stats,
            tag::ROW_DESCRIPTION,
            &row_description(columns),
        );
        // 60 % point lookups, 30 % short listings, 10 % long listings.
        let rows = match rng.below(10) {
            0..=5 => 1,
            6..=8 => 2 + rng.below(30),
            _ => 50 + rng.below(300),
        };
        for _ in 0..rows {
            value.clear();
            value.extend_from_slice(&(columns as i16).to_be_bytes());
            for _ in 0..columns {
                let len = column_len(&mut rng);
                value.extend_from_slice(&len.to_be_bytes());
                for _ in 0..len.max(0) {
                    value.push(b'a' + rng.below(26) as u8);
                }
            }
            put(&mut out, &mut stats, tag::DATA_ROW, &value);
            stats.data_rows += 1;
        }
        let complete = format!("SELECT {rows}\0");
        put(
            &mut out,
            &mut stats,
            tag::COMMAND_COMPLETE,
            complete.as_bytes(),
        );
        put(&mut out, &mut stats, tag::READY_FOR_QUERY, b"I");
    }
    (out, stats)
}

/// Value lengths as an OLTP row has them; -1 is NULL.
fn column_len(rng: &mut XorShift) -> i32 {
    match rng.below(100) {
        0..=7 => -1,
        8..=44 => 1 + rng.below(10) as i32, // integers, booleans, short codes
        45..=64 => 26,                      // timestamps
        65..=89 => 8 + rng.below(56) as i32, // names, e-mail addresses
        90..=97 => 64 + rng.below(448) as i32, // descriptions
        _ => 512 + rng.below(2 * 1024 - 512) as i32, // JSON documents
    }
}

fn row_description(columns: usize) -> Vec<u8> {
    let mut body = (columns as i16).to_be_bytes().to_vec();
    for i in 0..columns {
        body.extend_from_slice(format!("column_{i}\0").as_bytes());
        body.extend_from_slice(&16_384u32.to_be_bytes()); // table oid
        body.extend_from_slice(&(i as i16 + 1).to_be_bytes()); // attribute number
        body.extend_from_slice(&25u32.to_be_bytes()); // type oid (text)
        body.extend_from_slice(&(-1i16).to_be_bytes()); // type size
        body.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
        body.extend_from_slice(&0i16.to_be_bytes()); // format code
    }
    body
}

fn put(out: &mut Vec<u8>, stats: &mut StreamStats, tag: u8, body: &[u8]) {
    let before = out.len();
    put_message(out, tag, |out| out.extend_from_slice(body));
    stats.bytes += out.len() - before;
    stats.messages += 1;
}

/// xorshift64: deterministic and dependency-free; statistical quality does not matter here.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockguard::frame::{FrameScanner, SERVER_INTERESTS};

    #[test]
    fn the_stream_is_valid_protocol_and_mostly_data_rows() {
        let (stream, stats) = server_stream(1 << 20, 7);
        assert!(stream.len() >= 1 << 20);
        assert_eq!(stream.len(), stats.bytes);
        assert!(stats.data_rows * 2 > stats.messages, "{stats:?}");
        let mut scanner = FrameScanner::new(&SERVER_INTERESTS);
        let mut ready = 0;
        scanner
            .feed(&stream, |m| {
                ready += usize::from(m.tag == tag::READY_FOR_QUERY)
            })
            .unwrap();
        assert!(scanner.at_boundary());
        assert!(ready > 0);
        assert_eq!(server_stream(1 << 20, 7).0, stream);
    }
}
