//! Just enough PromQL lexing for the dashboard check: identifiers, and the
//! labels of `by (...)`, `without (...)` and `{...}` matchers.

use std::collections::BTreeSet;

/// Identifiers in a PromQL expression (names, functions, labels, keywords).
pub(crate) fn identifiers(expr: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut in_string = false;
    while i < bytes.len() {
        let c = bytes[i];
        if c == '"' {
            in_string = !in_string;
            i += 1;
        } else if in_string {
            i += if c == '\\' { 2 } else { 1 };
        } else if c.is_ascii_alphabetic() || c == '_' || c == '$' {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric()
                    || bytes[i] == '_'
                    || bytes[i] == '$'
                    || bytes[i] == ':')
            {
                i += 1;
            }
            out.push((start, bytes[start..i].iter().collect()));
        } else {
            i += 1;
        }
    }
    out
}

/// Labels used in `by (...)`/`without (...)` and in `{...}` matchers.
pub(crate) fn used_labels(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut grouping = BTreeSet::new();
    let mut matchers = BTreeSet::new();
    for keyword in ["by", "without"] {
        for (pos, word) in identifiers(expr) {
            if word != keyword {
                continue;
            }
            let rest = expr[pos + word.len()..].trim_start();
            if let Some(inner) = rest.strip_prefix('(').and_then(|r| r.split(')').next()) {
                grouping.extend(
                    inner
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty()),
                );
            }
        }
    }
    for part in expr.split('{').skip(1) {
        let inner = part.split('}').next().unwrap_or_default();
        for matcher in inner.split(',') {
            let label: String = matcher
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !label.is_empty() {
                matchers.insert(label);
            }
        }
    }
    (grouping, matchers)
}
