//! Aligned plain-text tables for the read-back commands. Widths are display
//! columns, so Korean keywords (two columns a character) line up too.

use unicode_width::UnicodeWidthStr;

/// Renders a header and rows, columns separated by two spaces.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.width()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.width());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| {
                format!("{cell}{}", " ".repeat(width.saturating_sub(cell.width())))
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn aligns_wide_characters() {
        let out = super::render(
            &["#", "keyword", "count"],
            &[
                vec!["1".into(), "기생충".into(), "12".into()],
                vec!["2".into(), "ab".into(), "3".into()],
            ],
        );
        assert_eq!(out, "#  keyword  count\n1  기생충   12\n2  ab       3\n");
    }
}
