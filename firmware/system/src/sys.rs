//! Thin, safe wrappers over the Linux system calls PID 1 needs.
//!
//! This is the only module in the workspace with `unsafe` code. Every wrapper checks its
//! arguments (C strings, buffer sizes) before the call and turns `-1`/`errno` into
//! [`std::io::Error`], so the rest of the crate is plain safe Rust.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in string"))
}

fn path_cstr(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in path"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `getpid(2)`.
pub fn getpid() -> i32 {
    std::process::id() as i32
}

/// File descriptors a node wants as its soft limit: the connection caps of the tree port
/// (64 + 16 handshakes, 256 strangers' links, neighbours), receptor and monitor (72 each),
/// dials and files add up to well under 1,000; 4,096 leaves room and is a common hard limit.
pub const WANTED_NOFILE: u64 = 4096;

/// Raise the soft `RLIMIT_NOFILE` to `min(wanted, hard limit)` (never lowers it). Returns
/// the soft limit in force afterwards.
// rlim_t is u64 here but u32 on some 32-bit targets: the casts are needed there.
#[allow(clippy::unnecessary_cast)]
pub fn raise_nofile_limit(wanted: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit that outlives the call.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    let target = (wanted as libc::rlim_t).min(lim.rlim_max);
    if target <= lim.rlim_cur {
        return Ok(lim.rlim_cur as u64);
    }
    lim.rlim_cur = target;
    // SAFETY: `lim` is a valid rlimit with rlim_cur <= rlim_max, read during the call only.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    Ok(target as u64)
}

/// Keep the C allocator to `arenas` arenas (glibc; elsewhere, e.g. musl on the appliance,
/// there are none and this does nothing). glibc gives each thread that allocates its own
/// arena, up to 8 per core, and keeps what is freed in each: a node moving 256 KiB shards
/// on its blocking threads grew by 15 MiB that way (docs/BENCHMARKS.md). Call it early:
/// arenas made before stay. Returns whether the allocator took it.
pub fn limit_malloc_arenas(arenas: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and changes only allocator settings, under
        // glibc's own lock; no pointer or memory of ours is involved.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = arenas;
        false
    }
}

#[cfg(test)]
mod nofile_tests {
    #[test]
    fn nofile_limit_is_raised_up_to_the_hard_limit_and_never_lowered() {
        let now = super::raise_nofile_limit(0).unwrap();
        assert!(now > 0);
        // Asking for less changes nothing; asking for more gives at least what we had.
        assert_eq!(super::raise_nofile_limit(1).unwrap(), now);
        assert!(super::raise_nofile_limit(super::WANTED_NOFILE).unwrap() >= now);
    }
}

/// Real user id of this process.
pub fn getuid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Mount flags we use (a subset of `MS_*`).
pub mod mflags {
    pub const NOSUID: u64 = libc::MS_NOSUID;
    pub const NODEV: u64 = libc::MS_NODEV;
    pub const NOEXEC: u64 = libc::MS_NOEXEC;
    pub const RDONLY: u64 = libc::MS_RDONLY;
    pub const REMOUNT: u64 = libc::MS_REMOUNT;
    pub const NOATIME: u64 = libc::MS_NOATIME;
}

/// `mount(2)`.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: u64,
    data: Option<&str>,
) -> io::Result<()> {
    let src = cstr(source)?;
    let tgt = path_cstr(target)?;
    let fst = cstr(fstype)?;
    let dat = data.map(cstr).transpose()?;
    let dat_ptr = dat
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr() as *const libc::c_void);
    // SAFETY: all pointers are valid NUL-terminated strings (or NULL for data) that outlive
    // the call; mount does not keep them.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fst.as_ptr(),
            flags as libc::c_ulong,
            dat_ptr,
        )
    })
    .map(|_| ())
}

/// `umount2(2)`; `detach` uses `MNT_DETACH` (lazy unmount).
pub fn umount(target: &Path, detach: bool) -> io::Result<()> {
    let tgt = path_cstr(target)?;
    let flags = if detach { libc::MNT_DETACH } else { 0 };
    // SAFETY: tgt is a valid NUL-terminated path that outlives the call.
    check(unsafe { libc::umount2(tgt.as_ptr(), flags) }).map(|_| ())
}

