//! Counters for the relay, rendered in the Prometheus text exposition format (`GET /metrics`).
//!
//! The socket layer bumps the fixed counters below. Other parts of the process (the engine,
//! storage) add their own series with [`Metrics::register`]: a name, a help line, a type and
//! a closure read at render time, so they keep their own atomics and this module stays small.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

/// Prefix of every series this module renders.
const PREFIX: &str = "sheaf";

/// Distinct label values kept per labeled counter; later ones are counted under `other`.
const MAX_LABELS: usize = 32;

/// Prometheus metric type of a registered series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            MetricType::Counter => "counter",
            MetricType::Gauge => "gauge",
        }
    }
}

type ValueFn = Box<dyn Fn() -> f64 + Send + Sync>;

struct Extra {
    name: String,
    help: String,
    ty: MetricType,
    value: ValueFn,
}

/// A counter split by one label, with a bounded number of label values.
#[derive(Default)]
pub struct LabeledCounter {
    values: Mutex<BTreeMap<String, u64>>,
}

impl LabeledCounter {
    pub fn inc(&self, label: &str) {
        let mut values = self.values.lock();
        if let Some(v) = values.get_mut(label) {
            *v += 1;
        } else if values.len() < MAX_LABELS {
            values.insert(label.to_owned(), 1);
        } else {
            *values.entry("other".to_owned()).or_insert(0) += 1;
        }
    }

    pub fn get(&self, label: &str) -> u64 {
        self.values.lock().get(label).copied().unwrap_or(0)
    }

