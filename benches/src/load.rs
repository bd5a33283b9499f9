//! The load generator, run inside the client pod by `tandem-bench load`.
//!
//! Every connection is a task on one current-thread runtime, so the generator never
//! takes more than one core from the proxies it measures. Each task records its own
//! latencies into a preallocated vector; they are merged and sorted only at the end.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::backend::has_token;

#[derive(clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Concurrent connections (or concurrent workers for the new-connection modes).
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Requests per second over all connections (`http-fixed-rate` only).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Bytes to send (`bulk` only).
    #[arg(long, default_value_t = 1 << 30)]
    pub bytes: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Open loop: requests on a fixed schedule; latency counted from the scheduled time.
    /// The connections take turns, so each request arrives alone, as requests from
    /// independent clients do.
    HttpFixedRate,
    /// The same rate with every connection sending at the same instants (as
    /// `h2load --rps` paces its connections): requests arrive `conns` at a time.
    HttpFixedRateInStep,
    /// Closed loop: each connection sends its next request when the last one is answered.
    Http,
    /// A new TCP connection per HTTP request.
    HttpNewConn,
    /// 1 KiB written, 1 KiB echoed back, on long-lived connections.
    Echo,
    /// The same, with a new TCP connection per exchange.
    EchoNewConn,
    /// One stream of `bytes` bytes to the sink.
    Bulk,
}

/// What one scenario measured.
///
/// `bytes` counts the payload of the successful requests: response bodies for HTTP,
/// echoed bytes for echo, and bytes sent for bulk.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub bytes: u64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

const REPORT_KEYS: [&str; 7] = [
    "requests",
    "errors",
    "elapsed_us",
    "bytes",
    "p50_us",
    "p99_us",
    "max_us",
];

impl Report {
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// One line of `key=value` pairs, read back by [`Report::from_line`].
    pub fn to_line(&self) -> String {
        let values = [
            self.requests,
            self.errors,
            micros(self.elapsed),
            self.bytes,
            micros(self.p50),
            micros(self.p99),
            micros(self.max),
        ];
        let pairs: Vec<String> = REPORT_KEYS
            .iter()
            .zip(values)
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        pairs.join(" ")
    }

    pub fn from_line(line: &str) -> anyhow::Result<Report> {
        Report::parse_line(line).with_context(|| format!("bad report line {line:?}"))
    }

    fn parse_line(line: &str) -> anyhow::Result<Report> {
        let mut values = [None; REPORT_KEYS.len()];
        for pair in line.split_whitespace() {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("{pair:?} is not key=value"))?;
            let index = REPORT_KEYS
                .iter()
                .position(|known| *known == key)
                .with_context(|| format!("unknown key {key:?}"))?;
            let value: u64 = value
                .parse()
                .with_context(|| format!("{key} is not a number"))?;
            if values[index].replace(value).is_some() {
                bail!("{key} appears twice");
            }
        }
        if let Some(missing) = values.iter().position(Option::is_none) {
            bail!("{} is missing", REPORT_KEYS[missing]);
        }
        let [requests, errors, elapsed_us, bytes, p50_us, p99_us, max_us] =
            values.map(Option::unwrap_or_default);
        Ok(Report {
            requests,
            errors,
            elapsed: Duration::from_micros(elapsed_us),
            bytes,
            p50: Duration::from_micros(p50_us),
            p99: Duration::from_micros(p99_us),
            max: Duration::from_micros(max_us),
        })
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// [`LoadArgs`] with the run's length as a [`Duration`], so tests can run briefly.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub addr: SocketAddr,
    pub mode: Mode,
    pub conns: usize,
    pub rate: u32,
    pub duration: Duration,
    pub bytes: u64,
}

pub fn run(args: LoadArgs) -> anyhow::Result<Report> {
    run_scenario(Scenario {
        addr: args.addr,
        mode: args.mode,
        conns: args.conns,
        rate: args.rate,
        duration: Duration::from_secs(args.seconds),
        bytes: args.bytes,
    })
}