/// `sync(2)`: flush every filesystem.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() }
}

/// What `reboot(2)` should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootCmd {
    /// Restart the machine.
    Restart,
    /// Power off.
    PowerOff,
    /// Make Ctrl-Alt-Del send SIGINT to PID 1 instead of rebooting at once.
    DisableCad,
    /// Restart with the argument `0 tryboot`: the Raspberry Pi firmware boots the
    /// `[tryboot]` partition of autoboot.txt once (its one-shot trial boot).
    TryBoot,
}

/// Ask the kernel to drop `f`'s clean cached pages (after an fsync), so that the next read
/// comes from the device: a read-back then checks the medium, not the cache. Best effort.
pub fn drop_cached(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only takes an open descriptor (borrowed from `f`, alive for the
    // call) and integer arguments; it never touches our memory.
    let _ = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// `reboot(2)`. Returns only on failure (or for `DisableCad`).
pub fn reboot(cmd: RebootCmd) -> io::Result<()> {
    if cmd == RebootCmd::TryBoot {
        let arg = c"0 tryboot";
        // SAFETY: the raw reboot syscall with RESTART2 reads a NUL-terminated string from the
        // pointer; `arg` is a static C string that outlives the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_reboot,
                libc::LINUX_REBOOT_MAGIC1,
                libc::LINUX_REBOOT_MAGIC2,
                libc::LINUX_REBOOT_CMD_RESTART2,
                arg.as_ptr(),
            )
        };
        return check(r as i32).map(|_| ());
    }
    let c = match cmd {
        RebootCmd::TryBoot => libc::RB_AUTOBOOT,
        RebootCmd::Restart => libc::RB_AUTOBOOT,
        RebootCmd::PowerOff => libc::RB_POWER_OFF,
        RebootCmd::DisableCad => libc::RB_DISABLE_CAD,
    };
    // SAFETY: reboot takes a plain integer command; the caller has synced filesystems.
    check(unsafe { libc::reboot(c) }).map(|_| ())
}

/// How a child ended, as reported by `waitpid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

impl ExitStatus {
    /// True for `exit(0)`.
    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Exited(0))
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Reap one terminated child of any kind without blocking: `waitpid(-1, WNOHANG)`.
/// `Ok(None)` means no child has exited (or there are no children at all).
pub fn reap_one() -> io::Result<Option<(i32, ExitStatus)>> {
    let mut status: libc::c_int = 0;
    // SAFETY: status is a valid out pointer for the duration of the call.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ECHILD) {
            return Ok(None);
        }
        return Err(e);
    }
    if pid == 0 {
        return Ok(None);
    }
    let st = if libc::WIFEXITED(status) {
        ExitStatus::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ExitStatus::Signaled(libc::WTERMSIG(status))
    } else {
        // Stopped/continued are not reported without WUNTRACED/WCONTINUED; treat defensively.
        ExitStatus::Exited(-1)
    };
    Ok(Some((pid, st)))
}

/// `kill(2)`. A negative pid signals a process group.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// Signal numbers PID 1 handles.
pub mod signals {
    pub const SIGTERM: i32 = libc::SIGTERM;
    pub const SIGINT: i32 = libc::SIGINT;
    pub const SIGKILL: i32 = libc::SIGKILL;
    pub const SIGCHLD: i32 = libc::SIGCHLD;
    pub const SIGPWR: i32 = libc::SIGPWR;
    pub const SIGHUP: i32 = libc::SIGHUP;
    pub const SIGUSR1: i32 = libc::SIGUSR1;
    pub const SIGUSR2: i32 = libc::SIGUSR2;
    pub const SIGPIPE: i32 = libc::SIGPIPE;
}

/// The set of signals PID 1 takes synchronously, blocked in every thread.
#[derive(Clone, Copy)]
pub struct SignalSet(libc::sigset_t);

