//! The NBD server's metrics, read at scrape time from the counters the server keeps anyway
//! (`crate::server::stats`, through a [`ServerHandle`]) and from the export provider's attach
//! failures: per export requests by command, payload bytes, errors by kind, latency histograms
//! for read/write/flush, requests in flight and connections; server-wide accepted connections,
//! refusals by reason and the buffer budget in use.

use std::fmt::Error;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::datadir::DataDirError;
use crate::exports::DataDirProvider;
use crate::kms::KmsError;
use crate::server::stats::{ErrorKind, Histogram, RefusalReason, LATENCY_BOUNDS_US};
use crate::server::ServerHandle;

/// The short reason an attach failed, as the `reason` label of
/// `cryptnbd_attach_failures_total` (a small fixed set, so the series stay few).
pub fn attach_reason(e: &DataDirError) -> &'static str {
    match e {
        DataDirError::Kms { source, .. } => match source {
            KmsError::KeyNotUsable { state, .. } => match state.name() {
                "disabled" => "key_disabled",
                "pending deletion" => "key_pending_deletion",
                _ => "key_not_usable",
            },
            KmsError::KeyDeleted { .. } => "key_deleted",
            KmsError::KeyNotFound { .. } => "key_not_found",
            KmsError::CannotDecrypt { .. } => "cannot_decrypt",
            _ => "kms_other",
        },
        DataDirError::InUse { .. } => "in_use",
        DataDirError::ContextMismatch { .. } | DataDirError::BadDataKey { .. } => "bad_data_key",
        DataDirError::Volume { .. } => "volume",
        _ => "other",
    }
}

struct NbdCollector {
    server: ServerHandle,
    provider: Option<Arc<DataDirProvider>>,
}

impl std::fmt::Debug for NbdCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NbdCollector")
    }
}

/// A registry holding the NBD server's metrics (`provider`: for attach failures).
pub fn registry(server: ServerHandle, provider: Option<Arc<DataDirProvider>>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(NbdCollector { server, provider }));
    r
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, u64)],
) -> Result<(), Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(v, None)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, i64)],
) -> Result<(), Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

/// Sum in seconds, count, and the buckets (upper bound in seconds, count in that bucket alone:
/// the encoder makes them cumulative).
fn hist(h: &Histogram) -> (f64, u64, Vec<(f64, u64)>) {
    let (b, sum_us) = h.read();
    let out = b
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let le = LATENCY_BOUNDS_US
                .get(i)
                .map_or(f64::INFINITY, |us| *us as f64 / 1e6);
            (le, *n)
        })
        .collect();
    (sum_us as f64 / 1e6, b.iter().sum(), out)
}

impl Collector for NbdCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), Error> {
        let exports = self.server.stats().exports();
        let conns = self.server.connections();
        let per =
            |f: &dyn Fn(&crate::server::stats::ExportStats) -> u64| -> Vec<(Labels<'_>, u64)> {
                exports
                    .iter()
                    .map(|(n, s)| (vec![("export", n.as_str())], f(s)))
                    .collect()
            };
        let mut requests = Vec::new();
        for (n, s) in &exports {
            for (cmd, v) in [
                ("read", &s.reads),
                ("write", &s.writes),
                ("flush", &s.flushes),
                ("other", &s.others),
            ] {
                requests.push((
                    vec![("export", n.as_str()), ("command", cmd)],
                    v.load(Relaxed),
                ));
            }
        }
        counter(
            &mut enc,
            "cryptnbd_requests",
            "NBD requests run, by export and command",
            &requests,
        )?;
        let mut bytes = Vec::new();
        for (n, s) in &exports {
            bytes.push((
                vec![("export", n.as_str()), ("direction", "read")],
                s.read_bytes.load(Relaxed),
            ));
            bytes.push((
                vec![("export", n.as_str()), ("direction", "write")],
                s.write_bytes.load(Relaxed),
            ));
        }
        counter(
            &mut enc,
            "cryptnbd_bytes",
            "Payload bytes of READ and WRITE requests",
            &bytes,
        )?;
        let mut errors = Vec::new();
        for (n, s) in &exports {
            for k in ErrorKind::ALL {
                errors.push((
                    vec![("export", n.as_str()), ("kind", k.label())],
                    s.errors_of(k),
                ));
            }
        }
        counter(
            &mut enc,
            "cryptnbd_request_errors",
            "Requests answered with an error, by kind",
            &errors,
        )?;
        let in_flight: Vec<_> = per(&|s| s.in_flight.load(Relaxed))
            .into_iter()
            .map(|(l, v)| (l, v as i64))
            .collect();
        gauge(
            &mut enc,
            "cryptnbd_requests_in_flight",
            "Requests running now",
            &in_flight,
        )?;
        let conn_counts: Vec<(Labels<'_>, i64)> = exports
            .iter()
            .map(|(n, _)| {
                let c = conns
                    .iter()
                    .filter(|c| c.export.as_deref() == Some(n))
                    .count();
                (vec![("export", n.as_str())], c as i64)
            })
            .collect();
        gauge(
            &mut enc,
            "cryptnbd_connections",
            "Connections serving the export now",
            &conn_counts,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "cryptnbd_request_duration_seconds",
                "Time from a request read to its reply queued, by export and command",
                None,
                MetricType::Histogram,
            )?;
            for (n, s) in &exports {
                for (cmd, h) in [
                    ("read", &s.read_latency),
                    ("write", &s.write_latency),
                    ("flush", &s.flush_latency),
                ] {
                    let (sum, count, buckets) = hist(h);
                    let labels = vec![("export", n.as_str()), ("command", cmd)];
                    m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                        sum,
                        count,
                        &buckets,
                        None::<&std::collections::HashMap<usize, Exemplar<NoLabelSet, f64>>>,
                    )?;
                }
            }
        }
        let st = self.server.stats();
        counter(
            &mut enc,
            "cryptnbd_connections_accepted",
            "Connections accepted on every listener",
            &[(vec![], st.connections_accepted.load(Relaxed))],
        )?;
        let refusals: Vec<_> = RefusalReason::ALL
            .iter()
            .map(|r| (vec![("reason", r.label())], st.refusals_of(*r)))
            .collect();
        counter(
            &mut enc,
            "cryptnbd_connections_refused",
            "Connections turned away: limit, peer (Unix credentials), handshake (TLS, protocol, export)",
            &refusals,
        )?;
        let (used, limit) = self.server.budget_in_use();
        gauge(
            &mut enc,
            "cryptnbd_buffer_budget_bytes_in_use",
            "Request buffer memory reserved now",
            &[(vec![], used as i64)],
        )?;
        gauge(
            &mut enc,
            "cryptnbd_buffer_budget_bytes",
            "Request buffer memory allowed (--buffer-budget)",
            &[(vec![], limit as i64)],
        )?;
        if let Some(p) = &self.provider {
            let failures = p.attach_failures();
            let samples: Vec<_> = failures
                .iter()
                .map(|(r, n)| (vec![("reason", *r)], *n))
                .collect();
            counter(
                &mut enc,
                "cryptnbd_attach_failures",
                "Attaches refused, by reason (key state, in use, volume...)",
                &samples,
            )?;
        }
        Ok(())
    }
}
