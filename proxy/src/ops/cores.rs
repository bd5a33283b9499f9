//! How many worker threads the proxy runs: Linkerd's rule, with the CPUs the
//! container may really use (its cgroup CPU limit) as the ceiling.
//!
//! `threads = (MAX or round(available × MAX_RATIO) or 1).max(MIN).min(available)`.
//! With nothing set that is one thread, the current-thread runtime, which is also
//! the cheapest per request; the injector maps a CPU request to `MIN` and a CPU
//! limit to `MAX` as Linkerd's does. `available` counts the CPUs the scheduler lets
//! us run on and the CFS quota of every cgroup up the hierarchy, because a
//! container with a 2-CPU limit on a 64-CPU node must not start 64 threads that
//! the kernel then throttles.

use std::path::Path;

/// `LINKERD2_PROXY_CORES_MIN` (or the older `LINKERD2_PROXY_CORES`),
/// `LINKERD2_PROXY_CORES_MAX` and `LINKERD2_PROXY_CORES_MAX_RATIO`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CoreSettings {
    pub min: Option<usize>,
    pub max: Option<usize>,
    pub max_ratio: Option<f64>,
}

/// Worker threads for `available` usable CPUs (at least one).
pub fn worker_threads(settings: &CoreSettings, available: usize) -> usize {
    let available = available.max(1);
    let wanted = settings
        .max
        .or_else(|| {
            settings
                .max_ratio
                .map(|ratio| (available as f64 * ratio).round() as usize)
        })
        .filter(|&n| n > 0)
        .unwrap_or(1);
    wanted.max(settings.min.unwrap_or(1)).min(available)
}

/// CPUs this process may use: the scheduler's affinity set, cut by any cgroup quota.
pub fn available() -> usize {
    // Not `available_parallelism`: it already applies the quota, rounded down, so a
    // 1.5-CPU limit would allow one thread where two can use it.
    let affinity = affinity_cpus()
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let own_cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    match cgroup_cpu_limit(Path::new("/sys/fs/cgroup"), &own_cgroups) {
        Some(limit) => limit.min(affinity),
        None => affinity,
    }
}

/// CPUs in this thread's scheduler affinity set.
fn affinity_cpus() -> Option<usize> {
    // SAFETY: `set` is a plain bit set that sched_getaffinity fills in.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        usize::try_from(libc::CPU_COUNT(&set))
            .ok()
            .filter(|&n| n > 0)
    }
}

/// The smallest CPU quota (rounded up to whole CPUs) on the path from this
/// process's cgroup to the root, read from cgroup v2 `cpu.max` or cgroup v1
/// `cpu.cfs_quota_us`/`cpu.cfs_period_us`. `None` when no quota is set anywhere.
/// `own_cgroups` is the text of `/proc/self/cgroup`; `root` is where cgroupfs is
/// mounted (a parameter so that tests can build a fake hierarchy).
pub fn cgroup_cpu_limit(root: &Path, own_cgroups: &str) -> Option<usize> {
    for line in own_cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            if let Some(limit) = lowest_on_path(root, path, read_v2_limit) {
                return Some(limit);
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            // Mounted as `cpu,cpuacct` on most distributions, `cpu` on some.
            for mount in [controllers, "cpu,cpuacct", "cpu"] {
                let mount = root.join(mount);
                if mount.is_dir() {
                    if let Some(limit) = lowest_on_path(&mount, path, read_v1_limit) {
                        return Some(limit);
                    }
                }
            }
        }
    }
    None
}

/// Walks from `path` up to the root of the mount and keeps the lowest limit. Inside
/// a container the recorded path may name the host's hierarchy, which is not
/// mounted there; the walk then still reaches the container's own root.
fn lowest_on_path(mount: &Path, path: &str, read: fn(&Path) -> Option<usize>) -> Option<usize> {
    let mut lowest: Option<usize> = None;
    let mut dir = Path::new(path.trim_start_matches('/'));
    loop {
        if let Some(limit) = read(&mount.join(dir)) {
            lowest = Some(lowest.map_or(limit, |l| l.min(limit)));
        }
        match dir.parent() {
            Some(parent) => dir = parent,
            None => return lowest,
        }
    }
}

