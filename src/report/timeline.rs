//! The last 15 minutes of the appliance at [`STEP`] resolution: the ring
//! buffer behind the status page's charts.
//!
//! ```text
//!  sampler task, every STEP (supervisor/sampler.rs)
//!    Timeline::tick(now) ─▶ Tick ──Component::sample(&mut Tick)──▶ counter / gauge / quantiles
//!        counters: the atomics the components keep anyway, read once per tick;
//!        their difference to the last tick, per second, is the point stored
//!  page view: Timeline::charts() ─▶ copies of the points ─▶ supervisor/charts.rs (SVG)
//! ```
//!
//! Memory is bounded whatever the catalog holds: at most [`MAX_SERIES`] series
//! of [`POINTS`] `f32` each (about 460 KiB in all), and per-service series are
//! chosen by the components ([`TopK`]), never one per service. A new series
//! when the table is full takes the place of the one idle longest; when every
//! one was written this tick it is dropped and counted ([`Timeline::dropped`]).
//! No hot path touches this: the dns and the lb count as before, in their own
//! atomics, and only the sampler reads them.

use std::collections::HashMap;
use std::time::Duration;

use super::histogram::Snapshot;

/// Time between two points.
pub const STEP: Duration = Duration::from_secs(2);
/// Points per series: 15 minutes at [`STEP`].
pub const POINTS: usize = 450;
/// Series kept at most (all charts together).
pub const MAX_SERIES: usize = 256;
/// Longest label kept (bytes; longer ones are cut at a character boundary).
const MAX_LABEL: usize = 64;

/// What a chart shows; defined once, as a `static`, by whoever feeds it.
#[derive(Debug, PartialEq, Eq)]
pub struct Chart {
    /// Where it goes on the page: charts are shown by ascending `order`.
    pub order: u16,
    /// Its id (HTML id, test hook): lowercase letters, digits and `-`.
    pub id: &'static str,
    /// Its title.
    pub title: &'static str,
    /// The unit of its values (`/s`, `s`, `B/s` ...).
    pub unit: &'static str,
}

/// How a series turns what it is given into points.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A monotonic counter: the point is its increase per second since the
    /// previous tick (none after a gap or a reset).
    Counter { prev: u64 },
    /// A value as it is.
    Gauge,
}

/// One line of a chart.
#[derive(Debug)]
struct Series {
    chart: &'static Chart,
    label: Box<str>,
    kind: Kind,
    /// The tick that last wrote it (0: never).
    written: u64,
    /// Points by slot (`tick % POINTS`); NaN: no value.
    points: Box<[f32]>,
}

/// The ring buffer of every series.
#[derive(Debug)]
pub struct Timeline {
    /// Ticks so far; the current one's slot is `tick % POINTS`.
    tick: u64,
    /// Unix time (ms) of each slot's tick.
    times: Box<[u64]>,
    series: Vec<Series>,
    /// Series index by chart id, then label.
    index: HashMap<&'static str, HashMap<Box<str>, usize>>,
    /// Previous histogram per chart, for quantiles of the last step.
    histograms: HashMap<&'static str, Snapshot>,
    /// New series refused because every slot was written this tick.
    dropped: u64,
    /// The tick in which every series was found written: later new series of
    /// the same tick are refused without another search.
    full_at: u64,
}

impl Default for Timeline {
    fn default() -> Self {
        Self {
            tick: 0,
            times: vec![0; POINTS].into_boxed_slice(),
            series: Vec::new(),
            index: HashMap::new(),
            histograms: HashMap::new(),
            dropped: 0,
            full_at: 0,
        }
    }
}

/// One tick being written: what the components are handed.
#[derive(Debug)]
pub struct Tick<'a> {
    timeline: &'a mut Timeline,
}

fn cut(label: &str) -> &str {
    if label.len() <= MAX_LABEL {
        return label;
    }
    let mut end = MAX_LABEL;
    while !label.is_char_boundary(end) {
        end -= 1;
    }
    &label[..end]
}

