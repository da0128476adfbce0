//! A real `redis-server` for tests, on a free loopback port, optionally with
//! a password (`requirepass`); it can be killed and restarted on the same
//! port, stopped and continued with signals, and is killed on drop.
//! Without `redis-server` on PATH the test fails (never skips).

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::process::send_signal;

pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A server without a password.
    pub fn start() -> RedisServer {
        RedisServer::spawn(free_port(), None)
    }

    /// A server that requires `password`.
    pub fn start_with_password(password: &str) -> RedisServer {
        RedisServer::spawn(free_port(), Some(password.to_string()))
    }

    fn spawn(port: u16, password: Option<String>) -> RedisServer {
        let mut server = RedisServer {
            port,
            password,
            child: None,
        };
        server.restart();
        server
    }

    /// Starts the server again, on the same port with the same password
    /// (after `kill`); returns once it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `redis-server` ({e}): the Redis tests need it on PATH \
                     (apt-get install -y redis-server); .ci/run installs it"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ping().is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://` URL of database 0, with the password when there is one.
    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/0", self.port),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(1))
    }

    pub fn ping(&self) -> redis::RedisResult<String> {
        TcpStream::connect(("127.0.0.1", self.port))?;
        redis::cmd("PING").query(&mut self.connection()?)
    }

    /// PTTL of `key` in milliseconds (-2: no such key).
    pub fn pttl(&self, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query(&mut self.connection().expect("redis connection"))
            .expect("PTTL")
    }

    /// Sends `signal` (e.g. "-STOP", "-CONT") to the running server.
    pub fn signal(&self, signal: &str) {
        send_signal(self.child.as_ref().expect("running").id(), signal);
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process must be continued to die cleanly.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}
