//! The status page's live charts: the timeline drawn as inline SVG on the
//! server, and the few lines of script that fetch a fresh copy.
//!
//! ```text
//!  Timeline::charts() ─▶ render() ─▶ <section id="charts"> one <figure> per chart
//!     in the page at `/` (status_page.rs), and as a page of its own at `/charts`
//!     (admin.rs: a wall display; what the script fetches)
//!  /assets/charts.js: every STEP, GET /charts?<page query>, swap the section's children
//! ```
//!
//! Why SVG drawn here rather than a charting library from npm: nothing to
//! vendor, audit or update; every label goes through the one [`escape`] in
//! Rust, where unit tests see it; the page shows its charts without script
//! (the script only refreshes them) and under a CSP that forbids inline
//! script; and the points are in the DOM, so a browser test can count them.
//! A refresh is about 10–60 KiB of text (only series with values are drawn).
//! Until the appliance has run 15 minutes the charts span the time it has
//! (a minute at least), so its first minutes are not a sliver at the edge.

use std::fmt::Write as _;

use crate::report::html::escape;
use crate::report::timeline::{ChartData, POINTS, STEP};

/// The script that refreshes the charts (served at `/assets/charts.js`).
pub const SCRIPT: &str = include_str!("charts.js");

/// Line colours, in legend order (picked to stay apart for common colour blindness).
const COLOURS: [&str; 8] = [
    "#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7e8c", "#57606a",
];

/// Height of the drawing (SVG user units; the width is one unit per point).
const HEIGHT: f32 = 100.0;

/// The chart styles (added to the page's style sheet).
pub const STYLE: &str = "\
#charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(17em,1fr));gap:.6em}\
#charts h2{grid-column:1/-1;margin-bottom:0}\
figure.chart{margin:0;border:1px solid var(--line);border-radius:6px;padding:.4em .5em}\
figure.chart figcaption{font-size:.85em;font-weight:600}\
figure.chart svg{display:block;width:100%;height:5.5em;background:#f6f8fa;border-radius:3px}\
figure.chart .axis{display:flex;justify-content:space-between;font-size:.7em;color:var(--muted)}\
figure.chart ul{list-style:none;padding:0;margin:.2em 0 0;font-size:.75em}\
figure.chart li{display:inline-block;margin-right:.8em}\
figure.chart li i{display:inline-block;width:.8em;height:.25em;vertical-align:middle;margin-right:.25em}";

/// `v` with its unit, short.
fn value(v: f32, unit: &str) -> String {
    let a = v.abs();
    let n = if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else if a >= 0.001 {
        format!("{:.1}m", v * 1e3)
    } else {
        format!("{:.0}µ", v * 1e6)
    };
    format!("{n}{unit}")
}

/// Points shown at least (one minute): a young appliance's charts span the
/// time it has run, not 15 minutes of which all but a sliver are empty.
const MIN_WINDOW: usize = 30;

/// The points the charts show: from the oldest value of any chart (at least
/// [`MIN_WINDOW`], at most [`POINTS`]).
fn window(charts: &[ChartData]) -> usize {
    let oldest = charts
        .iter()
        .flat_map(|c| &c.lines)
        .filter_map(|l| l.points.iter().position(Option::is_some).map(|i| l.points.len() - i))
        .max()
        .unwrap_or(0);
    oldest.clamp(MIN_WINDOW, POINTS)
}

