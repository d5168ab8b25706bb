//! Figures (samples with min / median / max), targets, and the three outputs:
//! the terminal table, the JSON file, the README section.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// How a figure is judged against its target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Pass when the median is at most this.
    AtMost(f64),
    /// Pass when the median is at least this.
    AtLeast(f64),
}

impl Target {
    fn passes(self, v: f64) -> bool {
        match self {
            Self::AtMost(t) => v <= t,
            Self::AtLeast(t) => v >= t,
        }
    }

    fn describe(self, unit: &str) -> String {
        match self {
            Self::AtMost(t) => format!("≤ {}{}", fmt_num(t), unit_suffix(unit)),
            Self::AtLeast(t) => format!("≥ {}{}", fmt_num(t), unit_suffix(unit)),
        }
    }
}

fn unit_suffix(unit: &str) -> String {
    match unit {
        "x" | "%" => unit.to_string(),
        "" => String::new(),
        u => format!(" {u}"),
    }
}

/// One measured quantity.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Stable key, e.g. `per_packet.established.ratio`.
    pub key: String,
    /// Section (table heading).
    pub section: String,
    /// What it is, for people.
    pub label: String,
    pub unit: String,
    pub samples: Vec<f64>,
    pub target: Option<Target>,
    /// Free-form remark (e.g. "> cap", how it was measured).
    pub note: String,
}

impl Figure {
    pub fn new(section: &str, key: &str, label: &str, unit: &str, samples: Vec<f64>) -> Self {
        Self {
            key: key.into(),
            section: section.into(),
            label: label.into(),
            unit: unit.into(),
            samples,
            target: None,
            note: String::new(),
        }
    }

    pub fn target(mut self, t: Target) -> Self {
        self.target = Some(t);
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }

    fn sorted(&self) -> Vec<f64> {
        let mut s: Vec<f64> = self
            .samples
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .collect();
        s.sort_by(f64::total_cmp);
        s
    }

    pub fn min(&self) -> Option<f64> {
        self.sorted().first().copied()
    }

    pub fn max(&self) -> Option<f64> {
        self.sorted().last().copied()
    }

    pub fn median(&self) -> Option<f64> {
        median(&self.samples)
    }

    /// Whether the median meets the target (None: no target or no value).
    pub fn pass(&self) -> Option<bool> {
        Some(self.target?.passes(self.median()?))
    }

    fn mark(&self) -> &'static str {
        match self.pass() {
            Some(true) => "pass",
            Some(false) => "MISS",
            None => "",
        }
    }

    fn json(&self) -> Value {
        json!({
            "key": self.key,
            "section": self.section,
            "label": self.label,
            "unit": self.unit,
            "min": self.min(),
            "median": self.median(),
            "max": self.max(),
            "samples": self.samples.len(),
            "values": self.samples,
            "target": self.target.map(|t| t.describe(&self.unit)),
            "pass": self.pass(),
            "note": self.note,
        })
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Percentile (nearest rank) of unsorted values.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1])
}

pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 100.0 {
        format!("{:.0}", v)
    } else if a >= 10.0 {
        format!("{:.1}", v)
    } else if a >= 0.1 {
        format!("{:.2}", v)
    } else {
        format!("{:.4}", v)
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(fmt_num).unwrap_or_else(|| "–".into())
}

/// Facts about the machine and the tree the run measured.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub git_commit: String,
    pub git_dirty: bool,
}

impl Machine {
    pub fn detect(repo: &Path) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .arg("-C")
                .arg(repo)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let git_commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
        let git_dirty =
            git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        Self {
            cpu_model,
            cores,
            kernel,
            git_commit,
            git_dirty,
        }
    }
}

/// Everything one run produced.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub machine: Machine,
    pub profile: String,
    pub started_unix: u64,
    pub duration: Duration,
    pub figures: Vec<Figure>,
    /// Parts that failed, with the error (the run goes on without them).
    pub errors: Vec<(String, String)>,
    /// How things were measured, one line each.
    pub notes: Vec<String>,
}

