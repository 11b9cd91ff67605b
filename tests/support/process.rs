//! [`Running`]: a child process (usually `vmm`) whose stdout and stderr are read by two
//! threads into timestamped lines, with the raw stdout (the guest's serial console) kept
//! too. Tests wait for lines and read the console; benches time lines from the spawn.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::env::vmm_bin;

/// A line the child printed, with when it arrived.
#[derive(Clone, Debug)]
pub struct Line {
    /// Arrival time.
    pub at: Instant,
    /// From stderr (else stdout).
    pub stderr: bool,
    /// The text, without line end or carriage returns.
    pub text: String,
}

impl Line {
    /// The text, prefixed with `[stderr] ` for a stderr line.
    pub fn tagged(&self) -> String {
        if self.stderr {
            format!("[stderr] {}", self.text)
        } else {
            self.text.clone()
        }
    }
}

/// A running child whose output is collected line by line; killed and reaped when dropped.
pub struct Running {
    /// The child.
    pub child: Child,
    /// When it was spawned.
    pub started: Instant,
    /// Indices (into `lines`) of lines the `wait_for` family has not looked at yet.
    unseen: mpsc::Receiver<usize>,
    lines: Arc<Mutex<Vec<Line>>>,
    /// Raw stdout bytes: the guest's serial console stream.
    raw: Arc<Mutex<Vec<u8>>>,
    readers: Arc<Readers>,
    /// Duplicates of the read ends of the stdout/stderr pipes, to ask how much is unread.
    pipes: Vec<OwnedFd>,
    /// Lines containing this are printed (with seconds since the spawn) as they are seen.
    echo: Option<&'static str>,
}

/// Progress of the two threads reading the child's stdout and stderr.
#[derive(Default)]
struct Readers {
    /// Readers that got bytes from a pipe and have not yet published them.
    busy: AtomicUsize,
    /// Bytes published so far (both streams).
    bytes: AtomicUsize,
    /// Readers that saw end of file.
    done: AtomicUsize,
}

/// Bytes waiting unread in a pipe (FIONREAD).
fn unread(fd: &OwnedFd) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to the pointer, which points at `n`; the descriptor
    // is owned by `fd` and open for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == 0 { n.max(0) as usize } else { 0 }
}

/// What one reader thread shares with [`Running`].
struct Sink {
    stderr: bool,
    tx: mpsc::Sender<usize>,
    lines: Arc<Mutex<Vec<Line>>>,
    raw: Option<Arc<Mutex<Vec<u8>>>>,
    readers: Arc<Readers>,
}

impl Sink {
    fn publish(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes).replace('\r', "");
        let mut lines = self.lines.lock().unwrap();
        lines.push(Line {
            at: Instant::now(),
            stderr: self.stderr,
            text,
        });
        // Sent under the lock, so that indices arrive in order.
        let _ = self.tx.send(lines.len() - 1);
    }

    /// Reads `src` to its end, publishing each line as it completes.
    fn pump(self, mut src: Box<dyn Read + Send>) {
        let mut pending = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(n) => {
                    self.readers.busy.fetch_add(1, SeqCst);
                    n
                }
            };
            if let Some(r) = &self.raw {
                r.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            pending.extend_from_slice(&buf[..n]);
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                self.publish(&line[..line.len() - 1]);
            }
            if n == 0 {
                if !pending.is_empty() {
                    self.publish(&pending);
                }
                self.readers.done.fetch_add(1, SeqCst);
                return;
            }
            self.readers.bytes.fetch_add(n, SeqCst);
            self.readers.busy.fetch_sub(1, SeqCst);
        }
    }
}

impl Running {
    /// Starts `vmm` with `args`.
    pub fn spawn(args: &[String]) -> Running {
        Self::spawn_cmd(Command::new(vmm_bin()).args(args))
    }

    /// Starts a prepared command with stdin from /dev/null.
    pub fn spawn_cmd(cmd: &mut Command) -> Running {
        Self::spawn_cmd_stdin(cmd.stdin(Stdio::null()))
    }

    /// Starts a prepared command with stdin from /dev/null, or says why it could not.
    pub fn try_spawn(cmd: &mut Command) -> std::io::Result<Running> {
        Self::try_spawn_stdin(cmd.stdin(Stdio::null()))
    }

    /// Starts a prepared command whose stdin the caller already set up.
    pub fn spawn_cmd_stdin(cmd: &mut Command) -> Running {
        Self::try_spawn_stdin(cmd).expect("spawn vmm")
    }

    fn try_spawn_stdin(cmd: &mut Command) -> std::io::Result<Running> {
        use std::os::fd::AsFd;
        let started = Instant::now();
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let (tx, unseen) = mpsc::channel();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let readers = Arc::new(Readers::default());
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let pipes = vec![
            out.as_fd().try_clone_to_owned()?,
            err.as_fd().try_clone_to_owned()?,
        ];
        for (src, stderr) in [
            (Box::new(out) as Box<dyn Read + Send>, false),
            (Box::new(err), true),
        ] {
            let sink = Sink {
                stderr,
                tx: tx.clone(),
                lines: lines.clone(),
                raw: (!stderr).then(|| raw.clone()),
                readers: readers.clone(),
            };
            std::thread::spawn(move || sink.pump(src));
        }
        Ok(Running {
            child,
            started,
            unseen,
            lines,
            raw,
            readers,
            pipes,
            echo: None,
        })
    }