impl Timeline {
    /// Starts the next tick at `now_ms` (Unix ms): every series gets no value
    /// at its slot until written.
    pub fn tick(&mut self, now_ms: u64) -> Tick<'_> {
        self.tick += 1;
        let slot = self.slot();
        self.times[slot] = now_ms;
        for s in &mut self.series {
            s.points[slot] = f32::NAN;
        }
        Tick { timeline: self }
    }

    fn slot(&self) -> usize {
        (self.tick % POINTS as u64) as usize
    }

    /// Series refused for want of room so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Series held.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// True before the first series.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Bytes held by the series and the index (labels included): what the
    /// memory bound is about.
    pub fn memory(&self) -> usize {
        let per_series = std::mem::size_of::<Series>() + POINTS * std::mem::size_of::<f32>();
        let labels: usize = self.series.iter().map(|s| 2 * s.label.len()).sum();
        let index = self.index.values().map(|m| m.capacity()).sum::<usize>()
            * (std::mem::size_of::<Box<str>>() + std::mem::size_of::<usize>() + 8);
        self.series.capacity() * per_series + labels + index + self.times.len() * 8
    }

    /// The series of `chart` under `label`, made when new (None: no room).
    fn find(&mut self, chart: &'static Chart, label: &str, kind: Kind) -> Option<&mut Series> {
        let label = cut(label);
        if let Some(&i) = self.index.get(chart.id).and_then(|m| m.get(label)) {
            return Some(&mut self.series[i]);
        }
        let series = Series {
            chart,
            label: label.into(),
            kind,
            written: 0,
            points: vec![f32::NAN; POINTS].into_boxed_slice(),
        };
        if self.full_at == self.tick {
            self.dropped += 1;
            return None;
        }
        let i = if self.series.len() < MAX_SERIES {
            self.series.push(series);
            self.series.len() - 1
        } else {
            // The one idle longest, unless every one was written this tick.
            let (i, idle) = self.series.iter().enumerate().min_by_key(|(_, s)| s.written)?;
            if idle.written >= self.tick {
                self.full_at = self.tick;
                self.dropped += 1;
                return None;
            }
            if let Some(m) = self.index.get_mut(idle.chart.id) {
                m.remove(&idle.label);
            }
            self.series[i] = series;
            i
        };
        self.index.entry(chart.id).or_default().insert(label.into(), i);
        Some(&mut self.series[i])
    }

    /// Every chart with at least one value, by `order`, each with its series
    /// (those with a value), points oldest first; and the step.
    pub fn charts(&self) -> Vec<ChartData> {
        let start = self.tick.saturating_sub(POINTS as u64 - 1).max(1);
        let mut charts: Vec<ChartData> = Vec::new();
        for s in &self.series {
            let points: Vec<Option<f32>> = (start..=self.tick)
                .map(|t| {
                    let v = s.points[(t % POINTS as u64) as usize];
                    (!v.is_nan()).then_some(v)
                })
                .collect();
            if points.iter().all(Option::is_none) {
                continue;
            }
            let line = Line {
                label: s.label.to_string(),
                points,
            };
            match charts.iter_mut().find(|c| c.chart.id == s.chart.id) {
                Some(c) => c.lines.push(line),
                None => charts.push(ChartData {
                    chart: s.chart,
                    lines: vec![line],
                }),
            }
        }
        charts.sort_by_key(|c| c.chart.order);
        for c in &mut charts {
            c.lines.sort_by(|a, b| a.label.cmp(&b.label));
        }
        charts
    }

    /// Unix time (ms) of the latest tick (0 before the first).
    pub fn now_ms(&self) -> u64 {
        if self.tick == 0 { 0 } else { self.times[self.slot()] }
    }
}

/// A copy of one chart's series, for rendering.
#[derive(Debug, Clone)]
pub struct ChartData {
    /// The chart.
    pub chart: &'static Chart,
    /// Its lines, by label.
    pub lines: Vec<Line>,
}

/// One series of a [`ChartData`]: [`POINTS`] at most, oldest first, the last
/// one the latest tick.
#[derive(Debug, Clone)]
pub struct Line {
    /// Its label.
    pub label: String,
    /// Values (None: no value at that tick).
    pub points: Vec<Option<f32>>,
}