pub fn run_scenario(scenario: Scenario) -> anyhow::Result<Report> {
    if scenario.conns == 0 {
        bail!("--conns must be at least 1");
    }
    let fixed_rate = matches!(
        scenario.mode,
        Mode::HttpFixedRate | Mode::HttpFixedRateInStep
    );
    if fixed_rate && scenario.rate == 0 {
        bail!("--rate must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")?;
    runtime.block_on(async {
        match scenario.mode {
            Mode::Bulk => bulk(scenario.addr, scenario.bytes).await,
            _ => timed(scenario).await,
        }
    })
}

const HTTP_BUFFER_LEN: usize = 16 * 1024;
const ECHO_LEN: usize = 1024;
const BULK_CHUNK_LEN: usize = 256 * 1024;
/// Keeps a worker facing a refused or unreachable address from spinning on connect.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);
/// Room for this many requests per second, shared by the connections, is reserved before
/// a closed-loop run so that recording a latency rarely reallocates while the clock runs.
const EXPECTED_REQUESTS_PER_SECOND: u64 = 200_000;

static KEEP_ALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
static CLOSE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
static ECHO_PAYLOAD: [u8; ECHO_LEN] = [b'e'; ECHO_LEN];

/// What one worker measured.
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
    bytes: u64,
}

impl Tally {
    fn with_capacity(capacity: usize) -> Tally {
        Tally {
            latencies_us: Vec::with_capacity(capacity),
            errors: 0,
            bytes: 0,
        }
    }

    fn record(&mut self, since: Instant, bytes: u64) {
        let latency = since.elapsed().as_micros();
        self.latencies_us
            .push(u32::try_from(latency).unwrap_or(u32::MAX));
        self.bytes += bytes;
    }
}

/// One connection's (or one new-connection worker's) part of a timed scenario.
enum Worker {
    HttpFixedRate(Schedule, Pacer),
    Http,
    HttpNewConn,
    Echo,
    EchoNewConn,
}

impl Worker {
    async fn run(self, addr: SocketAddr, tally: &mut Tally) {
        match self {
            Worker::HttpFixedRate(schedule, pacer) => {
                http_fixed_rate(addr, schedule, pacer, tally).await
            }
            Worker::Http => http_keep_alive(addr, tally).await,
            Worker::HttpNewConn => http_new_conn(addr, tally).await,
            Worker::Echo => echo_keep_alive(addr, tally).await,
            Worker::EchoNewConn => echo_new_conn(addr, tally).await,
        }
    }
}

