//! A gzip member whose deflate blocks are stored, not compressed: what gzip
//! level 0 sends, written here because the client takes pre-serialized
//! bodies only gzipped, and zlib-rs's stored path copies every byte through
//! its window (9 % of bigquery-sink's CPU in a profile, about 5 % saved: see
//! docs/benchmarks.md). Here each byte is copied once and checksummed by
//! `crc32fast` (RFC 1951 section 3.2.4, RFC 1952).

/// The most bytes one stored block holds: its length is 16 bits.
const MAX_BLOCK: usize = 0xFFFF;

/// gzip magic, deflate, no flags, no mtime, no extra flags, OS unknown.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// A stored block's header: the BFINAL bit (then BTYPE 00 and padding to
/// the byte), LEN and its complement NLEN.
const BLOCK_HEADER: usize = 5;

/// Appends bytes to a gzip member: each block's header is reserved when the
/// block opens and filled in when it closes, so no length is needed up front.
pub struct StoredGzip {
    out: Vec<u8>,
    crc: crc32fast::Hasher,
    /// Where the open block's header starts in `out`, if a block is open.
    block: Option<usize>,
    len: usize,
}

impl StoredGzip {
    /// A member with room for about `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let blocks = capacity.div_ceil(MAX_BLOCK).max(1);
        let mut out = Vec::with_capacity(HEADER.len() + blocks * BLOCK_HEADER + capacity + 8);
        out.extend_from_slice(&HEADER);
        Self {
            out,
            crc: crc32fast::Hasher::new(),
            block: None,
            len: 0,
        }
    }

    /// Appends `bytes`.
    pub fn write(&mut self, mut bytes: &[u8]) {
        self.crc.update(bytes);
        self.len += bytes.len();
        while !bytes.is_empty() {
            let start = match self.block {
                Some(start) if self.out.len() - start - BLOCK_HEADER < MAX_BLOCK => start,
                _ => {
                    self.close_block(false);
                    let start = self.out.len();
                    self.out.extend_from_slice(&[0; BLOCK_HEADER]);
                    self.block = Some(start);
                    start
                }
            };
            let room = MAX_BLOCK - (self.out.len() - start - BLOCK_HEADER);
            let n = bytes.len().min(room);
            self.out.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
    }

    /// Fills in the open block's header, if a block is open.
    fn close_block(&mut self, last: bool) {
        let Some(start) = self.block.take() else {
            return;
        };
        // At most MAX_BLOCK: `write` opens a new block when one is full.
        let size = (self.out.len() - start - BLOCK_HEADER) as u16;
        self.out[start] = u8::from(last);
        self.out[start + 1..start + 3].copy_from_slice(&size.to_le_bytes());
        self.out[start + 3..start + 5].copy_from_slice(&(!size).to_le_bytes());
    }

    /// The member: its last block marked final, then its checksum and length.
    pub fn finish(mut self) -> Vec<u8> {
        if self.block.is_none() {
            // Nothing written: one empty final block.
            self.block = Some(self.out.len());
            self.out.extend_from_slice(&[0; BLOCK_HEADER]);
        }
        self.close_block(true);
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

    /// Writes `data` in pieces of the given sizes, cycling through them.
    fn stored(data: &[u8], pieces: &[usize]) -> Vec<u8> {
        let mut gz = StoredGzip::with_capacity(data.len() / 2);
        let mut rest = data;
        for &piece in pieces.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = piece.min(rest.len());
            gz.write(&rest[..n]);
            rest = &rest[n..];
        }
        gz.finish()
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn gunzips_to_what_was_written_at_every_block_edge() {
        let edges = [
            0,
            1,
            100,
            MAX_BLOCK - 1,
            MAX_BLOCK,
            MAX_BLOCK + 1,
            2 * MAX_BLOCK,
            2 * MAX_BLOCK + 7,
            300_000,
        ];
        for len in edges {
            let data = data(len);
            // A write that ends exactly on an edge, then one past it; writes
            // straddling edges; one write of everything.
            for pieces in [
                &[MAX_BLOCK, 1][..],
                &[1, 4, 13, 40, 121, 364, 1093, 3280, 9841, 29524],
                &[usize::MAX],
            ] {
                let body = stored(&data, pieces);
                assert_eq!(gunzip(&body), data, "{len} bytes in pieces of {pieces:?}");
                let blocks = len.div_ceil(MAX_BLOCK).max(1);
                assert_eq!(
                    body.len(),
                    10 + 5 * blocks + len + 8,
                    "{len} bytes: one copy, no padding"
                );
            }
        }
    }

    #[test]
    fn empty_writes_change_nothing() {
        let mut gz = StoredGzip::with_capacity(0);
        gz.write(&[]);
        assert_eq!(gz.finish().len(), 10 + 5 + 8, "one empty final block");

        let data = data(MAX_BLOCK);
        let mut gz = StoredGzip::with_capacity(0);
        gz.write(&[]);
        gz.write(&data);
        gz.write(&[]);
        let body = gz.finish();
        assert_eq!(gunzip(&body), data);
        assert_eq!(
            body.len(),
            10 + 5 + MAX_BLOCK + 8,
            "the full block is the final one"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_writes_gunzip_to_their_bytes(
            blocks in 0..4_usize,
            offset in -3..4_isize,
            pieces in proptest::collection::vec(1..70_000_usize, 1..6),
        ) {
            let len = (blocks * MAX_BLOCK).saturating_add_signed(offset);
            let data = data(len);
            proptest::prop_assert_eq!(gunzip(&stored(&data, &pieces)), data);
        }
    }
}