impl SignalSet {
    /// The signals the init loop waits for: TERM, INT, PWR, CHLD, HUP, USR1, USR2.
    pub fn init_set() -> Self {
        // SAFETY: sigset_t is a plain bitmask; zeroed then sigemptyset gives a valid empty set.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: set points to a valid sigset_t; the signal numbers are valid constants.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in [
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGPWR,
                libc::SIGCHLD,
                libc::SIGHUP,
                libc::SIGUSR1,
                libc::SIGUSR2,
            ] {
                libc::sigaddset(&mut set, s);
            }
        }
        SignalSet(set)
    }

    /// Block these signals in the calling thread (and threads it spawns later).
    /// Child processes started with `std::process::Command` get an empty mask again.
    pub fn block(&self) -> io::Result<()> {
        // SAFETY: self.0 is a valid sigset; old set pointer may be NULL.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &self.0, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(())
    }

    /// Wait up to `timeout` for one of these (blocked) signals: `sigtimedwait(2)`.
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as _,
            tv_nsec: timeout.subsec_nanos() as _,
        };
        // SAFETY: self.0 is a valid sigset, info may be NULL, ts is a valid timespec.
        let r = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        if r > 0 {
            Some(r)
        } else {
            None
        }
    }
}

/// Ignore SIGPIPE (so writes to a closed console or socket give EPIPE, not death).
pub fn ignore_sigpipe() {
    // SAFETY: setting SIG_IGN for SIGPIPE is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Become a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphaned descendants are re-parented
/// to us instead of to PID 1, so `borg up` reaps them as init would.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag.
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) })
        .map(|_| ())
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer/length pair describes `name`'s bytes, which outlive the call.
    check(unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) })
        .map(|_| ())
}

/// Load a kernel module from a file: `finit_module(2)`. `Ok(false)` if already loaded.
pub fn finit_module(path: &Path) -> io::Result<bool> {
    let file = std::fs::File::open(path)?;
    let params = cstr("")?;
    // SAFETY: the fd is open for the whole call and params is a valid empty C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if r == -1 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(true)
}

