//! Readable output: aligned tables and `field: value` listings.

/// Prints `rows` under `header`, columns padded to their widest cell.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(header, rows));
}

/// The text [`print_table`] prints.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let w = widths.get(i).copied().unwrap_or(0);
            out.push_str(c);
            for _ in c.chars().count()..w {
                out.push(' ');
            }
        }
        let mut out = out.trim_end().to_owned();
        out.push('\n');
        out
    };
    let mut text = line(&mut header.iter().copied());
    for r in rows {
        text.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    text
}

/// A cell for an optional value (`-` when absent, so columns stay countable).
pub fn cell(v: Option<&str>) -> String {
    match v {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_characters_not_bytes() {
        let t = render_table(
            &["ID", "NAME"],
            &[
                vec!["k1".into(), "café".into()],
                vec!["longer-id".into(), cell(None)],
            ],
        );
        assert_eq!(t, "ID         NAME\nk1         café\nlonger-id  -\n");
    }
}
