//! The engine's heavy work (reading, hashing, compressing, verifying, writing) runs at a
//! background CPU priority within its process: an agent's latency-bound work (a migration's
//! stream and return path, TLS on every connection) goes first. (Against other processes, the
//! scheduling group decides: see how the agent starts a VM.)

/// The nice value the work runs at: under contention a thread at 0 gets about ten times its
/// share; on an idle machine it changes nothing.
const BACKGROUND_NICE: i32 = 10;

/// Runs `work` on this thread at background priority, then restores the thread's priority.
/// Only an agent that may raise it back (root) lowers it: a pool thread must not stay lowered.
pub fn background<T>(work: impl FnOnce() -> T) -> T {
    let tid = unsafe { libc::gettid() } as libc::id_t;
    let lowered = if unsafe { libc::geteuid() } == 0 {
        // getpriority may return -1 as a value: errno tells it from a failure.
        unsafe { *libc::__errno_location() = 0 };
        let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        let known = before != -1 || unsafe { *libc::__errno_location() } == 0;
        (known && before < BACKGROUND_NICE && unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE) } == 0).then_some(before)
    } else {
        None
    };
    let out = work();
    if let Some(before) = lowered {
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, before) };
    }
    out
}

/// The nice value of a VM's scheduling group: about three times the CPU share of a group at 0
/// when both want it. A guest whose vCPU waits for the CPU answers its clients late: the lab
/// saw 50–130 ms stalls in a guest's replies while its disk's bulk pass hashed and compressed
/// beside it (a thread's nice value does not reach across groups).
pub const VM_GROUP_NICE: &[u8] = b"-5";

/// In a child process about to exec (async-signal-safe): a session of its own, whose
/// scheduling group (autogroup) gets `nice` (a machine without autogroups, or a process that
/// may not raise its priority, leaves it at 0).
pub fn own_session_in_group(nice: &[u8]) {
    unsafe {
        libc::setsid();
        let fd = libc::open(c"/proc/self/autogroup".as_ptr(), libc::O_WRONLY);
        if fd >= 0 {
            libc::write(fd, nice.as_ptr().cast(), nice.len());
            libc::close(fd);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_work_runs_lowered_and_the_thread_gets_its_priority_back() {
        let tid = unsafe { libc::gettid() } as libc::id_t;
        let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        let during = super::background(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) });
        if unsafe { libc::geteuid() } == 0 && before < super::BACKGROUND_NICE {
            assert_eq!(during, super::BACKGROUND_NICE);
        } else {
            assert_eq!(during, before);
        }
        assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }, before);
    }
}
