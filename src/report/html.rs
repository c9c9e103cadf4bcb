//! The HTML every page of Wayfinder shares: one escape, one style sheet, the
//! head of a page, badges, and the human forms of sizes and durations.
//!
//! Why no template crate (askama, maud): the pages are a few hundred lines of
//! server-side HTML without loops of templates or inheritance; a proc-macro
//! template engine would cost more build time than the markup it replaces.
//! What matters is that everything goes through [`escape`], once.

use std::fmt::Write as _;

/// HTML-escapes `s`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The style sheet of every page (inline: the pages load no asset).
pub const STYLE: &str = "\
:root{--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--muted:#57606a;--line:#d0d7de}\
*{box-sizing:border-box}body{font:16px/1.45 system-ui,-apple-system,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}\
header{background:#24292f;color:#fff;padding:.8em 1em}header h1{margin:0;font-size:1.25em}\
header p{margin:.2em 0 0;color:#d0d7de;font-size:.9em}main{max-width:56em;margin:0 auto;padding:.5em}\
section{background:#fff;border:1px solid var(--line);border-radius:8px;margin:.7em 0;padding:.7em .9em}\
h2{font-size:1.05em;margin:.1em 0 .5em}h3{font-size:1em;margin:0}.peer p{margin:.2em 0}\
.card{border-top:1px solid var(--line);padding:.6em 0}.card:first-of-type{border-top:0}\
.badge{display:inline-block;border-radius:1em;padding:0 .6em;font-size:.8em;font-weight:600;color:#fff;vertical-align:middle}\
.passing,.running,.up{background:var(--ok)}.warning,.backoff,.waiting,.starting,.stopping{background:var(--warn)}\
.critical,.failed,.down,.refused{background:var(--bad)}.off,.exited,.stopped{background:var(--muted)}\
ul{margin:.3em 0;padding-left:1.1em}li{margin:.15em 0}code{font-size:.9em;word-break:break-all}\
a{color:#0969da}.muted{color:var(--muted);font-size:.9em}\
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.35em .3em;border-top:1px solid var(--line);vertical-align:top}th{white-space:nowrap}td:first-child{overflow-wrap:anywhere;width:60%}\
button{font:inherit;font-size:.85em;padding:.2em .7em;border-radius:6px;border:1px solid var(--line);background:#f6f8fa}\
form{display:inline}@media (max-width:30em){.wide{display:none}}input{font:inherit;padding:.25em .5em;border:1px solid var(--line);border-radius:6px;width:11em;max-width:100%}pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f8fa;border:1px solid var(--line);border-radius:6px;padding:.6em;font-size:.85em}.qr svg{display:block;width:100%;max-width:20em;height:auto;margin:.5em auto}.add-peer{display:block;margin-top:.6em}";

/// A coloured badge (`class` picks the colour: running, passing, failed ...).
pub fn badge(class: &str, text: &str) -> String {
    format!("<span class=\"badge {}\">{}</span>", escape(class), escape(text))
}

/// The head of a page with `title`, and its header bar.
pub fn page_start(title: &str, subtitle: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t}</title><style>{STYLE}</style></head><body>\
         <header><h1>{t}</h1><p>{s}</p></header><main>",
        t = escape(title),
        s = escape(subtitle),
    )
}

/// A refused form action (duplicate name, vpn off ...) as a page with the reason.
pub fn refusal_page(message: &str, q: &str) -> String {
    let mut html = page_start("not done", "wayfinder admin");
    let _ = write!(
        html,
        "<section id=\"refused\"><p>{}</p></section><p><a href=\"/{q}\">back to the status page</a></p>\
         </main></body></html>",
        escape(message)
    );
    html
}

/// `text` for a `data:` URL: everything but unreserved characters as `%XX`.
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
pub fn human_secs(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_durations() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(human_secs(12.7), "12s");
        assert_eq!(human_secs(250.0), "4m 10s");
        assert_eq!(human_secs(7500.0), "2h 5m");
        assert_eq!(human_secs(3.0 * 86400.0 + 4.0 * 3600.0), "3d 4h");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
        assert_eq!(percent_encode("a = b\n[x]"), "a%20%3D%20b%0A%5Bx%5D");
    }
}
