//! A QMP client: QEMU's JSON control protocol over its unix socket. One command at a time;
//! asynchronous events that arrive meanwhile are kept for whoever asks for them. Every command
//! carries an ID and only the answer with that ID is taken: a caller that gave up waiting (its
//! future dropped, say when a migration fails) leaves its answer in the stream, and the next
//! command must not take it for its own.
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

const ANSWER_WITHIN: Duration = Duration::from_secs(15);

pub struct Qmp {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
    pub events: Vec<Value>,
    /// The socket failed (QEMU exited or closed it): a new connection is needed.
    pub broken: bool,
    /// The ID the next command carries.
    next_id: u64,
}

impl Qmp {
    /// Connects (waiting up to `within` for QEMU to create the socket) and leaves capabilities
    /// negotiation mode.
    pub async fn connect(socket: &Path, within: Duration) -> Result<Qmp> {
        let (mut qmp, _) = Qmp::open(socket, within).await?;
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// Connects and turns on out-of-band execution (see `execute_oob`). Must be done while
    /// QEMU's main loop runs: leaving negotiation mode is an ordinary command.
    pub async fn connect_oob(socket: &Path, within: Duration) -> Result<Qmp> {
        let (mut qmp, greeting) = Qmp::open(socket, within).await?;
        let offers_oob = greeting["QMP"]["capabilities"].as_array().is_some_and(|c| c.iter().any(|c| c == "oob"));
        if !offers_oob {
            bail!("the monitor on {} offers no out-of-band execution (it said {greeting})", socket.display());
        }
        qmp.execute("qmp_capabilities", json!({"enable": ["oob"]})).await?;
        Ok(qmp)
    }

    /// Connects and reads QEMU's greeting.
    async fn open(socket: &Path, within: Duration) -> Result<(Qmp, Value)> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e).with_context(|| format!("QEMU's QMP socket {} does not answer", socket.display())),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (read, write) = stream.into_split();
        let mut qmp = Qmp { lines: BufReader::new(read).lines(), write, events: Vec::new(), broken: false, next_id: 0 };
        let greeting = qmp.read().await?;
        if greeting.get("QMP").is_none() {
            bail!("{} is not a QMP socket (it said {greeting})", socket.display());
        }
        Ok((qmp, greeting))
    }

    /// Runs a command out of band: in QEMU's monitor thread, even while its main loop is
    /// blocked (a post-copy destination's main loop can wait for a page that a cut link holds).
    /// Only commands QEMU allows out of band (`migrate-pause`, `migrate-recover`).
    pub async fn execute_oob(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.run("exec-oob", command, arguments).await
    }

    async fn read(&mut self) -> Result<Value> {
        let line = match self.lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => {
                self.broken = true;
                bail!("QEMU closed its QMP socket")
            }
            Err(e) => {
                self.broken = true;
                return Err(e).context("reading from QMP");
            }
        };
        serde_json::from_str(&line).with_context(|| format!("QMP sent malformed JSON: {line}"))
    }

    /// Runs a command and returns its `return` value; a QMP error becomes an error naming the
    /// command.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        self.run("execute", command, arguments).await
    }

    async fn run(&mut self, how: &str, command: &str, arguments: Value) -> Result<Value> {
        let id = self.take_id();
        let line = request_line(how, command, arguments, id)?;
        if let Err(e) = self.write.write_all(line.as_bytes()).await {
            self.broken = true;
            return Err(e).with_context(|| format!("sending {command} to QMP"));
        }
        self.answer(command, id).await
    }

    fn take_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Hands QEMU a file descriptor under `name` (QMP `getfd`, the descriptor travelling as
    /// SCM_RIGHTS with the command).
    pub async fn give_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        use std::os::fd::AsRawFd;
        let id = self.take_id();
        let line = request_line("execute", "getfd", json!({ "fdname": name }), id)?;
        let sock = self.write.as_ref().as_raw_fd();
        let sent = unsafe {
            let mut iov = libc::iovec { iov_base: line.as_ptr() as *mut libc::c_void, iov_len: line.len() };
            let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
            let mut control = vec![0u8; space];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, fd.as_raw_fd());
            libc::sendmsg(sock, &msg, 0)
        };
        if sent != line.len() as isize {
            self.broken = true;
            bail!("handing QEMU a descriptor failed: {}", std::io::Error::last_os_error());
        }
        self.answer("getfd", id).await?;
        Ok(())
    }

    /// QEMU's answer to `command`; a QEMU that does not answer in time is treated as gone (the
    /// connection is dropped), so nothing waits on a hung monitor forever.
    async fn answer(&mut self, command: &str, id: u64) -> Result<Value> {
        match tokio::time::timeout(ANSWER_WITHIN, self.answer_untimed(command, id)).await {
            Ok(r) => r,
            Err(_) => {
                self.broken = true;
                bail!("QEMU did not answer {command} within {} s", ANSWER_WITHIN.as_secs())
            }
        }
    }

    async fn answer_untimed(&mut self, command: &str, id: u64) -> Result<Value> {
        loop {
            let msg = self.read().await.with_context(|| format!("waiting for QEMU's answer to {command}"))?;
            if msg.get("event").is_some() {
                self.events.push(msg);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                tracing::debug!(command, "QMP: passing over an answer to an earlier command: {msg}");
                continue;
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                bail!("QEMU refused {command}: {}", e.get("desc").and_then(Value::as_str).unwrap_or(&e.to_string()));
            }
        }
    }

}

