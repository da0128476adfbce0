//! The `toastgate` binary as a user runs it.

use std::ffi::OsStr;
use std::process::{Child, Command, Output, Stdio};

/// The binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_toastgate");

/// Runs `toastgate ARGS` to completion.
pub fn toastgate<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(BIN).args(args).output().unwrap()
}

/// Asserts the command succeeded; shows its stdout otherwise.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Starts `toastgate ARGS` in the background at RUST_LOG=warn, its stdout
/// as given (piped to read it, or null), its stderr discarded.
pub fn spawn_toastgate<I, S>(args: I, stdout: Stdio) -> KillOnDrop
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// A child process, killed (and reaped) when dropped.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Sends `signal` (e.g. "-HUP") with `kill`; asserts it was delivered.
    pub fn signal(&self, signal: &str) {
        send_signal(self.0.id(), signal);
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `kill SIGNAL PID`; asserts it was delivered.
pub fn send_signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {signal} {pid}");
}
