//! The peers bench's result table: printed plain and as markdown, appended to
//! `target/bench/peers.csv`; raw samples to `peers_samples.csv`.

use crate::support::bench::{Csv, f, load1, min_median};
use crate::vm::Kind;

/// (p50, min, max) of `v`.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let (min, med) = min_median(v);
    (med, min, v.iter().copied().fold(f64::NAN, f64::max))
}

/// One line of the result table: the same figure for both VMMs.
pub struct Row {
    metric: String,
    unit: &'static str,
    vmm: Option<f64>,
    fc: Option<f64>,
}

/// The result table, its CSVs and the raw samples.
pub struct Table {
    /// The bench run.
    pub run: u64,
    /// The rows so far.
    pub rows: Vec<Row>,
    /// `peers_samples.csv`.
    pub samples: Csv,
}

impl Table {
    /// A row: `metric` in `unit` for `vmm` and Firecracker (None: not measured).
    pub fn add(
        &mut self,
        metric: impl Into<String>,
        unit: &'static str,
        vmm: Option<f64>,
        fc: Option<f64>,
    ) {
        self.rows.push(Row {
            metric: metric.into(),
            unit,
            vmm,
            fc,
        });
    }

    /// A raw sample for `peers_samples.csv`.
    pub fn sample(&self, kind: Kind, what: &str, iter: usize, value: f64) {
        let fields = [
            self.run.to_string(),
            kind.name().into(),
            what.into(),
            iter.to_string(),
            f(value),
            f(load1()),
        ];
        self.samples.row(&fields);
    }

    /// Prints the table (plain and markdown) and appends it to `peers.csv`.
    pub fn finish(&self, fc_note: &str) {
        let csv = Csv::new("peers", "run,metric,unit,vmm,firecracker,ratio,load1");
        let cell = |v: Option<f64>| v.map_or("—".to_string(), fmt_num);
        let ratio = |r: &Row| match (r.vmm, r.fc) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        println!("\npeers: vmm vs firecracker, same run ({fc_note}); ratio = vmm / firecracker");
        println!(
            "{:<46} {:>12} {:>12} {:>8}",
            "metric", "vmm", "firecracker", "ratio"
        );
        let mut md =
            String::from("| Metric | vmm | Firecracker | vmm / FC |\n|---|---:|---:|---:|\n");
        for r in &self.rows {
            let q = ratio(r).map_or("—".to_string(), fmt_ratio);
            let m = format!("{} ({})", r.metric, r.unit);
            println!("{m:<56} {:>12} {:>12} {q:>8}", cell(r.vmm), cell(r.fc));
            md += &format!("| {m} | {} | {} | {q} |\n", cell(r.vmm), cell(r.fc));
            let opt = |v: Option<f64>| v.map_or(String::new(), f);
            csv.row(&[
                self.run.to_string(),
                r.metric.clone(),
                r.unit.into(),
                opt(r.vmm),
                opt(r.fc),
                ratio(r).map_or(String::new(), |q| format!("{q:.6}")),
                f(load1()),
            ]);
        }
        println!("\nmarkdown:\n\n{md}");
    }
}

/// A ratio with at least two significant digits.
pub fn fmt_ratio(q: f64) -> String {
    let digits = if q >= 0.1 {
        2
    } else {
        (2 - q.log10().floor() as i32).clamp(2, 6)
    } as usize;
    format!("{q:.digits$}×")
}

/// A number with a sensible number of digits.
pub fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