/// `how` is `execute`, or `exec-oob` for a command run out of band.
fn request_line(how: &str, command: &str, arguments: Value, id: u64) -> Result<String> {
    let mut req = json!({ how: command, "id": id });
    if arguments.as_object().is_some_and(|o| !o.is_empty()) {
        req["arguments"] = arguments;
    }
    let mut line = serde_json::to_string(&req)?;
    line.push('\n');
    Ok(line)
}

impl Qmp {
    /// `query-status`'s `status` (`running`, `paused`, `inmigrate`, `postmigrate`, …).
    pub async fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status", json!({})).await?;
        Ok(r["status"].as_str().unwrap_or("unknown").to_string())
    }

    /// `query-migrate` as it is.
    pub async fn migration(&mut self) -> Result<Value> {
        self.execute("query-migrate", json!({})).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    /// A QEMU with nothing to run, for its monitor alone.
    struct Monitor {
        child: std::process::Child,
        socket: std::path::PathBuf,
    }

    impl Monitor {
        fn start() -> Monitor {
            Monitor::start_with("", &[])
        }

        /// With `extra` arguments; sockets are named by `tag` (tests run in parallel).
        fn start_with(tag: &str, extra: &[String]) -> Monitor {
            let socket = std::env::temp_dir().join(format!("ferry-qmp-test-{}{tag}.sock", std::process::id()));
            let _ = std::fs::remove_file(&socket);
            let child = std::process::Command::new(std::env::var("FERRY_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into()))
                .args(extra)
                .args(["-name", "qmp-test", "-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-qmp"])
                .arg(format!("unix:{},server=on,wait=off", socket.display()))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("qemu-system-x86_64 (scripts/test.sh installs it)");
            Monitor { child, socket }
        }
    }

    impl Drop for Monitor {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    #[tokio::test]
    async fn a_second_monitor_runs_commands_out_of_band() {
        let oob = std::env::temp_dir().join(format!("ferry-qmp-test-{}-oob.sock", std::process::id()));
        let _ = std::fs::remove_file(&oob);
        let extra = ["-chardev".to_string(), format!("socket,id=oob,path={},server=on,wait=off", oob.display()), "-mon".into(), "chardev=oob,mode=control".into()];
        let monitor = Monitor::start_with("-main", &extra);
        let _main = Qmp::connect(&monitor.socket, Duration::from_secs(20)).await.unwrap();
        let mut qmp = Qmp::connect_oob(&oob, Duration::from_secs(20)).await.unwrap();
        // QEMU answers out of band (no migration to pause: its refusal is the answer).
        let refused = qmp.execute_oob("migrate-pause", json!({})).await.unwrap_err();
        assert!(format!("{refused:#}").contains("QEMU refused migrate-pause"), "{refused:#}");
        // An ordinary command is not allowed out of band.
        assert!(qmp.execute_oob("query-status", json!({})).await.is_err());
        assert_eq!(qmp.status().await.unwrap(), "prelaunch", "ordinary commands still work beside");
        let _ = std::fs::remove_file(&oob);
    }

    #[tokio::test]
    async fn an_answer_left_by_a_caller_that_gave_up_is_not_taken_by_the_next_command() {
        let monitor = Monitor::start();
        let mut qmp = Qmp::connect(&monitor.socket, Duration::from_secs(20)).await.unwrap();
        {
            // The caller sends its command, then gives up before the answer comes (its future
            // is dropped, as when the migration it served fails).
            let mut status = std::pin::pin!(qmp.execute("query-status", json!({})));
            let waker = futures::task::noop_waker();
            let polled = status.as_mut().poll(&mut std::task::Context::from_waker(&waker));
            assert!(polled.is_pending(), "QEMU answered within the first poll: nothing was left behind");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let name = qmp.execute("query-name", json!({})).await.unwrap();
        assert_eq!(name, json!({"name": "qmp-test"}));
        assert_eq!(qmp.status().await.unwrap(), "prelaunch");
    }
}
