//! `wayfinder top`: the status page's live view for a terminal (like `htop`),
//! for hosts without a browser.
//!
//! ```text
//!  every --interval: GET /api/status (terminal::fetch, Bearer token)
//!     ─▶ traffic(): dns answers by route and lb requests by class, totals and
//!        per-second rates from the previous answer
//!     ─▶ terminal::render + components::terminal_sections (what `wayfinder status` prints)
//!     ─▶ one frame, cut to the terminal's size, drawn over the last one
//!  SIGINT / SIGTERM ─▶ the terminal as it was (main screen, cursor shown)
//! ```
//!
//! The figures are `/api/status`'s own, so `top` and the page never disagree;
//! the rates are the only thing computed here. A failed fetch is shown in the
//! frame and retried at the next refresh: `top` outlives restarts of `up`.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::terminal;

/// Enter the alternate screen, hide the cursor.
const ENTER: &str = "\x1b[?1049h\x1b[?25l";
/// Leave it, show the cursor.
const LEAVE: &str = "\x1b[?25h\x1b[?1049l";
/// Cursor home, clear the screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// The counters `top` turns into rates, by row name.
fn totals(v: &Value) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Some(routes) = v["dns"]["routes"].as_object() {
        for (route, r) in routes {
            out.push((format!("dns {route}"), r["queries"].as_u64().unwrap_or(0)));
        }
    }
    if let Some(classes) = v["lb"]["requests"]["status_classes"].as_array() {
        let all: u64 = classes.iter().filter_map(Value::as_u64).sum();
        out.push(("lb requests".into(), all));
        for (i, n) in classes.iter().enumerate().skip(2) {
            out.push((format!("lb {i}xx"), n.as_u64().unwrap_or(0)));
        }
        out.push(("lb retries".into(), v["lb"]["retries"].as_u64().unwrap_or(0)));
    }
    out
}

/// The TRAFFIC block: each counter's total and its rate since `prev` (taken
/// `elapsed` ago), plus the lb's gauges.
fn traffic(v: &Value, prev: Option<&(Vec<(String, u64)>, Instant)>, now: Instant) -> String {
    let mut out = String::new();
    let rows = totals(v);
    if rows.is_empty() {
        return out;
    }
    let _ = writeln!(out, "\nTRAFFIC                 TOTAL        /s");
    for (name, total) in &rows {
        let rate = prev
            .and_then(|(p, at)| {
                let before = p.iter().find(|(n, _)| n == name)?.1;
                let secs = now.duration_since(*at).as_secs_f64();
                (secs > 0.0 && *total >= before).then(|| (total - before) as f64 / secs)
            })
            .map_or_else(|| "-".to_string(), |r| format!("{r:.1}"));
        let _ = writeln!(out, "  {name:<20} {total:>7} {rate:>9}");
    }
    let lb = &v["lb"];
    if lb.is_object() {
        let _ = writeln!(
            out,
            "  lb queued {}, connections {} of {}, routing changes {}, propagation p99 {}",
            lb["queued"].as_u64().unwrap_or(0),
            lb["connections"]["open"].as_u64().unwrap_or(0),
            lb["connections"]["max"].as_u64().unwrap_or(0),
            lb["changes"].as_u64().unwrap_or(0),
            lb["propagation_p99_ms"]
                .as_f64()
                .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms")),
        );
    }
    out
}

/// The terminal's size (rows, columns), when stdout is one.
fn size() -> Option<(usize, usize)> {
    // SAFETY: TIOCGWINSZ fills a winsize we own; stdout's fd stays open.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some((usize::from(ws.ws_row), usize::from(ws.ws_col)))
}

/// `frame` cut to `rows` lines of `cols` characters (no scrolling, no wrapping).
fn fit(frame: &str, rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(frame.len());
    for line in frame.lines().take(rows) {
        out.extend(line.chars().take(cols));
        out.push_str("\r\n");
    }
    out
}

/// One frame: a title line with the time and refresh, then the picture.
pub fn frame(addr: SocketAddr, every: Duration, status: Result<&Value, String>, traffic_block: &str) -> String {
    let mut out = format!("wayfinder top: {addr}, every {:.0?} (Ctrl-C quits)\n", every);
    match status {
        Ok(v) => {
            out.push_str(&terminal::render(v));
            out.push_str(traffic_block);
            out.push_str(&crate::components::terminal_sections(v));
        }
        Err(e) => {
            let _ = writeln!(out, "\nno status: {e}\n(retrying every {every:?})");
        }
    }
    out
}

/// Shows the status of the `up` at `addr` every `every` until SIGINT/SIGTERM.
pub async fn run(addr: SocketAddr, token: Option<&str>, every: Duration) {
    let tty = std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout();
    if tty {
        let _ = write!(stdout, "{ENTER}");
    }
    let mut prev: Option<(Vec<(String, u64)>, Instant)> = None;
    let stop = crate::signals::shutdown();
    tokio::pin!(stop);
    loop {
        let fetched = terminal::fetch(addr, token).await;
        let now = Instant::now();
        let text = match &fetched {
            Ok(v) => {
                let block = traffic(v, prev.as_ref(), now);
                prev = Some((totals(v), now));
                frame(addr, every, Ok(v), &block)
            }
            Err(e) => frame(addr, every, Err(e.to_string()), ""),
        };
        let _ = if tty {
            let (rows, cols) = size().unwrap_or((24, 80));
            write!(stdout, "{CLEAR}{}", fit(&text, rows.saturating_sub(1), cols))
        } else {
            // Not a terminal (a pipe, a log): frames one after another.
            writeln!(stdout, "{text}")
        };
        let _ = stdout.flush();
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    if tty {
        let _ = write!(stdout, "{LEAVE}");
        let _ = stdout.flush();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rates_come_from_the_previous_answer() {
        let v1 = json!({"dns": {"routes": {"zone": {"queries": 10}}},
                        "lb": {"requests": {"status_classes": [0, 0, 5, 0, 0, 1]}, "retries": 0}});
        let v2 = json!({"dns": {"routes": {"zone": {"queries": 30}}},
                        "lb": {"requests": {"status_classes": [0, 0, 9, 0, 0, 3]}, "retries": 0,
                               "queued": 0, "connections": {"open": 2, "max": 100}, "changes": 4}});
        let t0 = Instant::now();
        let first = traffic(&v1, None, t0);
        assert!(first.contains("  dns zone                  10         -"), "{first}");
        let prev = (totals(&v1), t0);
        let second = traffic(&v2, Some(&prev), t0 + Duration::from_secs(2));
        assert!(second.contains("  dns zone                  30      10.0"), "{second}");
        assert!(second.contains("  lb requests               12       3.0"), "{second}");
        assert!(second.contains("  lb 5xx                     3       1.0"), "{second}");
        assert!(second.contains("connections 2 of 100, routing changes 4"), "{second}");
    }

    #[test]
    fn frames_fit_the_terminal() {
        let text = "a\nbcdef\nghi\njkl\n";
        assert_eq!(fit(text, 2, 3), "a\r\nbcd\r\n");
        let addr = SocketAddr::from(([127, 0, 0, 1], 9000));
        let f = frame(addr, Duration::from_secs(1), Err("refused".into()), "");
        assert!(f.contains("no status: refused"), "{f}");
    }
}