/// Runs `scenario.conns` workers until the deadline, then merges what they measured.
async fn timed(scenario: Scenario) -> anyhow::Result<Report> {
    let start = Instant::now();
    let deadline = start + scenario.duration;
    let conns = scenario.conns as u64;
    let rate = u64::from(scenario.rate.max(1));
    let expected_per_second = match scenario.mode {
        Mode::HttpFixedRate | Mode::HttpFixedRateInStep => rate,
        _ => EXPECTED_REQUESTS_PER_SECOND,
    };
    let capacity =
        (scenario.duration.as_secs_f64() * expected_per_second as f64 / conns as f64) as usize + 16;
    // Connection `index` sends at `first + k * interval`: the connections take turns and
    // together send `rate` requests per second.
    let interval = Duration::from_nanos(conns * 1_000_000_000 / rate);
    let mut handles = Vec::with_capacity(scenario.conns);
    for index in 0..conns {
        let worker = match scenario.mode {
            Mode::HttpFixedRate | Mode::HttpFixedRateInStep => {
                let turn = match scenario.mode {
                    Mode::HttpFixedRate => index,
                    _ => 0,
                };
                let schedule = Schedule {
                    first: start + Duration::from_nanos(turn * 1_000_000_000 / rate),
                    interval,
                    end: deadline,
                };
                Worker::HttpFixedRate(schedule, Pacer::new().context("creating a timer")?)
            }
            Mode::Http => Worker::Http,
            Mode::HttpNewConn => Worker::HttpNewConn,
            Mode::Echo => Worker::Echo,
            Mode::EchoNewConn => Worker::EchoNewConn,
            Mode::Bulk => bail!("bulk is a single transfer, not a timed scenario"),
        };
        let addr = scenario.addr;
        handles.push(tokio::spawn(async move {
            let mut tally = Tally::with_capacity(capacity);
            // Dropping the work at the deadline drops the requests in flight, which is
            // how they stay out of the counts.
            let _ = tokio::time::timeout_at(deadline.into(), worker.run(addr, &mut tally)).await;
            tally
        }));
    }
    let mut tallies = Vec::with_capacity(handles.len());
    for handle in handles {
        tallies.push(handle.await.context("a load worker panicked")?);
    }
    let elapsed = start.elapsed();
    let total = tallies.iter().map(|tally| tally.latencies_us.len()).sum();
    let mut latencies_us = Vec::with_capacity(total);
    for tally in &tallies {
        latencies_us.extend_from_slice(&tally.latencies_us);
    }
    latencies_us.sort_unstable();
    Ok(Report {
        requests: latencies_us.len() as u64,
        errors: tallies.iter().map(|tally| tally.errors).sum(),
        elapsed,
        bytes: tallies.iter().map(|tally| tally.bytes).sum(),
        p50: percentile(&latencies_us, 50),
        p99: percentile(&latencies_us, 99),
        max: percentile(&latencies_us, 100),
    })
}

/// The nearest-rank percentile of sorted latencies; zero when there are none.
fn percentile(sorted_us: &[u32], percent: usize) -> Duration {
    let rank = (sorted_us.len() * percent).div_ceil(100).max(1);
    sorted_us
        .get(rank - 1)
        .map_or(Duration::ZERO, |&us| Duration::from_micros(u64::from(us)))
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects, or counts the failure and waits a little before the caller retries.
async fn connect_or_count(addr: SocketAddr, tally: &mut Tally) -> Option<TcpStream> {
    match connect(addr).await {
        Ok(stream) => Some(stream),
        Err(_) => {
            tally.errors += 1;
            tokio::time::sleep(CONNECT_BACKOFF).await;
            None
        }
    }
}

struct Schedule {
    first: Instant,
    interval: Duration,
    end: Instant,
}

async fn http_fixed_rate(
    addr: SocketAddr,
    schedule: Schedule,
    mut pacer: Pacer,
    tally: &mut Tally,
) {
    let mut connection: Option<HttpConnection> = None;
    let mut intended = schedule.first;
    while intended < schedule.end {
        if pacer.wait_until(intended).await.is_err() {
            tally.errors += 1;
            return;
        }
        let http = match &mut connection {
            Some(http) => http,
            None => match connect_or_count(addr, tally).await {
                Some(stream) => connection.insert(HttpConnection::new(stream)),
                None => {
                    intended += schedule.interval;
                    continue;
                }
            },
        };
        // Measured from the intended time: a late answer delays the following requests,
        // and their wait is part of the latency the server caused (coordinated omission).
        match http.exchange(KEEP_ALIVE_REQUEST).await {
            Ok(response) => {
                tally.record(intended, response.body_len);
                if response.server_closes {
                    connection = None;
                }
            }
            Err(_) => {
                tally.errors += 1;
                connection = None;
            }
        }
        intended += schedule.interval;
    }
    // Idle until the deadline, so the run lasts as long as in the other modes.
    std::future::pending::<()>().await;
}

async fn http_keep_alive(addr: SocketAddr, tally: &mut Tally) {
    loop {
        let Some(stream) = connect_or_count(addr, tally).await else {
            continue;
        };
        let mut http = HttpConnection::new(stream);
        loop {
            let sent = Instant::now();
            match http.exchange(KEEP_ALIVE_REQUEST).await {
                Ok(response) => {
                    tally.record(sent, response.body_len);
                    if response.server_closes {
                        break;
                    }
                }
                Err(_) => {
                    tally.errors += 1;
                    break;
                }
            }
        }
    }
}

async fn http_new_conn(addr: SocketAddr, tally: &mut Tally) {
    loop {
        let started = Instant::now();
        let Some(stream) = connect_or_count(addr, tally).await else {
            continue;
        };
        match HttpConnection::new(stream).exchange(CLOSE_REQUEST).await {
            Ok(response) => tally.record(started, response.body_len),
            Err(_) => tally.errors += 1,
        }
    }
}

async fn echo_keep_alive(addr: SocketAddr, tally: &mut Tally) {
    let mut echoed = [0; ECHO_LEN];
    loop {
        let Some(mut stream) = connect_or_count(addr, tally).await else {
            continue;
        };
        loop {
            let sent = Instant::now();
            match echo_exchange(&mut stream, &mut echoed).await {
                Ok(()) => tally.record(sent, ECHO_LEN as u64),
                Err(_) => {
                    tally.errors += 1;
                    break;
                }
            }
        }
    }
}

async fn echo_new_conn(addr: SocketAddr, tally: &mut Tally) {
    let mut echoed = [0; ECHO_LEN];
    loop {
        let started = Instant::now();
        let Some(mut stream) = connect_or_count(addr, tally).await else {
            continue;
        };
        match echo_exchange(&mut stream, &mut echoed).await {
            Ok(()) => tally.record(started, ECHO_LEN as u64),
            Err(_) => tally.errors += 1,
        }
    }
}

async fn echo_exchange(stream: &mut TcpStream, echoed: &mut [u8; ECHO_LEN]) -> io::Result<()> {
    stream.write_all(&ECHO_PAYLOAD).await?;
    stream.read_exact(echoed).await?;
    if echoed[..] != ECHO_PAYLOAD[..] {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the echo differs",
        ));
    }
    Ok(())
}