impl Report {
    pub fn figure(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.key == key)
    }

    pub fn json(&self) -> Value {
        json!({
            "machine": {
                "cpu_model": self.machine.cpu_model,
                "cores": self.machine.cores,
                "kernel": self.machine.kernel,
            },
            "git_commit": self.machine.git_commit,
            "git_dirty": self.machine.git_dirty,
            "profile": self.profile,
            "started_unix": self.started_unix,
            "duration_s": self.duration.as_secs_f64(),
            "figures": self.figures.iter().map(Figure::json).collect::<Vec<_>>(),
            "errors": self.errors.iter().map(|(p, e)| json!({"part": p, "error": e})).collect::<Vec<_>>(),
            "notes": self.notes,
        })
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "lb benchmark ({}) — {} × {}, kernel {}, commit {}{}",
            self.profile,
            self.machine.cores,
            self.machine.cpu_model,
            self.machine.kernel,
            short(&self.machine.git_commit),
            if self.machine.git_dirty { "+dirty" } else { "" }
        );
        let mut section = String::new();
        for f in &self.figures {
            if f.section != section {
                section.clone_from(&f.section);
                let _ = writeln!(out, "\n{section}");
                let _ = writeln!(
                    out,
                    "  {:<52} {:>10} {:>10} {:>10} {:<8} {:<14}",
                    "", "median", "min", "max", "unit", "target"
                );
            }
            let _ = writeln!(
                out,
                "  {:<52} {:>10} {:>10} {:>10} {:<8} {:<14} {}{}",
                f.label,
                fmt_opt(f.median()),
                fmt_opt(f.min()),
                fmt_opt(f.max()),
                f.unit,
                f.target.map(|t| t.describe(&f.unit)).unwrap_or_default(),
                f.mark(),
                if f.note.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", f.note)
                }
            );
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\nParts that failed:");
            for (p, e) in &self.errors {
                let _ = writeln!(out, "  {p}: {e}");
            }
        }
        let _ = writeln!(out, "\nrun took {:.0} s", self.duration.as_secs_f64());
        out
    }

    /// The README results section (Markdown).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### Latest results\n");
        let _ = writeln!(
            out,
            "From `cargo xtask bench{}` on {} × {}, kernel {}, commit `{}`{}; {} s. \
             The machine is shared and noisy (±15–40 % run to run), so only figures of the \
             same run are compared: every comparison below was measured interleaved, and each \
             figure is the median of its rounds. Targets are shown, not enforced.\n",
            if self.profile == "quick" {
                " --quick"
            } else {
                ""
            },
            self.machine.cores,
            self.machine.cpu_model,
            self.machine.kernel,
            short(&self.machine.git_commit),
            if self.machine.git_dirty {
                " (with local changes)"
            } else {
                ""
            },
            self.duration.as_secs()
        );
        let mut section = String::new();
        for f in &self.figures {
            if f.section != section {
                section.clone_from(&f.section);
                let _ = writeln!(out, "\n#### {section}\n");
                let _ = writeln!(out, "| | median | min | max | unit | target | |");
                let _ = writeln!(out, "|---|---:|---:|---:|---|---|---|");
            }
            let _ = writeln!(
                out,
                "| {}{} | {} | {} | {} | {} | {} | {} |",
                f.label,
                if f.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", f.note)
                },
                fmt_opt(f.median()),
                fmt_opt(f.min()),
                fmt_opt(f.max()),
                f.unit,
                f.target.map(|t| t.describe(&f.unit)).unwrap_or_default(),
                match f.pass() {
                    Some(true) => "✓",
                    Some(false) => "✗",
                    None => "",
                }
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out, "\n#### How it is measured\n");
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\nParts that failed in this run:\n");
            for (p, e) in &self.errors {
                let _ = writeln!(out, "- {p}: {e}");
            }
        }
        out
    }

    /// Writes `<dir>/<unix time>-<profile>.json`, `<dir>/latest.json` and
    /// `<dir>/README-section.md`; returns the JSON file's path.
    pub fn write(&self, dir: &Path) -> Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let text = serde_json::to_string_pretty(&self.json())?;
        let path = dir.join(format!("{}-{}.json", self.started_unix, self.profile));
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        std::fs::write(dir.join("latest.json"), &text)?;
        std::fs::write(dir.join("README-section.md"), self.markdown())?;
        Ok(path)
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}