    fn snapshot(&self) -> Vec<(String, u64)> {
        self.values
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// The relay's counters. Share it as `Arc<Metrics>`; every method takes `&self`.
#[derive(Default)]
pub struct Metrics {
    /// WebSocket connections being served now (rejected ones are not counted).
    pub connections_open: AtomicI64,
    /// WebSocket connections served since start.
    pub connections_total: AtomicU64,
    /// Connections turned away, by reason (`connection_limit`, `handshake_limit`).
    pub connections_rejected: LabeledCounter,
    /// Failed HTTP/WebSocket handshakes, by kind (`timeout`, `bad_request`, `websocket`, ...).
    pub handshake_failures: LabeledCounter,
    /// Plain HTTP requests answered, by route (`health`, `metrics`, `not_found`, ...).
    pub http_requests: LabeledCounter,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Binary frames that were not protocol messages, by decode error kind.
    pub decode_errors: LabeledCounter,
    /// Closed connections, by reason (see `CloseKind::label`).
    pub closes: LabeledCounter,
    /// Times a connection's reader paused because it went over its rate limit, by bucket
    /// (`messages`, `bytes`).
    pub rate_limited: LabeledCounter,
    extra: RwLock<Vec<Extra>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("connections_open", &self.connections_open)
            .field("connections_total", &self.connections_total)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a series read at render time. `name` gets no prefix: choose it yourself
    /// (e.g. `sheaf_documents_loaded`). Registering a name twice renders it twice: don't.
    pub fn register(
        &self,
        name: impl Into<String>,
        help: impl Into<String>,
        ty: MetricType,
        value: impl Fn() -> f64 + Send + Sync + 'static,
    ) {
        self.extra.write().push(Extra {
            name: name.into(),
            help: help.into(),
            ty,
            value: Box::new(value),
        });
    }

    /// Count a decode error under the name of its variant (`Incomplete`, `Malformed`, `UnknownType`, ...).
    pub fn decode_error(&self, err: &crate::protocol::DecodeError) {
        let dbg = format!("{err:?}");
        let kind: String = dbg
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        self.decode_errors
            .inc(if kind.is_empty() { "unknown" } else { &kind });
    }

    pub(crate) fn frame_in(&self, bytes: usize) {
        self.frames_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn frame_out(&self, bytes: usize) {
        self.frames_out.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Everything in the Prometheus text format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let open = self.connections_open.load(Ordering::Relaxed) as f64;
        simple(
            &mut out,
            "connections_open",
            "WebSocket connections open now.",
            MetricType::Gauge,
            open,
        );
        simple(
            &mut out,
            "connections_total",
            "WebSocket connections accepted and served.",
            MetricType::Counter,
            load(&self.connections_total),
        );
        labeled(
            &mut out,
            "connections_rejected_total",
            "Connections turned away.",
            "reason",
            &self.connections_rejected,
        );
        labeled(
            &mut out,
            "handshake_failures_total",
            "Failed HTTP or WebSocket handshakes.",
            "kind",
            &self.handshake_failures,
        );
        labeled(
            &mut out,
            "http_requests_total",
            "Plain HTTP requests answered.",
            "route",
            &self.http_requests,
        );
        simple(
            &mut out,
            "frames_in_total",
            "WebSocket frames received.",
            MetricType::Counter,
            load(&self.frames_in),
        );
        simple(
            &mut out,
            "frames_out_total",
            "WebSocket frames sent.",
            MetricType::Counter,
            load(&self.frames_out),
        );
        simple(
            &mut out,
            "bytes_in_total",
            "Payload bytes received in WebSocket frames.",
            MetricType::Counter,
            load(&self.bytes_in),
        );
        simple(
            &mut out,
            "bytes_out_total",
            "Payload bytes sent in WebSocket frames.",
            MetricType::Counter,
            load(&self.bytes_out),
        );
        labeled(
            &mut out,
            "decode_errors_total",
            "Binary frames that were not protocol messages.",
            "kind",
            &self.decode_errors,
        );
        labeled(
            &mut out,
            "closes_total",
            "Closed WebSocket connections.",
            "reason",
            &self.closes,
        );
        labeled(
            &mut out,
            "rate_limited_total",
            "Times a connection was throttled for going over its rate limit.",
            "kind",
            &self.rate_limited,
        );
        for e in self.extra.read().iter() {
            header(&mut out, &e.name, &e.help, e.ty);
            let _ = writeln!(out, "{} {}", e.name, fmt_value((e.value)()));
        }
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, ty: MetricType) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {}", ty.as_str());
}

fn simple(out: &mut String, name: &str, help: &str, ty: MetricType, value: f64) {
    let name = format!("{PREFIX}_{name}");
    header(out, &name, help, ty);
    let _ = writeln!(out, "{name} {}", fmt_value(value));
}

fn labeled(out: &mut String, name: &str, help: &str, label: &str, counter: &LabeledCounter) {
    let name = format!("{PREFIX}_{name}");
    header(out, &name, help, MetricType::Counter);
    for (value, n) in counter.snapshot() {
        let value = value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn renders_counters_labels_and_extras() {
        let m = Metrics::new();
        m.frame_in(10);
        m.closes.inc("text_frame");
        m.closes.inc("text_frame");
        m.decode_error(&crate::protocol::DecodeError::Malformed("x".into()));
        let loaded = Arc::new(AtomicU64::new(7));
        let l = loaded.clone();
        m.register(
            "sheaf_documents_loaded",
            "Documents in memory.",
            MetricType::Gauge,
            move || l.load(Ordering::Relaxed) as f64,
        );
        let text = m.render();
        assert!(text.contains("# TYPE sheaf_frames_in_total counter\nsheaf_frames_in_total 1\n"));
        assert!(text.contains("sheaf_bytes_in_total 10\n"));
        assert!(text.contains("sheaf_closes_total{reason=\"text_frame\"} 2\n"));
        assert!(text.contains("sheaf_decode_errors_total{kind=\"Malformed\"} 1\n"));
        assert!(text.contains("# TYPE sheaf_documents_loaded gauge\nsheaf_documents_loaded 7\n"));
    }

    #[test]
    fn label_values_are_bounded() {
        let c = LabeledCounter::default();
        for i in 0..100 {
            c.inc(&format!("l{i}"));
        }
        assert_eq!(c.snapshot().len(), MAX_LABELS + 1);
        assert_eq!(c.get("other"), (100 - MAX_LABELS) as u64);
    }
}