/// Bind a socket to one network interface (`SO_BINDTODEVICE`).
pub fn bind_to_device(sock: &impl AsRawFd, ifname: &str) -> io::Result<()> {
    let name = cstr(ifname)?;
    let bytes = name.as_bytes_with_nul();
    // SAFETY: the pointer/length describe a valid NUL-terminated buffer for the call.
    check(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            bytes.as_ptr() as *const libc::c_void,
            bytes.len() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// Allow binding a port another socket holds (`SO_REUSEADDR`), for our two DHCP sockets.
pub fn set_reuseaddr(sock: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: pointer/length describe a valid c_int for the call.
    check(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// An `AF_INET` datagram socket used only as a handle for interface ioctls.
pub struct IfCtl {
    fd: OwnedFd,
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux and sockaddr is POD.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

impl IfCtl {
    /// Open the ioctl handle.
    pub fn new() -> io::Result<Self> {
        // SAFETY: socket takes plain integers; on success we own the returned fd.
        let fd = check(unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(IfCtl { fd })
    }

    fn ioctl(&self, req: libc::c_ulong, ifr: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: ifr is a valid, initialized ifreq that the kernel reads/writes in place;
        // `req` is one of the SIOC* interface requests that take an ifreq.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, ifr as *mut libc::ifreq) })
            .map(|_| ())
    }

    /// Interface flags (`IFF_*`).
    pub fn flags(&self, name: &str) -> io::Result<i32> {
        let mut ifr = ifreq_for(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut ifr)?;
        // SAFETY: after SIOCGIFFLAGS the union holds ifru_flags.
        Ok(i32::from(unsafe { ifr.ifr_ifru.ifru_flags }))
    }

    /// Bring an interface up (set `IFF_UP`).
    pub fn up(&self, name: &str) -> io::Result<()> {
        let flags = self.flags(name)?;
        let mut ifr = ifreq_for(name)?;
        ifr.ifr_ifru.ifru_flags = (flags | libc::IFF_UP) as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut ifr)
    }

    /// True when the interface is up and has carrier (`IFF_RUNNING`).
    pub fn has_carrier(&self, name: &str) -> io::Result<bool> {
        let f = self.flags(name)?;
        Ok(f & libc::IFF_UP != 0 && f & libc::IFF_RUNNING != 0)
    }

    /// Set the interface's IPv4 address and netmask (0.0.0.0 removes the address).
    pub fn set_addr(&self, name: &str, ip: Ipv4Addr, mask: Ipv4Addr) -> io::Result<()> {
        let mut ifr = ifreq_for(name)?;
        ifr.ifr_ifru.ifru_addr = sockaddr_in(ip);
        self.ioctl(libc::SIOCSIFADDR, &mut ifr)?;
        if ip.is_unspecified() {
            return Ok(());
        }
        let mut ifr = ifreq_for(name)?;
        ifr.ifr_ifru.ifru_netmask = sockaddr_in(mask);
        self.ioctl(libc::SIOCSIFNETMASK, &mut ifr)
    }

    fn route(&self, req: libc::c_ulong, name: &str, gw: Ipv4Addr) -> io::Result<()> {
        let dev = cstr(name)?;
        // SAFETY: rtentry is plain old data; all-zero is valid.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
        // SAFETY: rt is a valid rtentry; rt_dev points to `dev`, which outlives the call.
        check(unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, &mut rt as *mut libc::rtentry) })
            .map(|_| ())
    }

    /// Add the default route via `gw` on `name`.
    pub fn add_default_route(&self, name: &str, gw: Ipv4Addr) -> io::Result<()> {
        match self.route(libc::SIOCADDRT, name, gw) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Remove the default route via `gw` (missing routes are not an error).
    pub fn del_default_route(&self, name: &str, gw: Ipv4Addr) -> io::Result<()> {
        match self.route(libc::SIOCDELRT, name, gw) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }
}

/// Create a device node (`mknod(2)`), used for /dev/console when devtmpfs is missing.
pub fn mknod_char(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let p = path_cstr(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: p is a valid path string; mode/dev are plain integers.
    check(unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR | mode as libc::mode_t, dev) }).map(|_| ())
}

/// Make sure fds 0, 1 and 2 are open, pointing them at `console` when they are not (the kernel
/// gives PID 1 no stdio when the initramfs has no /dev/console node).
pub fn ensure_stdio(console: &Path) -> io::Result<()> {
    let missing: Vec<i32> = (0..3)
        // SAFETY: F_GETFD only queries the descriptor flags; it touches no memory.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } == -1)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let c = path_cstr(console)?;
    // SAFETY: c is a valid path string; the returned fd is owned below.
    let fd = check(unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) })?;
    for target in missing {
        if fd != target {
            // SAFETY: both descriptors are valid; dup2 atomically replaces the (closed) target.
            check(unsafe { libc::dup2(fd, target) })?;
        }
    }
    if fd > 2 {
        // SAFETY: fd was opened above and is not used after this.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Open flags for a terminal that must not become our controlling tty.
pub const O_NOCTTY: i32 = libc::O_NOCTTY;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_rejects_bad_names() {
        assert!(ifreq_for("").is_err());
        assert!(ifreq_for("a-very-long-interface-name").is_err());
        assert!(ifreq_for("eth0").is_ok());
    }

    #[test]
    fn reap_with_no_children_is_none() {
        // The test harness may have no children; ECHILD must map to None, not an error.
        assert!(reap_one().is_ok());
    }
}

/// Set `CLOCK_REALTIME` (the system's wall clock) to `ms` milliseconds since the Unix epoch:
/// `clock_settime(2)`. Needs `CAP_SYS_TIME` (PID 1 is root). Monotonic clocks do not move.
pub fn set_realtime_ms(ms: u64) -> io::Result<()> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // (Not naming time_t: musl's libc marks that alias deprecated.)
    ts.tv_sec = (ms / 1000)
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "time out of range"))?;
    // (ms % 1000) * 1_000_000 < 1e9 fits every c_long.
    ts.tv_nsec = ((ms % 1000) * 1_000_000) as libc::c_long;
    // SAFETY: `ts` is a valid, initialized timespec (0 <= tv_nsec < 1e9) that outlives the
    // call; clock_settime only reads it.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(|_| ())
}