impl Tick<'_> {
    /// A counter's total now: the point is its increase per second since the
    /// previous tick (nothing on its first tick, after a gap, or when it went
    /// down: the component restarted with fresh counters).
    pub fn counter(&mut self, chart: &'static Chart, label: &str, total: u64) {
        let tick = self.timeline.tick;
        let slot = self.timeline.slot();
        let Some(s) = self.timeline.find(chart, label, Kind::Counter { prev: total }) else {
            return;
        };
        if let Kind::Counter { prev } = s.kind
            && s.written != 0
            && s.written + 1 == tick
            && total >= prev
        {
            s.points[slot] = ((total - prev) as f64 / STEP.as_secs_f64()) as f32;
        }
        s.kind = Kind::Counter { prev: total };
        s.written = tick;
    }

    /// A value as it is now.
    pub fn gauge(&mut self, chart: &'static Chart, label: &str, value: f64) {
        let tick = self.timeline.tick;
        let slot = self.timeline.slot();
        if let Some(s) = self.timeline.find(chart, label, Kind::Gauge) {
            s.points[slot] = value as f32;
            s.written = tick;
        }
    }

    /// Quantiles (`(label, q)`, q in 0..=1) of what a histogram counted since
    /// the previous tick, in seconds (the upper bound of the bucket they fall
    /// in); nothing when it counted nothing.
    pub fn quantiles(&mut self, chart: &'static Chart, now: &Snapshot, wanted: &[(&str, f64)]) {
        let prev = self.timeline.histograms.insert(chart.id, *now);
        let Some(prev) = prev else { return };
        let delta: Vec<u64> = now
            .latency_buckets
            .iter()
            .zip(prev.latency_buckets)
            .map(|(n, p)| n.saturating_sub(p))
            .collect();
        let count: u64 = delta.iter().sum();
        if count == 0 {
            return;
        }
        for (label, q) in wanted {
            let rank = ((count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            let bucket = delta
                .iter()
                .position(|n| {
                    seen += n;
                    seen >= rank
                })
                .unwrap_or(delta.len() - 1);
            // The last bucket has no bound: shown as the last bound.
            let bound_us = now.bounds_us.get(bucket).or(now.bounds_us.last()).copied().unwrap_or(0);
            self.gauge(chart, label, bound_us as f64 / 1e6);
        }
    }
}

/// The `K` largest of many offered values (ties: the first offered), without
/// allocating: how a component picks the few services or peers that get a
/// series of their own out of a whole catalog, in one pass.
#[derive(Debug)]
pub struct TopK<T, const K: usize> {
    items: [Option<(u64, T)>; K],
}

impl<T, const K: usize> Default for TopK<T, K> {
    fn default() -> Self {
        Self {
            items: std::array::from_fn(|_| None),
        }
    }
}

impl<T, const K: usize> TopK<T, K> {
    /// Offers `item` with `value`; zero values are never kept.
    #[inline]
    pub fn offer(&mut self, value: u64, item: T) {
        if value == 0 {
            return;
        }
        let (min_at, min) = self
            .items
            .iter()
            .enumerate()
            .map(|(i, e)| (i, e.as_ref().map_or(0, |(v, _)| *v)))
            .min_by_key(|(_, v)| *v)
            .unwrap_or((0, u64::MAX));
        // An empty slot counts as 0, so it is taken first.
        if value > min
            && let Some(slot) = self.items.get_mut(min_at)
        {
            *slot = Some((value, item));
        }
    }

    /// The kept ones, largest first.
    pub fn into_sorted(self) -> Vec<(u64, T)> {
        let mut out: Vec<(u64, T)> = self.items.into_iter().flatten().collect();
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static REQS: Chart = Chart {
        order: 1,
        id: "reqs",
        title: "requests",
        unit: "/s",
    };
    static AGE: Chart = Chart {
        order: 0,
        id: "age",
        title: "age",
        unit: "s",
    };

    #[test]
    fn counters_become_rates_gauges_stay_and_gaps_are_gaps() {
        let mut t = Timeline::default();
        let step = STEP.as_millis() as u64;
        t.tick(step).counter(&REQS, "a", 100);
        t.tick(2 * step).counter(&REQS, "a", 120);
        {
            let mut tick = t.tick(3 * step);
            tick.counter(&REQS, "a", 160);
            tick.gauge(&AGE, "w", 1.5);
        }
        t.tick(4 * step); // a not written: a gap
        t.tick(5 * step).counter(&REQS, "a", 200); // after a gap: no rate
        t.tick(6 * step).counter(&REQS, "a", 10); // went down: restarted
        t.tick(7 * step).counter(&REQS, "a", 30);
        let charts = t.charts();
        assert_eq!(charts[0].chart.id, "age", "by order");
        let a = &charts[1].lines[0].points;
        let per_s = |n: f32| Some(n / STEP.as_secs_f32());
        assert_eq!(a, &[None, per_s(20.0), per_s(40.0), None, None, None, per_s(20.0)]);
        assert_eq!(charts[0].lines[0].points[2], Some(1.5));
        assert_eq!(t.now_ms(), 7 * step);
    }

    #[test]
    fn quantiles_of_the_last_step() {
        let mut t = Timeline::default();
        let bounds: &'static [u64] = &[1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10_000];
        let mut s = Snapshot {
            bounds_us: bounds,
            ..Snapshot::default()
        };
        t.tick(1).quantiles(&REQS, &s, &[("p50", 0.5), ("p99", 0.99)]);
        s.latency_buckets[0] = 98; // 98 at <= 1 ms
        s.latency_buckets[9] = 2; // 2 at <= 10 ms
        t.tick(2).quantiles(&REQS, &s, &[("p50", 0.5), ("p99", 0.99)]);
        t.tick(3).quantiles(&REQS, &s, &[("p50", 0.5), ("p99", 0.99)]); // nothing new
        let charts = t.charts();
        let get = |l: &str| charts[0].lines.iter().find(|x| x.label == l).unwrap().points.clone();
        assert_eq!(get("p50"), [None, Some(0.001), None]);
        assert_eq!(get("p99"), [None, Some(0.01), None]);
    }

    #[test]
    fn the_ring_keeps_fifteen_minutes() {
        let mut t = Timeline::default();
        for i in 0..(3 * POINTS as u64) {
            t.tick(i).gauge(&AGE, "w", i as f64);
        }
        let charts = t.charts();
        let points = &charts[0].lines[0].points;
        assert_eq!(points.len(), POINTS);
        assert_eq!(points.last(), Some(&Some((3 * POINTS - 1) as f32)));
        assert_eq!(points[0], Some((2 * POINTS) as f32));
        assert_eq!(POINTS as u64 * STEP.as_secs(), 15 * 60);
    }

    /// 10x the services expected (5,000): 50,000 services offering a series
    /// each tick. The components offer only their top few (TopK), but even a
    /// careless one cannot grow the table past MAX_SERIES: memory stays under
    /// 600 KiB, and a tick costs what it writes. Measured here (debug build,
    /// loaded 2-core machine): printed, and bounded loosely so it cannot flake.
    #[test]
    fn memory_is_bounded_at_ten_times_the_expected_services() {
        let names: Vec<String> = (0..50_000).map(|i| format!("service-{i:05}")).collect();
        let mut t = Timeline::default();
        let mut worst_tick = Duration::ZERO;
        for round in 0..5u64 {
            let started = std::time::Instant::now();
            let mut tick = t.tick(round * 2000);
            for (i, name) in names.iter().enumerate() {
                tick.counter(&REQS, name, round * i as u64);
            }
            worst_tick = worst_tick.max(started.elapsed());
        }
        assert_eq!(t.len(), MAX_SERIES);
        assert!(t.dropped() > 0, "past the bound, new series are refused and counted");
        let memory = t.memory();
        assert!(memory < 600 * 1024, "{memory} bytes");
        // The way components feed it: one pass over 50,000 counters, the top 8 kept.
        let started = std::time::Instant::now();
        let mut top = TopK::<&str, 8>::default();
        for (i, name) in names.iter().enumerate() {
            top.offer((i as u64 * 7919) % 50_000, name.as_str());
        }
        let top = top.into_sorted();
        let pass = started.elapsed();
        assert_eq!(top.len(), 8);
        assert_eq!(top[0].0, 49_999);
        println!(
            "timeline at 50,000 services: {memory} bytes, {} series; worst tick {worst_tick:?} (50,000 offered); \
             top-8 pass over 50,000: {pass:?}",
            t.len()
        );
        assert!(pass < Duration::from_secs(1), "{pass:?}");
    }

    #[test]
    fn top_k_keeps_the_largest_and_ignores_zero() {
        let mut top = TopK::<u32, 3>::default();
        for (v, id) in [(5, 1), (0, 2), (9, 3), (1, 4), (7, 5), (6, 6)] {
            top.offer(v, id);
        }
        assert_eq!(top.into_sorted(), [(9, 3), (7, 5), (6, 6)]);
        let mut few = TopK::<u32, 3>::default();
        few.offer(2, 1);
        assert_eq!(few.into_sorted(), [(2, 1)]);
    }

    #[test]
    fn long_labels_are_cut_at_a_character() {
        let long = "é".repeat(100);
        assert!(cut(&long).len() <= MAX_LABEL);
        assert!(cut(&long).chars().all(|c| c == 'é'));
    }
}
