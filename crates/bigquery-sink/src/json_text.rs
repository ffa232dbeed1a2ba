//! JSON text written by hand, for the one hot path that writes it: an
//! insertAll row. The output is byte for byte what `serde_json` writes
//! (the tests compare), only cheaper on long text.
//!
//! Why: the `payload` column holds the whole event, ~600 bytes of JSON
//! with a quote every few bytes, as a JSON string. `serde_json` escapes it
//! a byte at a time and copies each run between two escapes with its own
//! call; that was the largest item of bigquery-sink's profile on
//! production-shaped input (docs/benchmarks.md, "Where bigquery-sink's
//! time goes").

/// Every byte of a word: `0x01` in each of its 8 bytes.
const ONES: u64 = u64::from_ne_bytes([1; 8]);
/// The high bit of every byte.
const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);

/// The high bit of each byte of `word` below `n` (`n` <= 128). The
/// lowest one set marks exactly the first such byte; bits above it may be
/// set wrongly (a borrow), which the caller never reads.
const fn bytes_below(word: u64, n: u8) -> u64 {
    word.wrapping_sub(ONES * n as u64) & !word & HIGHS
}

/// The bytes of `word` (little-endian: its first byte lowest) that must be
/// escaped in a JSON string, as [`bytes_below`] marks them: control
/// characters (below 0x20), `"` and `\`.
const fn to_escape(word: u64) -> u64 {
    bytes_below(word, 0x20)
        | bytes_below(word ^ (ONES * b'"' as u64), 1)
        | bytes_below(word ^ (ONES * b'\\' as u64), 1)
}

/// Appends `text` as a JSON string, quotes included, escaped as
/// `serde_json` escapes it: `"`, `\` and the control characters, the
/// common ones by their short form, the rest as `\u00XX`.
///
/// Eight bytes at a time: each word is copied whole (a fixed-size copy,
/// no call), and cut back to its first byte to escape if it has one.
pub fn push_str(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    // Room for a quote-heavy payload's escapes too (about one in eight).
    out.reserve(bytes.len() + bytes.len() / 8 + 2);
    out.push(b'"');
    let mut at = 0;
    while let Some(word) = bytes[at..].first_chunk::<8>() {
        out.extend_from_slice(word);
        let escape = to_escape(u64::from_le_bytes(*word));
        if escape == 0 {
            at += 8;
        } else {
            let first = escape.trailing_zeros() as usize / 8;
            out.truncate(out.len() - 8 + first);
            push_escaped_byte(out, word[first]);
            at += first + 1;
        }
    }
    for &byte in &bytes[at..] {
        push_escaped_byte(out, byte);
    }
    out.push(b'"');
}

/// Appends one byte of a string, escaped if JSON requires it. Bytes of a
/// multi-byte character are >= 0x80 and pass through unchanged.
fn push_escaped_byte(out: &mut Vec<u8>, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match byte {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        0x00..=0x1f => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(byte >> 4)],
            HEX[usize::from(byte & 0xf)],
        ]),
        _ => out.push(byte),
    }
}

/// Appends an integer as JSON.
pub fn push_int(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn written(text: &str) -> String {
        let mut out = Vec::new();
        push_str(&mut out, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escapes_as_serde_json_does() {
        for text in [
            "",
            "plain",
            r#"{"info":"search","keyword":"범죄도시","agent":"Mozilla/5.0 (X11)"}"#,
            "quote\" backslash\\ newline\n tab\t cr\r bs\u{8} ff\u{c} nul\0 us\u{1f} del\u{7f}",
            // An escape at each position of a word, and words cut short.
            "\"1234567\"",
            "1234567\"",
            "12345678\"12345678\\",
            "\u{2028}\u{2029} are left as they are",
        ] {
            assert_eq!(
                written(text),
                serde_json::to_string(text).unwrap(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn every_ascii_byte_and_wide_characters_at_every_offset_of_a_word() {
        let specials: Vec<String> = (0_u8..0x80)
            .map(|byte| char::from(byte).to_string())
            .chain(["é", "검", "😀"].map(str::to_owned))
            .collect();
        for special in &specials {
            for offset in 0..=16 {
                for tail in ["", "abc", "\"", "é"] {
                    let text = format!("{}{special}{tail}", "x".repeat(offset));
                    assert_eq!(
                        written(&text),
                        serde_json::to_string(&text).unwrap(),
                        "{text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn integers() {
        let mut out = Vec::new();
        push_int(&mut out, -12_i64);
        push_int(&mut out, 7_i32);
        assert_eq!(out, b"-127");
    }

    proptest! {
        #[test]
        fn any_text_escapes_as_serde_json_does(text in any::<String>()) {
            prop_assert_eq!(written(&text), serde_json::to_string(&text).unwrap());
        }

        // Mostly the bytes that matter, so that escapes fall at every
        // offset of a word and next to multi-byte characters.
        #[test]
        fn json_like_text_escapes_as_serde_json_does(
            text in proptest::collection::vec(
                prop_oneof![
                    Just('"'), Just('\\'), Just('\n'), Just('\u{1}'), Just('\u{1f}'),
                    Just(' '), Just('a'), Just('é'), Just('검'), Just('\u{7f}'),
                ],
                0..40,
            ).prop_map(|chars| chars.into_iter().collect::<String>())
        ) {
            prop_assert_eq!(written(&text), serde_json::to_string(&text).unwrap());
        }
    }
}