/// The polyline points of the last `window` of `points` (x = index within
/// the window, the latest at its right end; y scaled to `max`), split where
/// values are missing.
fn paths(points: &[Option<f32>], max: f32, window: usize) -> Vec<String> {
    let points = &points[points.len().saturating_sub(window)..];
    let offset = window - points.len();
    let mut out = Vec::new();
    let mut current = String::new();
    for (i, p) in points.iter().enumerate() {
        match p {
            Some(v) => {
                let y = HEIGHT - (v.max(0.0) / max).min(1.0) * (HEIGHT - 4.0) - 2.0;
                let _ = write!(current, "{},{y:.1} ", offset + i);
            }
            None if !current.is_empty() => out.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The charts as one `<section id="charts">`; `q` is the page's query
/// (escaped already), for the refresh URL.
pub fn render(charts: &[ChartData], q: &str) -> String {
    let mut html = String::with_capacity(16 * 1024);
    let _ = write!(
        html,
        "<section id=\"charts\" data-src=\"/charts{q}\" data-step-ms=\"{}\"><h2>Last 15 minutes</h2>",
        STEP.as_millis()
    );
    if charts.is_empty() {
        html.push_str("<p class=\"muted\">No points yet: the first come a few seconds after start.</p>");
    }
    let window = window(charts);
    let span = crate::report::html::human_secs((window as u64 * STEP.as_secs()) as f64);
    for c in charts {
        let max = c
            .lines
            .iter()
            .flat_map(|l| l.points.iter().flatten())
            .fold(0.0f32, |m, v| m.max(*v));
        // A flat zero line sits at the bottom, not in the middle.
        let scale = if max > 0.0 { max } else { 1.0 };
        let _ = write!(
            html,
            "<figure class=\"chart\" id=\"chart-{id}\"><figcaption>{title}</figcaption>\
             <div class=\"axis\"><span>max {max}</span></div>\
             <svg viewBox=\"0 0 {window} {HEIGHT}\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{title}\">",
            id = escape(c.chart.id),
            title = escape(c.chart.title),
            max = escape(&value(max, c.chart.unit)),
        );
        for (i, line) in c.lines.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let count = line.points.iter().flatten().count();
            let _ = write!(
                html,
                "<g class=\"line\" data-label=\"{}\" data-points=\"{count}\">",
                escape(&line.label)
            );
            for p in paths(&line.points, scale, window) {
                let _ = write!(
                    html,
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" \
                     vector-effect=\"non-scaling-stroke\"/>",
                    p.trim_end()
                );
            }
            html.push_str("</g>");
        }
        let _ = write!(
            html,
            "</svg><div class=\"axis\"><span>-{}</span><span>now</span></div><ul>",
            escape(&span)
        );
        for (i, line) in c.lines.iter().enumerate() {
            let latest = line
                .points
                .iter()
                .rev()
                .flatten()
                .next()
                .map_or_else(|| "-".to_string(), |v| value(*v, c.chart.unit));
            let _ = write!(
                html,
                "<li><i style=\"background:{}\"></i>{} <b>{}</b></li>",
                COLOURS[i % COLOURS.len()],
                escape(&line.label),
                escape(&latest)
            );
        }
        html.push_str("</ul></figure>");
    }
    html.push_str("</section>");
    html
}

/// The charts as a page of their own (`/charts`): the section, styled, with
/// the refresh script; what the status page's script fetches, too.
pub fn page(charts: &[ChartData], q: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>wayfinder charts</title><link rel=\"icon\" href=\"data:,\"><style>{}{STYLE}</style>\
         <script src=\"/assets/charts.js{q}\" defer></script></head><body><main>{}</main></body></html>\n",
        crate::report::html::STYLE,
        render(charts, q)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::timeline::{Chart, Timeline};

    static HOSTILE: Chart = Chart {
        order: 1,
        id: "hostile",
        title: "requests <by> \"service\"",
        unit: "/s",
    };

    #[test]
    fn labels_are_escaped_and_points_drawn_right_aligned() {
        let mut t = Timeline::default();
        t.tick(1).counter(&HOSTILE, "<script>alert(1)</script>", 0);
        t.tick(2).counter(&HOSTILE, "<script>alert(1)</script>", 10);
        t.tick(3).counter(&HOSTILE, "<script>alert(1)</script>", 30);
        let html = render(&t.charts(), "?csrf=x&amp;token=y");
        assert!(!html.contains("<script"), "{html}");
        assert!(
            html.contains("data-label=\"&lt;script&gt;alert(1)&lt;/script&gt;\""),
            "{html}"
        );
        assert!(html.contains("requests &lt;by&gt; &quot;service&quot;"), "{html}");
        assert!(html.contains("data-points=\"2\""), "points: {html}");
        assert!(html.contains("data-src=\"/charts?csrf=x&amp;token=y\""), "{html}");
        // A young timeline spans a minute; the latest point at the right
        // edge, the highest at the top.
        assert!(html.contains(&format!("viewBox=\"0 0 {MIN_WINDOW} ")), "{html}");
        assert!(html.contains(">-1m 0s<"), "{html}");
        assert!(html.contains(&format!("{},2.0", MIN_WINDOW - 1)), "edge: {html}");
        assert!(html.contains("max 10.0/s"), "max: {html}");
    }

    #[test]
    fn gaps_split_lines_and_values_read_short() {
        let p = paths(&[Some(1.0), None, Some(0.0), Some(1.0)], 1.0, POINTS);
        assert_eq!(p.len(), 2);
        assert!(p[1].ends_with(&format!("{},2.0 ", POINTS - 1)), "{p:?}");
        // A window shorter than the points: only the latest are drawn.
        assert_eq!(paths(&[Some(1.0), Some(1.0), Some(1.0)], 1.0, 2), ["0,2.0 1,2.0 "]);
        assert_eq!(value(0.0012, "s"), "1.2ms");
        assert_eq!(value(25_000.0, "B/s"), "25.0kB/s");
        assert_eq!(value(3.0, ""), "3.0");
        assert!(render(&[], "").contains("No points yet"));
    }
}
