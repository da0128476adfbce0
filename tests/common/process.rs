//! The `toastgate` binary as a user runs it.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::{Value, json};
use toastgate::simulator::SimHandle;

use super::{BATCH_SECRET_KEY, JWT_SECRET, WEB_API_PASSWORD, fixtures, free_port};

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

/// Writes the test config for `sim` with `overlays` and `extra` into `dir`,
/// its secrets in files and fixed ports, and starts `toastgate serve` on it
/// (behind `wrapper`, a command that runs the rest of its arguments, if
/// given), its log discarded. Returns the process and the public and admin
/// base URLs.
pub fn serve(
    dir: &Path,
    sim: &SimHandle,
    overlays: &[&str],
    extra: Value,
    wrapper: &[&str],
) -> (KillOnDrop, String, String) {
    serve_with_log(dir, sim, overlays, extra, wrapper, None, &[])
}

/// [`serve`], with the log (text, at `level`) in `dir/toastgate.log`. Not
/// under a file size limit: the log is a file too.
pub fn serve_logged(
    dir: &Path,
    sim: &SimHandle,
    overlays: &[&str],
    extra: Value,
    level: &str,
) -> (KillOnDrop, String, String) {
    serve_with_log(dir, sim, overlays, extra, &[], Some(level), &[])
}

/// [`serve_logged`] with `--log-format json`.
pub fn serve_logged_json(
    dir: &Path,
    sim: &SimHandle,
    extra: Value,
    level: &str,
) -> (KillOnDrop, String, String) {
    serve_with_log(
        dir,
        sim,
        &[],
        extra,
        &[],
        Some(level),
        &["--log-format", "json"],
    )
}

fn serve_with_log(
    dir: &Path,
    sim: &SimHandle,
    overlays: &[&str],
    extra: Value,
    wrapper: &[&str],
    log_level: Option<&str>,
    serve_flags: &[&str],
) -> (KillOnDrop, String, String) {
    std::fs::write(dir.join("jwt.key"), JWT_SECRET).unwrap();
    std::fs::write(dir.join("web.pw"), WEB_API_PASSWORD).unwrap();
    std::fs::write(dir.join("batch.sk"), BATCH_SECRET_KEY).unwrap();
    let ports = [free_port(), free_port()];
    let overlays = [overlays, &["overlays/secrets-in-files.yaml"]].concat();
    let mut config = fixtures::gateway_config(&sim.base_url(), &overlays, extra);
    fixtures::merge(
        &mut config,
        json!({"listen": {"public": format!("127.0.0.1:{}", ports[0]),
                          "admin": format!("127.0.0.1:{}", ports[1])}}),
    );
    let config_path = dir.join("toastgate.yaml");
    std::fs::write(&config_path, fixtures::to_text(&config)).unwrap();
    let serve = [BIN, "serve", "--config", config_path.to_str().unwrap()];
    let command: Vec<&str> = wrapper
        .iter()
        .copied()
        .chain(serve)
        .chain(serve_flags.iter().copied())
        .collect();
    let (level, stderr) = match log_level {
        Some(level) => (
            level,
            Stdio::from(std::fs::File::create(dir.join("toastgate.log")).unwrap()),
        ),
        None => ("warn", Stdio::null()),
    };
    let child = Command::new(command[0])
        .args(&command[1..])
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    (
        KillOnDrop(child),
        format!("http://127.0.0.1:{}", ports[0]),
        format!("http://127.0.0.1:{}", ports[1]),
    )
}

/// A JWT for `team`, signed with the key of the config [`serve`] wrote
/// into `dir`.
pub fn team_token(dir: &Path, team: &str) -> String {
    let config =
        toastgate::config::Config::load(&dir.join("toastgate.yaml"), &super::secrets()).unwrap();
    toastgate::auth::mint_token(&config.auth, team, "t", std::time::Duration::from_secs(600))
        .unwrap()
}
