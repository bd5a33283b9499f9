//! Transport metrics with Linkerd's names: `tcp_open_total`, `tcp_open_connections`,
//! `tcp_close_total{errno}`, `tcp_read_bytes_total`, `tcp_write_bytes_total`.
//!
//! A connection holds an [`OpenConnection`] from the moment its handling is decided;
//! it counts the open, the bytes (atomics only) and, when dropped, the close with its
//! errno, so no path can forget either end.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder,
    LabelValueEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;

use super::Direction;
use crate::discover::Labels;
use crate::mesh::tls::TlsStatus;
use crate::net::error::Errno;

/// Which end of a forwarded connection a series describes, in Linkerd's terms: `src`
/// is the accepted connection, `dst` the one the proxy opened.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Peer {
    Src,
    Dst,
}

/// One transport series: the counters of every connection with the same labels.
#[derive(Debug, Default)]
pub struct TransportSeries {
    open_total: AtomicU64,
    open_connections: AtomicI64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    close_total: [AtomicU64; Errno::ALL.len()],
    /// Milliseconds since the proxy started at the last open or close.
    last_active_ms: AtomicU64,
}

impl TransportSeries {
    pub fn add_read(&self, bytes: usize) {
        self.read_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn add_write(&self, bytes: usize) {
        self.write_bytes.fetch_add(bytes as u64, Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct TransportKey {
    peer: Peer,
    /// `None` once the series cap is reached: such targets share one overflow series.
    target: Option<SocketAddr>,
    tls: TlsStatus,
    /// Discovery's labels of the endpoint (`dst_*`); empty for accepted connections.
    dst: Arc<Labels>,
}

/// The transport series of one direction.
#[derive(Debug)]
pub struct TransportMetrics {
    direction: Direction,
    retain_idle: Duration,
    max_series: usize,
    started: Instant,
    series: Mutex<HashMap<TransportKey, Arc<TransportSeries>>>,
}

/// An open connection's hold on its series: counts the open on creation and the
/// close (with its errno) when finished, so no path can forget either.
#[derive(Debug)]
pub struct OpenConnection {
    series: Arc<TransportSeries>,
    errno: Errno,
    metrics: Arc<TransportMetrics>,
}

impl OpenConnection {
    pub fn series(&self) -> &TransportSeries {
        &self.series
    }

    /// Records how the connection ended; the default is a clean close.
    pub fn set_errno(&mut self, errno: Errno) {
        self.errno = errno;
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.series.close_total[self.errno.index()].fetch_add(1, Relaxed);
        self.series.open_connections.fetch_sub(1, Relaxed);
        self.series
            .last_active_ms
            .store(self.metrics.now_ms(), Relaxed);
    }
}

impl TransportMetrics {
    pub fn new(direction: Direction, retain_idle: Duration, max_series: usize) -> TransportMetrics {
        TransportMetrics {
            direction,
            retain_idle,
            max_series,
            started: Instant::now(),
            series: Mutex::new(HashMap::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Counts a new connection to or from `target` and returns its handle.
    pub fn open(
        self: &Arc<Self>,
        peer: Peer,
        target: SocketAddr,
        tls: TlsStatus,
    ) -> OpenConnection {
        self.open_labelled(peer, target, tls, &Arc::default())
    }

    /// [`TransportMetrics::open`] for an endpoint discovery labelled (`dst_*`).
    pub fn open_labelled(
        self: &Arc<Self>,
        peer: Peer,
        target: SocketAddr,
        tls: TlsStatus,
        dst: &Arc<Labels>,
    ) -> OpenConnection {
        let series = {
            let mut map = self
                .series
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut key = TransportKey {
                peer,
                target: Some(target),
                tls,
                dst: dst.clone(),
            };
            if !map.contains_key(&key) && map.len() >= self.max_series {
                self.evict_idle(&mut map);
                if map.len() >= self.max_series {
                    key.target = None;
                    key.dst = Arc::default();
                }
            }
            map.entry(key).or_default().clone()
        };
        series.open_total.fetch_add(1, Relaxed);
        series.open_connections.fetch_add(1, Relaxed);
        series.last_active_ms.store(self.now_ms(), Relaxed);
        OpenConnection {
            series,
            errno: Errno::Clean,
            metrics: self.clone(),
        }
    }

    /// Drops series with no open connection and no activity within the retain period.
    fn evict_idle(&self, map: &mut HashMap<TransportKey, Arc<TransportSeries>>) {
        let now = self.now_ms();
        let retain = self.retain_idle.as_millis() as u64;
        map.retain(|_, s| {
            Arc::strong_count(s) > 1 || now.saturating_sub(s.last_active_ms.load(Relaxed)) < retain
        });
    }

    fn snapshot(&self) -> Vec<(TransportKey, Arc<TransportSeries>)> {
        let mut map = self
            .series
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.evict_idle(&mut map);
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Encodes the transport families at scrape time with Linkerd's names and labels.
#[derive(Debug)]
pub struct TransportCollector {
    pub directions: [Arc<TransportMetrics>; 2],
}

struct TransportLabels {
    direction: Direction,
    key: TransportKey,
    /// Only `tcp_close_total` carries an errno.
    errno: Option<Errno>,
}

impl EncodeLabelSet for TransportLabels {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("direction", self.direction.as_str()).encode(encoder.encode_label())?;
        let peer = match self.key.peer {
            Peer::Src => "src",
            Peer::Dst => "dst",
        };
        ("peer", peer).encode(encoder.encode_label())?;
        match self.key.target {
            Some(addr) => {
                ("target_addr", Shown(addr)).encode(encoder.encode_label())?;
                ("target_ip", Shown(addr.ip())).encode(encoder.encode_label())?;
                ("target_port", Shown(addr.port())).encode(encoder.encode_label())?;
            }
            None => ("target_addr", "overflow").encode(encoder.encode_label())?,
        }
        encode_tls(self.direction, &self.key.tls, &mut encoder)?;
        encode_dst(&self.key.dst, &mut encoder)?;
        match self.errno {
            Some(errno) => ("errno", errno.label()).encode(encoder.encode_label()),
            None => Ok(()),
        }
    }
}

/// Discovery's labels of an endpoint as `dst_<name>` (names sanitised to what
/// Prometheus accepts), shared by transport and request series.
pub fn encode_dst(labels: &Labels, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
    for (name, value) in labels.iter() {
        let name: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        (format!("dst_{name}"), value).encode(encoder.encode_label())?;
    }
    Ok(())
}

/// The `tls` label and its companions (`no_tls_reason`, or the peer's identity as
/// `client_id` inbound and `server_id` outbound), shared by transport and request series.
pub fn encode_tls(
    direction: Direction,
    tls: &TlsStatus,
    encoder: &mut LabelSetEncoder,
) -> Result<(), std::fmt::Error> {
    match tls {
        TlsStatus::NoIdentity(reason) => {
            ("tls", "no_identity").encode(encoder.encode_label())?;
            ("no_tls_reason", reason.label()).encode(encoder.encode_label())
        }
        TlsStatus::Opaque => ("tls", "opaque").encode(encoder.encode_label()),
        TlsStatus::Established(peer_id) => {
            ("tls", "true").encode(encoder.encode_label())?;
            let name = match direction {
                Direction::Inbound => "client_id",
                Direction::Outbound => "server_id",
            };
            (name, peer_id.as_deref().unwrap_or("")).encode(encoder.encode_label())
        }
    }
}

/// A label value printed with `Display`.
struct Shown<T>(T);

impl<T: std::fmt::Display> EncodeLabelValue for Shown<T> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write!(encoder, "{}", self.0)
    }
}

impl Collector for TransportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let series: Vec<(TransportLabels, Arc<TransportSeries>)> = self
            .directions
            .iter()
            .flat_map(|d| {
                d.snapshot().into_iter().map(|(key, s)| {
                    (
                        TransportLabels {
                            direction: d.direction,
                            key,
                            errno: None,
                        },
                        s,
                    )
                })
            })
            .collect();
        type Read = fn(&TransportSeries) -> u64;
        let counters: [(&str, &str, Read); 3] = [
            ("tcp_open", "Total count of opened connections", |s| {
                s.open_total.load(Relaxed)
            }),
            (
                "tcp_read_bytes",
                "Total count of bytes read from peers",
                |s| s.read_bytes.load(Relaxed),
            ),
            (
                "tcp_write_bytes",
                "Total count of bytes written to peers",
                |s| s.write_bytes.load(Relaxed),
            ),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, s) in &series {
                family
                    .encode_family(labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&read(s), None)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tcp_open_connections",
            "Number of currently-open connections",
            None,
            MetricType::Gauge,
        )?;
        for (labels, s) in &series {
            family
                .encode_family(labels)?
                .encode_gauge(&s.open_connections.load(Relaxed))?;
        }
        let mut family = encoder.encode_descriptor(
            "tcp_close",
            "Total count of closed connections",
            None,
            MetricType::Counter,
        )?;
        for (labels, s) in &series {
            for (errno, count) in Errno::ALL.iter().zip(&s.close_total) {
                let count = count.load(Relaxed);
                if count > 0 {
                    let labels = TransportLabels {
                        direction: labels.direction,
                        key: labels.key.clone(),
                        errno: Some(*errno),
                    };
                    family
                        .encode_family(&labels)?
                        .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::tls::NoTlsReason;

    #[test]
    fn idle_series_are_evicted_only_without_open_connections() {
        let metrics = TransportMetrics::new(Direction::Inbound, Duration::ZERO, 100);
        let metrics = Arc::new(metrics);
        let tls = TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote);
        let open = metrics.open(Peer::Src, "192.0.2.1:1".parse().unwrap(), tls.clone());
        drop(metrics.open(Peer::Src, "192.0.2.1:2".parse().unwrap(), tls));
        let kept: Vec<_> = metrics
            .snapshot()
            .into_iter()
            .map(|(k, _)| k.target)
            .collect();
        assert_eq!(kept, vec![Some("192.0.2.1:1".parse().unwrap())]);
        drop(open);
        assert!(metrics.snapshot().is_empty());
    }

    #[test]
    fn series_beyond_the_cap_share_one_overflow_series() {
        let metrics = Arc::new(TransportMetrics::new(
            Direction::Inbound,
            Duration::from_secs(600),
            2,
        ));
        let tls = TlsStatus::NoIdentity(NoTlsReason::NoTlsFromRemote);
        let _held: Vec<_> = (1..=5)
            .map(|port| {
                metrics.open(
                    Peer::Src,
                    SocketAddr::from(([192, 0, 2, 1], port)),
                    tls.clone(),
                )
            })
            .collect();
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.len(), 3);
        let overflow = snapshot
            .iter()
            .find(|(k, _)| k.target.is_none())
            .expect("overflow series");
        assert_eq!(overflow.1.open_connections.load(Relaxed), 3);
    }
}