fn read_v2_limit(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("cpu.max")).ok()?;
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period = fields.next().unwrap_or("100000");
    cpus(quota.parse().ok()?, period.parse().ok()?)
}

fn read_v1_limit(dir: &Path) -> Option<usize> {
    let read = |name: &str| -> Option<i64> {
        std::fs::read_to_string(dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let quota = read("cpu.cfs_quota_us")?;
    let period = read("cpu.cfs_period_us")?;
    if quota <= 0 || period <= 0 {
        return None; // -1: no quota.
    }
    cpus(quota as u64, period as u64)
}

/// A quota of 150 ms per 100 ms period allows 1.5 CPUs: two threads can use it.
fn cpus(quota: u64, period: u64) -> Option<usize> {
    if period == 0 {
        return None;
    }
    Some(quota.div_ceil(period).max(1) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linkerd_rule() {
        let s = |min, max, max_ratio| CoreSettings {
            min,
            max,
            max_ratio,
        };
        assert_eq!(worker_threads(&s(None, None, None), 8), 1);
        assert_eq!(worker_threads(&s(Some(2), None, None), 8), 2);
        assert_eq!(worker_threads(&s(None, Some(4), None), 8), 4);
        assert_eq!(
            worker_threads(&s(None, Some(4), None), 2),
            2,
            "capped by the cgroup"
        );
        assert_eq!(
            worker_threads(&s(Some(3), Some(2), None), 8),
            3,
            "min wins over max"
        );
        assert_eq!(
            worker_threads(&s(Some(16), None, None), 4),
            4,
            "available wins"
        );
        assert_eq!(worker_threads(&s(None, None, Some(0.5)), 8), 4);
        assert_eq!(
            worker_threads(&s(None, None, Some(0.1)), 2),
            1,
            "never zero"
        );
        assert_eq!(
            worker_threads(&s(None, Some(3), Some(1.0)), 8),
            3,
            "max before ratio"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn scratch(test: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-cores-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn cgroup_v2_quota_rounds_up_and_takes_the_lowest_ancestor() {
        let root = scratch("v2");
        write(&root, "cpu.max", "max 100000\n");
        write(&root.join("kubepods"), "cpu.max", "400000 100000\n");
        write(&root.join("kubepods/pod1"), "cpu.max", "150000 100000\n");
        write(&root.join("kubepods/pod1/ctr"), "cpu.max", "max 100000\n");
        assert_eq!(cgroup_cpu_limit(&root, "0::/kubepods/pod1/ctr\n"), Some(2));
        assert_eq!(cgroup_cpu_limit(&root, "0::/kubepods\n"), Some(4));
        assert_eq!(
            cgroup_cpu_limit(&root, "0::/\n"),
            None,
            "max means no limit"
        );
        // A container sees its own cgroup as the root of the mount.
        assert_eq!(cgroup_cpu_limit(&root, "0::/elsewhere/ctr\n"), None);
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn cgroup_v1_quota() {
        let root = scratch("v1");
        let cpu = root.join("cpu,cpuacct");
        write(&cpu, "cpu.cfs_quota_us", "-1\n");
        write(&cpu, "cpu.cfs_period_us", "100000\n");
        write(&cpu.join("docker/abc"), "cpu.cfs_quota_us", "250000\n");
        write(&cpu.join("docker/abc"), "cpu.cfs_period_us", "100000\n");
        let own = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n";
        assert_eq!(cgroup_cpu_limit(&root, own), Some(3));
        assert_eq!(cgroup_cpu_limit(&root, "4:cpu,cpuacct:/\n"), None);
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn no_cgroup_files_means_no_limit() {
        let root = scratch("none");
        assert_eq!(cgroup_cpu_limit(&root, "0::/a/b\n"), None);
        assert_eq!(cgroup_cpu_limit(&root, "garbage"), None);
        assert!(available() >= 1);
    }
}
