//! Capturing what crosses a pod's network interface, to assert what is on the wire.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::netns::Pod;

/// Every frame seen on one interface of a pod (both directions) until [`Capture::stop`].
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u8>>,
}

impl Capture {
    /// Starts capturing on `interface` in `pod` with an `AF_PACKET` socket; frames
    /// are recorded from the moment this returns.
    pub fn start(pod: &Pod, interface: &str) -> Capture {
        let socket = pod
            .run(|| open_packet_socket(interface))
            .unwrap_or_else(|e| panic!("cannot capture on {interface}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut frame = vec![0u8; 65536];
            while !stopping.load(Ordering::Acquire) {
                // SAFETY: reading into a buffer we own, from a socket we own.
                let n = unsafe {
                    libc::recv(
                        socket.as_raw_fd(),
                        frame.as_mut_ptr().cast(),
                        frame.len(),
                        0,
                    )
                };
                if n > 0 {
                    seen.extend_from_slice(&frame[..n as usize]);
                }
            }
            seen
        });
        Capture { stop, thread }
    }

    /// Stops and returns every captured frame, concatenated.
    pub fn stop(self) -> Vec<u8> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("capture thread")
    }
}

fn open_packet_socket(interface: &str) -> std::io::Result<OwnedFd> {
    let name = std::ffi::CString::new(interface).expect("interface name");
    // SAFETY: plain socket calls with valid arguments; the fd is owned at once.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol));
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        let rc = libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Wake up regularly so `stop` is noticed without traffic.
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        Ok(socket)
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
