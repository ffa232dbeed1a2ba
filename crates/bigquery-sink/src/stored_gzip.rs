//! A gzip member whose deflate blocks are stored, not compressed: what gzip
//! level 0 sends, written here because the client takes pre-serialized
//! bodies only gzipped, and zlib's stored path copies every byte through its
//! window (9 % of bigquery-sink's CPU in a profile). Here each byte is copied
//! once and checksummed by `crc32fast` (RFC 1951 section 3.2.4, RFC 1952).

/// The most bytes one stored block holds: its length is 16 bits.
const MAX_BLOCK: usize = 0xFFFF;

/// gzip magic, deflate, no flags, no mtime, no extra flags, OS unknown.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// Writes exactly `len` bytes, announced up front, as a gzip member: a
/// stored block header goes in front of every 65,535 bytes as they arrive.
pub struct StoredGzip {
    out: Vec<u8>,
    crc: crc32fast::Hasher,
    /// Bytes not written yet.
    left: usize,
    /// Room left in the open block.
    block_left: usize,
    len: usize,
}

impl StoredGzip {
    /// A member that will hold `len` bytes.
    pub fn new(len: usize) -> Self {
        let blocks = len.div_ceil(MAX_BLOCK).max(1);
        let mut out = Vec::with_capacity(HEADER.len() + blocks * 5 + len + 8);
        out.extend_from_slice(&HEADER);
        let mut gz = Self {
            out,
            crc: crc32fast::Hasher::new(),
            left: len,
            block_left: 0,
            len,
        };
        if len == 0 {
            gz.open_block();
        }
        gz
    }

    fn open_block(&mut self) {
        let size = self.left.min(MAX_BLOCK);
        let last = u8::from(self.left <= MAX_BLOCK);
        // `size` fits 16 bits: it is at most MAX_BLOCK.
        let size16 = size as u16;
        self.out.push(last); // BFINAL, then BTYPE 00 (stored); padding to the byte
        self.out.extend_from_slice(&size16.to_le_bytes());
        self.out.extend_from_slice(&(!size16).to_le_bytes());
        self.block_left = size;
    }

    /// Appends `bytes`; all of them together may not exceed the announced
    /// length (a bug in the caller, checked in debug builds).
    pub fn write(&mut self, mut bytes: &[u8]) {
        debug_assert!(bytes.len() <= self.left, "more bytes than announced");
        self.crc.update(bytes);
        while !bytes.is_empty() && self.left > 0 {
            if self.block_left == 0 {
                self.open_block();
            }
            let n = bytes.len().min(self.block_left);
            self.out.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            self.block_left -= n;
            self.left -= n;
        }
    }

    /// The member, ended with its checksum and length.
    pub fn finish(mut self) -> Vec<u8> {
        debug_assert_eq!(self.left, 0, "fewer bytes than announced");
        self.out
            .extend_from_slice(&self.crc.finalize().to_le_bytes());
        // gzip keeps the length modulo 2^32.
        self.out.extend_from_slice(&(self.len as u32).to_le_bytes());
        self.out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gunzip(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out).unwrap();
        out
    }

    #[test]
    fn gunzips_to_what_was_written_at_every_block_edge() {
        for len in [
            0,
            1,
            100,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK + 1,
            2 * MAX_BLOCK,
            2 * MAX_BLOCK + 7,
            300_000,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            // Pieces of uneven sizes, so that writes straddle block edges.
            let mut gz = StoredGzip::new(len);
            let mut rest = &data[..];
            let mut piece = 1;
            while !rest.is_empty() {
                let n = piece.min(rest.len());
                gz.write(&rest[..n]);
                rest = &rest[n..];
                piece = piece * 3 + 1;
            }
            let body = gz.finish();
            assert_eq!(gunzip(&body), data, "{len} bytes");
            let blocks = len.div_ceil(MAX_BLOCK).max(1);
            assert_eq!(
                body.len(),
                10 + 5 * blocks + len + 8,
                "{len} bytes: one copy, no padding"
            );
        }
    }
}
