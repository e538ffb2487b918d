//! Results as tables of samples: every cell keeps the value of each interleaved round, and is shown
//! as its median with the range (min–max) beside it, so drift on a shared machine shows.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

/// One cell: a value per round (rounds that could not measure it are left out).
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn push(&mut self, v: f64) {
        if v.is_finite() {
            self.0.push(v);
        }
    }

    pub fn median(&self) -> Option<f64> {
        median(&self.0)
    }

    pub fn min(&self) -> Option<f64> {
        self.0.iter().copied().reduce(f64::min)
    }

    pub fn max(&self) -> Option<f64> {
        self.0.iter().copied().reduce(f64::max)
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Value at quantile `q` (0..=1) of `sorted`, nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[derive(Clone, Debug)]
pub struct Column {
    pub name: String,
    pub unit: String,
    /// Digits after the decimal point when shown.
    pub digits: usize,
}

pub fn col(name: &str, unit: &str, digits: usize) -> Column {
    Column {
        name: name.into(),
        unit: unit.into(),
        digits,
    }
}

/// A table filled cell by cell as rounds complete; rows and columns keep their first-use order.
#[derive(Debug)]
pub struct Table {
    pub id: String,
    pub title: String,
    pub notes: Vec<String>,
    pub columns: Vec<Column>,
    rows: Vec<String>,
    cells: BTreeMap<(usize, usize), Samples>,
}

impl Table {
    pub fn new(id: &str, title: &str, columns: Vec<Column>) -> Table {
        Table {
            id: id.into(),
            title: title.into(),
            notes: Vec::new(),
            columns,
            rows: Vec::new(),
            cells: BTreeMap::new(),
        }
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    fn row_index(&mut self, row: &str) -> usize {
        match self.rows.iter().position(|r| r == row) {
            Some(i) => i,
            None => {
                self.rows.push(row.into());
                self.rows.len() - 1
            }
        }
    }

    fn col_index(&self, column: &str) -> usize {
        self.columns
            .iter()
            .position(|c| c.name == column)
            .unwrap_or_else(|| panic!("table {}: no column {column:?}", self.id))
    }

    /// Declares a row (so rows appear in a chosen order even before their first value).
    pub fn row(&mut self, row: &str) {
        self.row_index(row);
    }

    pub fn add(&mut self, row: &str, column: &str, v: f64) {
        let (r, c) = (self.row_index(row), self.col_index(column));
        self.cells.entry((r, c)).or_default().push(v);
    }

    fn cell_text(&self, r: usize, c: usize) -> String {
        let Some(s) = self.cells.get(&(r, c)) else {
            return "–".into();
        };
        let d = self.columns[c].digits;
        match (s.median(), s.min(), s.max()) {
            (Some(m), Some(lo), Some(hi)) if s.0.len() > 1 => {
                format!("{m:.d$} ({lo:.d$}–{hi:.d$})")
            }
            (Some(m), _, _) => format!("{m:.d$}"),
            _ => "–".into(),
        }
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        let head: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                if c.unit.is_empty() {
                    c.name.clone()
                } else {
                    format!("{} ({})", c.name, c.unit)
                }
            })
            .collect();
        let _ = writeln!(out, "| | {} |", head.join(" | "));
        let _ = writeln!(out, "|---|{}", "---:|".repeat(head.len()));
        for (r, name) in self.rows.iter().enumerate() {
            let cells: Vec<String> = (0..self.columns.len())
                .map(|c| self.cell_text(r, c))
                .collect();
            let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    pub fn json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .enumerate()
            .map(|(r, name)| {
                let mut cells = serde_json::Map::new();
                for (c, column) in self.columns.iter().enumerate() {
                    if let Some(s) = self.cells.get(&(r, c)) {
                        cells.insert(
                            column.name.clone(),
                            json!({
                                "unit": column.unit,
                                "median": s.median(),
                                "min": s.min(),
                                "max": s.max(),
                                "samples": s.0,
                            }),
                        );
                    }
                }
                json!({ "name": name, "cells": cells })
            })
            .collect();
        json!({
            "id": self.id,
            "title": self.title,
            "notes": self.notes,
            "columns": self.columns.iter().map(|c| json!({"name": c.name, "unit": c.unit})).collect::<Vec<_>>(),
            "rows": rows,
        })
    }
}

/// What ran where: part of every report.
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub date: String,
    pub commit: String,
    pub command: String,
}

impl Machine {
    pub fn json(&self) -> Value {
        json!({
            "kernel": self.kernel,
            "cpu": self.cpu,
            "cores": self.cores,
            "memory_gib": self.memory_gib,
            "date": self.date,
            "commit": self.commit,
            "command": self.command,
        })
    }
}

pub fn write(dir: &Path, machine: &Machine, quick: bool, tables: &[Table]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let doc = json!({
        "machine": machine.json(),
        "quick": quick,
        "tables": tables.iter().map(Table::json).collect::<Vec<_>>(),
    });
    let json_path = dir.join("bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = dir.join("BENCHMARKS.md");
    std::fs::write(&md_path, markdown(machine, quick, tables))
        .with_context(|| format!("writing {}", md_path.display()))?;
    Ok(())
}

pub fn markdown(machine: &Machine, quick: bool, tables: &[Table]) -> String {
    let mut out = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        out,
        "Measured {} on {} ({} cores, {:.0} GiB), Linux {}, commit {}{}.\n",
        machine.date,
        machine.cpu,
        machine.cores,
        machine.memory_gib,
        machine.kernel,
        machine.commit,
        if quick {
            " — **quick run** (fewer rounds, shorter runs)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "```sh\n{}\n```\n", machine.command);
    out.push_str(
        "Every cell is the median over interleaved rounds (A B A B …), with the range \
         (min–max) in parentheses. Raw numbers: `bench.json` beside this file.\n\n",
    );
    for t in tables {
        out.push_str(&t.markdown());
        out.push('\n');
    }
    out
}
