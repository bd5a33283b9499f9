//! Process metrics read from `/proc/self` at scrape time, with the names Linkerd's
//! proxy exports.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

/// Process metrics read from `/proc/self` at scrape time, with the names Linkerd's
/// proxy exports (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …).
#[derive(Debug)]
pub struct ProcessCollector {
    clock_ticks: f64,
    page_size: u64,
    boot_time: u64,
}

impl Default for ProcessCollector {
    fn default() -> ProcessCollector {
        ProcessCollector::new()
    }
}

impl ProcessCollector {
    pub fn new() -> ProcessCollector {
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                stat.lines()
                    .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0);
        ProcessCollector {
            clock_ticks: ticks.max(1) as f64,
            page_size: page.max(1) as u64,
            boot_time,
        }
    }
}

/// The fields of `/proc/self/stat` we export.
struct ProcStat {
    cpu_ticks: u64,
    threads: i64,
    start_ticks: u64,
    virtual_bytes: u64,
    resident_pages: u64,
}

fn read_proc_stat() -> Option<ProcStat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces and parentheses; fields follow the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field numbers from proc(5), minus 3 for pid, comm and the split.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        cpu_ticks: field(14)? + field(15)?,
        threads: field(20)? as i64,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
        resident_pages: field(24)?,
    })
}

/// The process's CPU time so far (seconds) and its resident memory (bytes).
pub fn cpu_and_resident() -> Option<(f64, u64)> {
    // SAFETY: sysconf has no preconditions.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let stat = read_proc_stat()?;
    Some((
        stat.cpu_ticks as f64 / ticks.max(1) as f64,
        stat.resident_pages * page.max(1) as u64,
    ))
}

fn max_open_files() -> Option<i64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some(limit.rlim_cur as i64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stat) = read_proc_stat() else {
            return Ok(());
        };
        let cpu_seconds = stat.cpu_ticks as f64 / self.clock_ticks;
        let start_time = self.boot_time as f64 + stat.start_ticks as f64 / self.clock_ticks;
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as i64)
            .unwrap_or(0);

        let mut enc = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?;
        enc.encode_counter::<NoLabelSet, _, f64>(&cpu_seconds, None)?;
        let gauges: [(&str, &str, f64); 4] = [
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                start_time,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                (stat.resident_pages * self.page_size) as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stat.virtual_bytes as f64,
            ),
            (
                "process_threads",
                "Number of OS threads in the process",
                stat.threads as f64,
            ),
        ];
        for (name, help, value) in gauges {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
        encoder
            .encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&open_fds)?;
        if let Some(max) = max_open_files() {
            encoder
                .encode_descriptor(
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&max)?;
        }
        Ok(())
    }
}