async fn bulk(addr: SocketAddr, bytes: u64) -> anyhow::Result<Report> {
    let chunk = vec![b'b'; BULK_CHUNK_LEN];
    let start = Instant::now();
    let mut stream = connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut left = bytes;
    while left > 0 {
        let len = usize::try_from(left).map_or(chunk.len(), |left| left.min(chunk.len()));
        stream
            .write_all(&chunk[..len])
            .await
            .context("sending the stream")?;
        left -= len as u64;
    }
    stream.shutdown().await.context("ending the stream")?;
    let mut count = [0; 8];
    stream
        .read_exact(&mut count)
        .await
        .context("reading the sink's byte count")?;
    let elapsed = start.elapsed();
    let received = u64::from_be_bytes(count);
    if received != bytes {
        bail!("the sink received {received} bytes of the {bytes} sent");
    }
    Ok(Report {
        requests: 1,
        errors: 0,
        elapsed,
        bytes,
        p50: elapsed,
        p99: elapsed,
        max: elapsed,
    })
}

struct ResponseHead {
    body_len: u64,
    server_closes: bool,
}

/// A client connection that keeps unread bytes between exchanges.
struct HttpConnection {
    stream: TcpStream,
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

impl HttpConnection {
    fn new(stream: TcpStream) -> HttpConnection {
        HttpConnection {
            stream,
            buffer: vec![0; HTTP_BUFFER_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Sends one request and reads its whole response.
    async fn exchange(&mut self, request: &[u8]) -> io::Result<ResponseHead> {
        self.stream.write_all(request).await?;
        let head = loop {
            match parse_response_head(&self.buffer[self.start..self.end])? {
                Some((head_len, head)) => {
                    self.start += head_len;
                    break head;
                }
                None => self.fill().await?,
            }
        };
        let mut body_left = head.body_len;
        loop {
            let taken = body_left.min((self.end - self.start) as u64);
            self.start += taken as usize;
            body_left -= taken;
            if body_left == 0 {
                return Ok(head);
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes after the unconsumed ones, moving those to the front first.
    async fn fill(&mut self) -> io::Result<()> {
        self.buffer.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.end == self.buffer.len() {
            return Err(invalid_data("response head too large"));
        }
        let read = self.stream.read(&mut self.buffer[self.end..]).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += read;
        Ok(())
    }
}

fn parse_response_head(bytes: &[u8]) -> io::Result<Option<(usize, ResponseHead)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(head_len)) => head_len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(io::Error::new(io::ErrorKind::InvalidData, error)),
    };
    if response.code != Some(200) {
        return Err(invalid_data("status is not 200"));
    }
    let mut body_len = None;
    let mut server_closes = response.version == Some(0);
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(header.value)
                .ok()
                .and_then(|value| value.trim().parse().ok());
        } else if header.name.eq_ignore_ascii_case("connection") {
            if has_token(header.value, "close") {
                server_closes = true;
            } else if has_token(header.value, "keep-alive") {
                server_closes = false;
            }
        }
    }
    // The benchmark's backend always frames its bodies with a length; anything else
    // means something in between rewrote the response.
    let body_len = body_len.ok_or_else(|| invalid_data("no valid content-length"))?;
    Ok(Some((
        head_len,
        ResponseHead {
            body_len,
            server_closes,
        },
    )))
}

fn invalid_data(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Wakes at a precise instant: tokio's timers tick in whole milliseconds, which would
/// add up to a millisecond of made-up latency to every scheduled request.
struct Pacer {
    timer: AsyncFd<OwnedFd>,
}

impl Pacer {
    fn new() -> io::Result<Pacer> {
        // SAFETY: timerfd_create takes no pointers.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the `OwnedFd` keeps its descriptor open for as long as the `AsyncFd` holds it.
        let timer = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
        Ok(Pacer { timer })
    }

    async fn wait_until(&mut self, at: Instant) -> io::Result<()> {
        let wait = at.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            return Ok(());
        }
        let expiry = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs().try_into().unwrap_or(libc::time_t::MAX),
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            },
        };
        let fd = self.timer.get_ref().as_raw_fd();
        // SAFETY: `expiry` outlives the call and the old value may be null.
        if unsafe { libc::timerfd_settime(fd, 0, &expiry, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut ready = self.timer.readable().await?;
            let read = ready.try_io(|timer| {
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into an 8-byte buffer we own.
                let read = unsafe {
                    libc::read(
                        timer.get_ref().as_raw_fd(),
                        expirations.as_mut_ptr().cast(),
                        expirations.len(),
                    )
                };
                if read < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            if let Ok(result) = read {
                return result;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::tests::start_backend;

    fn scenario(addr: SocketAddr, mode: Mode, conns: usize) -> Scenario {
        Scenario {
            addr,
            mode,
            conns,
            rate: 1000,
            duration: Duration::from_millis(300),
            bytes: 0,
        }
    }

    fn assert_sane(report: &Report, bytes_per_request: u64) {
        assert!(report.requests > 0, "{report:?}");
        assert_eq!(report.errors, 0, "{report:?}");
        assert_eq!(
            report.bytes,
            report.requests * bytes_per_request,
            "{report:?}"
        );
        assert!(
            report.p50 <= report.p99 && report.p99 <= report.max,
            "{report:?}"
        );
        assert!(report.elapsed >= Duration::from_millis(300), "{report:?}");
        assert!(report.elapsed < Duration::from_secs(2), "{report:?}");
    }

    #[test]
    fn report_round_trips_through_its_line() {
        let report = Report {
            requests: 12345,
            errors: 2,
            elapsed: Duration::from_micros(10_000_123),
            bytes: 1 << 40,
            p50: Duration::from_micros(57),
            p99: Duration::from_micros(310),
            max: Duration::from_micros(4_000),
        };
        let line = report.to_line();
        assert_eq!(
            line,
            "requests=12345 errors=2 elapsed_us=10000123 bytes=1099511627776 p50_us=57 \
             p99_us=310 max_us=4000"
        );
        assert_eq!(Report::from_line(&line).unwrap(), report);
        assert!((report.per_second() - 1234.484).abs() < 0.001);
    }

    #[test]
    fn bad_report_lines_are_refused() {
        let line = "requests=1 errors=0 elapsed_us=1 bytes=1 p50_us=1 p99_us=1";
        let error = Report::from_line(line).unwrap_err();
        assert!(
            format!("{error:#}").contains("max_us is missing"),
            "{error:#}"
        );
        for line in [
            "",
            "requests=1 errors=0 elapsed_us=1 bytes=1 p50_us=1 p99_us=1 max_us=x",
            "requests=1 errors=0 elapsed_us=1 bytes=1 p50_us=1 p99_us=1 max_us=1 other=1",
            "requests=1 errors=0 elapsed_us=1 bytes=1 p50_us=1 p99_us=1 max_us=1 errors=1",
            "requests errors=0 elapsed_us=1 bytes=1 p50_us=1 p99_us=1 max_us=1",
        ] {
            assert!(Report::from_line(line).is_err(), "{line:?}");
        }
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<u32> = (1..=200).collect();
        assert_eq!(percentile(&sorted, 50), Duration::from_micros(100));
        assert_eq!(percentile(&sorted, 99), Duration::from_micros(198));
        assert_eq!(percentile(&sorted, 100), Duration::from_micros(200));
        assert_eq!(percentile(&[7], 99), Duration::from_micros(7));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }

    #[test]
    fn http_fixed_rate_keeps_its_schedule() {
        let backend = start_backend();
        let report = run_scenario(Scenario {
            rate: 2000,
            ..scenario(backend.http, Mode::HttpFixedRate, 4)
        })
        .unwrap();
        assert_sane(&report, 1024);
        // 2000/s for 300 ms; the backend answers quickly, so nearly all of them count.
        assert!((300..=600).contains(&report.requests), "{report:?}");
    }

    #[test]
    fn http_keep_alive_runs() {
        let backend = start_backend();
        let report = run_scenario(scenario(backend.http, Mode::Http, 8)).unwrap();
        assert_sane(&report, 1024);
    }

    #[test]
    fn http_new_conn_runs() {
        let backend = start_backend();
        let report = run_scenario(scenario(backend.http, Mode::HttpNewConn, 4)).unwrap();
        assert_sane(&report, 1024);
    }

    #[test]
    fn echo_runs() {
        let backend = start_backend();
        let report = run_scenario(scenario(backend.echo, Mode::Echo, 2)).unwrap();
        assert_sane(&report, 1024);
    }

    #[test]
    fn echo_new_conn_runs() {
        let backend = start_backend();
        let report = run_scenario(scenario(backend.echo, Mode::EchoNewConn, 2)).unwrap();
        assert_sane(&report, 1024);
    }

    #[test]
    fn bulk_sends_every_byte() {
        let backend = start_backend();
        let bytes = 10 * BULK_CHUNK_LEN as u64 + 12_345;
        let report = run_scenario(Scenario {
            bytes,
            ..scenario(backend.sink, Mode::Bulk, 1)
        })
        .unwrap();
        assert_eq!(report.requests, 1);
        assert_eq!(report.errors, 0);
        assert_eq!(report.bytes, bytes);
        assert_eq!(report.max, report.elapsed);
    }

    #[test]
    fn errors_are_counted_and_connections_retried() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
        let report = run_scenario(Scenario {
            duration: Duration::from_millis(100),
            ..scenario(addr, Mode::Http, 1)
        })
        .unwrap();
        assert_eq!(report.requests, 0);
        assert!(report.errors > 0, "{report:?}");
        assert_eq!(report.p99, Duration::ZERO);
    }
}