    /// From now on, lines containing `pat` are printed with the seconds since the spawn
    /// when a wait sees them (benches: `vmmtest:` progress in their logs).
    pub fn echo(mut self, pat: &'static str) -> Self {
        self.echo = Some(pat);
        self
    }

    /// Waits for a line not yet seen by a wait that contains `pat` (stderr lines are
    /// matched with their `[stderr] ` tag); returns its index, or None on timeout or when
    /// the output ended.
    pub fn wait_for_index(&mut self, pat: &str, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let i = self.unseen.recv_timeout(left).ok()?;
            let line = self.line(i);
            if let Some(e) = self.echo
                && line.text.contains(e)
            {
                println!("    +{:7.2} s  {}", self.secs_to(i), line.text);
            }
            if line.tagged().contains(pat) {
                return Some(i);
            }
        }
    }

    /// Like [`Running::wait_for_index`], returning the (tagged) line.
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> Option<String> {
        let i = self.wait_for_index(pat, timeout)?;
        Some(self.line(i).tagged())
    }

    /// Line `i` of the output (both streams, in arrival order).
    pub fn line(&self, i: usize) -> Line {
        self.lines.lock().unwrap()[i].clone()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    /// The first line so far whose text contains `pat`, without waiting.
    pub fn find_line(&self, pat: &str) -> Option<Line> {
        let lines = self.lines.lock().unwrap();
        lines.iter().find(|l| l.text.contains(pat)).cloned()
    }

    /// Seconds from the spawn to line `i`.
    pub fn secs_to(&self, i: usize) -> f64 {
        (self.line(i).at - self.started).as_secs_f64()
    }

    /// Waits until both output pipes reached end of file and everything read is published
    /// (after the process ended; ceiling 60 s, in case a grandchild kept a pipe open).
    fn drain_eof(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.readers.done.load(SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit; kills it after `timeout`. Returns the exit code
    /// (None when killed or ended by a signal). Everything it printed is collected on return.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.wait_exit_polling(timeout, Duration::from_millis(50)).0
    }

    /// Like [`Running::wait_exit`], polling every millisecond, and also returns when the
    /// exit was seen (benches time it).
    pub fn wait_exit_at(&mut self, timeout: Duration) -> (Option<i32>, Instant) {
        self.wait_exit_polling(timeout, Duration::from_millis(1))
    }

    fn wait_exit_polling(&mut self, timeout: Duration, poll: Duration) -> (Option<i32>, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                let at = Instant::now();
                self.drain_eof();
                return (st.code(), at);
            }
            if Instant::now() > deadline {
                self.kill_and_drain();
                return (None, Instant::now());
            }
            std::thread::sleep(poll);
        }
    }

    /// Kills the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the process and returns once everything it printed has been collected, so
    /// [`Running::console`] then ends exactly where the process stopped printing.
    pub fn kill_and_drain(&mut self) {
        self.kill();
        self.drain_eof();
    }

    /// The guest console once `vmm`'s output has settled: nothing unread in its pipes and
    /// nothing read but unpublished, twice in a row 100 ms apart. For a VM that prints no
    /// more (e.g. paused) while the process lives on; a process that ended needs
    /// [`Running::wait_exit`] or [`Running::kill_and_drain`] instead, which are exact.
    pub fn settled_console(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            let quiet =
                self.pipes.iter().all(|p| unread(p) == 0) && self.readers.busy.load(SeqCst) == 0;
            let now = quiet.then(|| self.readers.bytes.load(SeqCst));
            if now.is_some() && now == last {
                break;
            }
            last = now;
            std::thread::sleep(Duration::from_millis(100));
        }
        self.console()
    }

    /// Everything printed so far, stderr lines tagged `[stderr] `.
    pub fn output(&self) -> String {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .map(Line::tagged)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The guest console (stdout) so far, as text.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.raw.lock().unwrap()).replace('\r', "")
    }

    /// Seconds since the spawn.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Panics with the process's output attached.
pub fn fail(r: &Running, msg: &str) -> ! {
    panic!(
        "{msg}\n----- vmm output -----\n{}\n----------------------",
        r.output()
    );
}

/// Result of one `vmm` subcommand: (exit code, stdout, stderr).
pub type CliOut = (i32, String, String);

/// Runs `vmm ARGS` to completion (`RUST_LOG=warn`).
pub fn vmm_cli(args: &[&str]) -> CliOut {
    let out = Command::new(vmm_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `vmm ARGS`, which must succeed.
pub fn vmm_cli_ok(args: &[&str]) -> Result<String, String> {
    let (code, out, err) = vmm_cli(args);
    if code == 0 {
        Ok(out)
    } else {
        Err(format!(
            "vmm {args:?} exited {code}\nstdout: {out}\nstderr: {err}"
        ))
    }
}
