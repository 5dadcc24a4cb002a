//! Text taken from a request, made safe to quote back in an error message or a log field:
//! escaped, and cut to a bounded length. A leaf module: every stage that names client input
//! in a refusal uses it.

/// A client-supplied name as it may appear in an error message: escaped, at most 64 chars.
pub fn shown(name: &str) -> String {
    let mut s: String = name.escape_default().take(64).collect();
    if name.escape_default().count() > 64 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_bounds() {
        assert_eq!(shown("gpt-4o"), "gpt-4o");
        assert_eq!(shown("a\nb\""), "a\\nb\\\"");
        let long = "x".repeat(100);
        assert_eq!(shown(&long).chars().count(), 65);
        assert!(shown(&long).ends_with('…'));
    }
}
