//! Paired timing for a noisy machine, shared by the engine and ABI
//! benchmarks (`#[path]`-included). A figure and its peer are measured in
//! alternation in the same process, ioasid then peer, so whatever else the
//! machine does lands on both; each alternation gives one ratio, and
//! `benches/report.py` reports their median and spread. Each side runs
//! enough iterations for one sample to last a few milliseconds, so the
//! clock is read twice per sample, never per iteration.
//!
//! Rows go as JSON lines to `target/ioasid-bench/<name>.jsonl`.

#![allow(dead_code)] // each benchmark binary uses part of it

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// One side of a comparison: who it is, what it does, and how to time `n`
/// iterations of it.
pub struct Side<'a> {
    name: &'a str,
    does: &'a str,
    run: Box<dyn FnMut(u64) -> Duration + 'a>,
}

/// A side whose iteration is one call of `f`, its result kept alive.
pub fn iter<'a, R>(name: &'a str, does: &'a str, mut f: impl FnMut() -> R + 'a) -> Side<'a> {
    Side {
        name,
        does,
        run: Box::new(move |n| {
            let t = Instant::now();
            for _ in 0..n {
                black_box(f());
            }
            t.elapsed()
        }),
    }
}

/// A side that times its own `n` iterations, for work that needs untimed
/// set-up or tear-down around each one.
pub fn timed<'a>(name: &'a str, does: &'a str, run: impl FnMut(u64) -> Duration + 'a) -> Side<'a> {
    Side { name, does, run: Box::new(run) }
}

pub struct Harness {
    quick: bool,
    filter: Option<String>,
    alternations: usize,
    sample: Duration,
    out: std::path::PathBuf,
    rows: String,
}

impl Harness {
    /// Reads `IOASID_BENCH_QUICK` and an optional name filter from the
    /// command line (`cargo bench --bench engine -- FILTER`).
    pub fn new(name: &str) -> Harness {
        let quick = std::env::var_os("IOASID_BENCH_QUICK").is_some();
        let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ioasid-bench");
        std::fs::create_dir_all(&dir).unwrap();
        Harness {
            quick,
            filter,
            alternations: if quick { 5 } else { 15 },
            sample: Duration::from_millis(if quick { 5 } else { 20 }),
            out: dir.join(format!("{name}.jsonl")),
            rows: String::new(),
        }
    }

    pub fn quick(&self) -> bool {
        self.quick
    }

    /// How many alternations each comparison runs.
    pub fn alternations(&self) -> usize {
        self.alternations
    }

    /// Whether the filter selects a figure; callers skip their set-up too.
    pub fn wants(&self, figure: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| figure.contains(f))
    }

    /// Times `ours` and `peer` in alternation and records the row.
    pub fn compare(&mut self, figure: &str, ours: Side, peer: Side) {
        self.compare_at(figure, None, ours, peer);
    }

    /// `compare`, for one point `x` of a sweep that the report plots.
    pub fn compare_at(&mut self, figure: &str, x: Option<u64>, mut ours: Side, mut peer: Side) {
        if !self.wants(figure) {
            return;
        }
        let na = calibrate(&mut ours.run, self.sample);
        let nb = calibrate(&mut peer.run, self.sample);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..self.alternations {
            a.push((ours.run)(na).as_nanos() as f64 / na as f64);
            b.push((peer.run)(nb).as_nanos() as f64 / nb as f64);
        }
        self.record(figure, x, "ns", (ours.name, ours.does, &a, None), (peer.name, peer.does, &b, None));
    }

    /// Records a row measured by the caller: per-alternation values of each
    /// side in `unit`, with optional extra JSON fields per side.
    pub fn record(
        &mut self,
        figure: &str,
        x: Option<u64>,
        unit: &str,
        ours: (&str, &str, &[f64], Option<String>),
        peer: (&str, &str, &[f64], Option<String>),
    ) {
        let side = |(name, does, v, extra): (&str, &str, &[f64], Option<String>)| {
            let v: Vec<String> = v.iter().map(|x| format!("{x:.3}")).collect();
            let extra = extra.map(|e| format!(", {e}")).unwrap_or_default();
            format!(r#"{{"name": {}, "does": {}, "values": [{}]{extra}}}"#, quote(name), quote(does), v.join(", "))
        };
        let mid = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!("{figure}: ioasid {:.1} {unit}, {} {:.1} {unit}", mid(ours.2), peer.0, mid(peer.2));
        let x = x.map_or("null".to_string(), |x| x.to_string());
        writeln!(
            self.rows,
            r#"{{"figure": {}, "x": {x}, "unit": {}, "ours": {}, "peer": {}}}"#,
            quote(figure),
            quote(unit),
            side(ours),
            side(peer)
        )
        .unwrap();
        // Written after every row, so a run cut short keeps what it measured.
        std::fs::write(&self.out, &self.rows).unwrap();
    }
}

/// Iterations for one sample of about `target`; the runs that find it are
/// the side's warm-up. A short run is timed twice and the faster kept, so
/// one preempted run cannot pass for a full sample. A side that times only
/// part of its work (untimed set-up) is held to `WALL` samples of wall-clock
/// time, so a slow set-up around a fast timed part cannot run for minutes.
fn calibrate(run: &mut dyn FnMut(u64) -> Duration, target: Duration) -> u64 {
    const WALL: u32 = 20;
    let mut n = 1u64;
    loop {
        let wall = Instant::now();
        let mut t = run(n);
        if t < target * 4 {
            t = t.min(run(n));
        }
        let wall = wall.elapsed().max(Duration::from_nanos(1));
        let t = t.max(Duration::from_nanos(1));
        let scale = (target.as_secs_f64() / t.as_secs_f64()).min((target * WALL).as_secs_f64() / wall.as_secs_f64());
        if scale <= 2.0 {
            return ((n as f64 * scale).round() as u64).max(1);
        }
        n = (n as f64 * scale.min(100.0)).ceil() as u64;
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}
