//! What a benchmark hands back: its parameters, the device, named figures and an optional table
//! of rows, printable as an aligned text table or as one JSON object with the same content.

use super::measure::CpuInfo;
use serde_json::{json, Map, Value};

/// One value of a figure or a table cell.
#[derive(Clone, Debug)]
pub enum Cell {
    /// A measured or derived number, shown with `decimals` places in text.
    Num {
        value: f64,
        decimals: usize,
    },
    /// An exact count (FLOPs, elements).
    Count(u64),
    /// A byte count: exact in JSON, MiB in text.
    Bytes(u64),
    Text(String),
    /// Not available (cannot be measured or counted honestly here); `null` in JSON.
    NotAvailable,
}

impl Cell {
    pub fn num(value: f64, decimals: usize) -> Cell {
        Cell::Num { value, decimals }
    }

    /// A byte count, `n/a` when unknown.
    pub fn bytes(b: Option<u64>) -> Cell {
        b.map_or(Cell::NotAvailable, Cell::Bytes)
    }

    fn to_json(&self) -> Value {
        match self {
            Cell::Num { value, .. } => json!(value),
            Cell::Count(n) | Cell::Bytes(n) => json!(n),
            Cell::Text(s) => json!(s),
            Cell::NotAvailable => Value::Null,
        }
    }

    fn to_text(&self) -> String {
        match self {
            Cell::Num { value, decimals } => format!("{value:.decimals$}"),
            Cell::Count(n) => n.to_string(),
            Cell::Bytes(n) => format!("{:.2} MiB", *n as f64 / (1u64 << 20) as f64),
            Cell::Text(s) => s.clone(),
            Cell::NotAvailable => "n/a".into(),
        }
    }
}

/// A named result: `key` in JSON, `label` and `unit` in text.
#[derive(Clone, Debug)]
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub value: Cell,
    pub unit: &'static str,
}

/// A table column: `key` in JSON rows, `header` in text.
#[derive(Clone, Debug)]
pub struct Column {
    pub key: &'static str,
    pub header: &'static str,
}

#[derive(Clone, Debug)]
pub struct Table {
    /// The JSON key of the rows' array.
    pub name: &'static str,
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Cell>>,
}

#[derive(Clone, Debug)]
pub struct Report {
    /// The subcommand (`kernels`, `mmdit`, `sample`, `step`).
    pub command: &'static str,
    /// The parameters the run used, defaults filled in.
    pub parameters: Vec<(&'static str, Value)>,
    pub cpu: CpuInfo,
    /// The kernel device the figures were measured on (`("cuda", name)`, `("emu", "emulator")`);
    /// `None` for the CPU backend.
    pub kernel_device: Option<(&'static str, String)>,
    pub figures: Vec<Figure>,
    /// Tables of rows, each under its own JSON key.
    pub tables: Vec<Table>,
    /// What the figures mean where that is not obvious (method, what is not counted).
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(command: &'static str, parameters: Vec<(&'static str, Value)>) -> Report {
        Report {
            command,
            parameters,
            kernel_device: None,
            cpu: CpuInfo::detect(),
            figures: Vec::new(),
            tables: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub fn figure(
        &mut self,
        key: &'static str,
        label: &'static str,
        value: Cell,
        unit: &'static str,
    ) {
        self.figures.push(Figure {
            key,
            label,
            value,
            unit,
        });
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// The value of a figure by key (tests and callers reading a report programmatically).
    pub fn value(&self, key: &str) -> Option<&Cell> {
        self.figures.iter().find(|f| f.key == key).map(|f| &f.value)
    }

    pub fn to_json(&self) -> Value {
        let results: Map<String, Value> = self
            .figures
            .iter()
            .map(|f| (f.key.to_string(), f.value.to_json()))
            .collect();
        let parameters: Map<String, Value> = self
            .parameters
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let device = match &self.kernel_device {
            None => json!({
                "kind": "cpu",
                "description": self.cpu.describe(),
                "cpu_model": self.cpu.model,
                "threads": self.cpu.threads,
            }),
            Some((kind, name)) => json!({
                "kind": kind,
                "name": name,
                "host": self.cpu.describe(),
            }),
        };
        let mut out = json!({
            "command": self.command,
            "parameters": parameters,
            "device": device,
            "results": results,
            "notes": self.notes,
        });
        for t in &self.tables {
            let rows: Vec<Value> = t
                .rows
                .iter()
                .map(|r| {
                    let obj: Map<String, Value> = t
                        .columns
                        .iter()
                        .zip(r)
                        .map(|(c, v)| (c.key.to_string(), v.to_json()))
                        .collect();
                    Value::Object(obj)
                })
                .collect();
            out[t.name] = Value::Array(rows);
        }
        out
    }

    pub fn to_text(&self) -> String {
        let device = match &self.kernel_device {
            None => self.cpu.describe(),
            Some((kind, name)) => format!("{kind}: {name}; host {}", self.cpu.describe()),
        };
        let mut s = format!("advdmd bench {}  ({device})\n", self.command);
        let params: Vec<String> = self
            .parameters
            .iter()
            .map(|(k, v)| match v {
                Value::String(t) => format!("{k}={t}"),
                other => format!("{k}={other}"),
            })
            .collect();
        s += &format!("parameters: {}\n\n", params.join(" "));
        let figure_rows: Vec<Vec<String>> = self
            .figures
            .iter()
            .map(|f| vec![f.label.to_string(), f.value.to_text(), f.unit.to_string()])
            .collect();
        s += &aligned(&figure_rows, &[false, true, false]);
        for t in &self.tables {
            let mut rows = vec![t.columns.iter().map(|c| c.header.to_string()).collect()];
            rows.extend(t.rows.iter().map(|r| r.iter().map(Cell::to_text).collect()));
            let right: Vec<bool> = (0..t.columns.len()).map(|i| i > 1).collect();
            s += "\n";
            s += &aligned(&rows, &right);
        }
        for n in &self.notes {
            s += &format!("\nnote: {n}");
        }
        s.push('\n');
        s
    }
}

/// Rows padded to their columns' widths; `right[i]` right-aligns column `i` (numbers).
fn aligned(rows: &[Vec<String>], right: &[bool]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|v| v.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, v)| {
                let pad = " ".repeat(widths[c] - v.chars().count());
                if right.get(c).copied().unwrap_or(false) {
                    format!("{pad}{v}")
                } else {
                    format!("{v}{pad}")
                }
            })
            .collect();
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out
}
