//! Real `redis-server` processes for tests, on free loopback ports, killed on
//! drop:
//! - [`RedisServer`]: one server, optionally with a password (`requirepass`)
//!   or TLS only (certificates made by [`RedisPki`]); it can be killed and
//!   restarted on the same port, stopped and continued with signals;
//! - [`RedisCluster`]: three masters joined into a Redis Cluster by
//!   `redis-cli --cluster create`.
//!
//! Without `redis-server` (and `redis-cli`) on PATH the test fails, it never
//! skips: .ci/run installs them.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use super::free_port;
use super::process::send_signal;
use super::tempdir::TempDir;

/// A private CA with a server certificate for 127.0.0.1 and a client
/// certificate, as PEM files in a temp folder.
pub struct RedisPki {
    dir: TempDir,
}

impl RedisPki {
    pub fn new() -> RedisPki {
        let dir = TempDir::new("redis-pki");
        let ca = certificate_authority("toastgate test CA");
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for (name, subject) in [("server", "127.0.0.1"), ("client", "toastgate")] {
            let key = KeyPair::generate().unwrap();
            // Its own subject: OpenSSL (redis-server) takes a certificate
            // whose subject equals its issuer for a self-signed one.
            let mut params = CertificateParams::new(vec![subject.to_string()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, subject);
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.join(&format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(&format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        let other = certificate_authority("a CA that signed none of them");
        std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
        RedisPki { dir }
    }

    /// `ca.pem`, `other-ca.pem`, `server.pem`/`.key`, `client.pem`/`.key`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.file(name)).unwrap()
    }

    /// What a client trusting our CA and showing the client certificate uses.
    pub fn client_certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: self.read("client.pem"),
                client_key: self.read("client.key"),
            }),
            root_cert: Some(self.read("ca.pem")),
        }
    }
}

fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// How a [`RedisServer`] listens.
enum Mode {
    Plain {
        password: Option<String>,
    },
    /// TLS only (`--port 0`); clients must show a certificate when asked.
    Tls {
        pki_dir: PathBuf,
        client_certs: bool,
    },
}

pub struct RedisServer {
    pub port: u16,
    mode: Mode,
    child: Option<Child>,
}

impl RedisServer {
    /// A server without a password.
    pub fn start() -> RedisServer {
        RedisServer::spawn(free_port(), Mode::Plain { password: None })
    }

    /// A server that requires `password`.
    pub fn start_with_password(password: &str) -> RedisServer {
        RedisServer::spawn(
            free_port(),
            Mode::Plain {
                password: Some(password.to_string()),
            },
        )
    }

    /// A TLS-only server with `pki`'s server certificate; with
    /// `client_certs` it refuses clients without a certificate from the CA.
    pub fn start_tls(pki: &RedisPki, client_certs: bool) -> RedisServer {
        RedisServer::spawn(
            free_port(),
            Mode::Tls {
                pki_dir: pki.dir.path().to_path_buf(),
                client_certs,
            },
        )
    }

    fn spawn(port: u16, mode: Mode) -> RedisServer {
        let mut server = RedisServer {
            port,
            mode,
            child: None,
        };
        server.restart();
        server
    }

    /// Starts the server again, on the same port in the same mode (after
    /// `kill`); returns once it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        match &self.mode {
            Mode::Plain { password } => {
                cmd.args(["--port", &self.port.to_string()]);
                if let Some(password) = password {
                    cmd.args(["--requirepass", password]);
                }
            }
            Mode::Tls {
                pki_dir,
                client_certs,
            } => {
                let file = |name: &str| pki_dir.join(name).display().to_string();
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .args(["--tls-cert-file", &file("server.pem")])
                    .args(["--tls-key-file", &file("server.key")])
                    .args(["--tls-ca-cert-file", &file("ca.pem")])
                    .args([
                        "--tls-auth-clients",
                        if *client_certs { "yes" } else { "no" },
                    ]);
            }
        }
        self.child = Some(spawn_redis(&mut cmd));
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = self.ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer on port {}: {e}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The URL of database 0: `redis://` with the password when there is
    /// one, `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        match &self.mode {
            Mode::Plain {
                password: Some(password),
            } => format!("redis://:{password}@127.0.0.1:{}/0", self.port),
            Mode::Plain { password: None } => format!("redis://127.0.0.1:{}/0", self.port),
            Mode::Tls { .. } => format!("rediss://127.0.0.1:{}/0", self.port),
        }
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let client = match &self.mode {
            Mode::Plain { .. } => redis::Client::open(self.url())?,
            Mode::Tls { pki_dir, .. } => {
                toastgate::tls::install_default_provider();
                let read = |name: &str| std::fs::read(pki_dir.join(name)).unwrap();
                let certs = redis::TlsCertificates {
                    client_tls: Some(redis::ClientTlsConfig {
                        client_cert: read("client.pem"),
                        client_key: read("client.key"),
                    }),
                    root_cert: Some(read("ca.pem")),
                };
                redis::Client::build_with_tls(self.url(), certs)?
            }
        };
        client.get_connection_with_timeout(Duration::from_secs(1))
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

fn spawn_redis(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start `redis-server` ({e}): the Redis tests need it on PATH \
                 (apt-get install -y redis-server); .ci/run installs it"
            )
        })
}

/// Three masters (no replicas) on free ports, every slot assigned.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: TempDir,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = TempDir::new("redis-cluster");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut children = Vec::new();
        for port in &ports {
            let node_dir = dir.join(&port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.current_dir(&node_dir)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"]);
            children.push(spawn_redis(&mut cmd));
        }
        let mut cluster = RedisCluster {
            ports,
            children,
            _dir: dir,
        };
        for port in &cluster.ports {
            wait_for_port(*port);
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `redis-cli` ({e}): apt-get install -y redis-tools")
            });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_until_ok();
        cluster
    }

    /// A seed URL (the first node); clients discover the rest.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    /// Every node agrees the cluster is up (all slots covered).
    fn wait_until_ok(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all_ok = self.ports.iter().all(|port| {
                redis::Client::open(format!("redis://127.0.0.1:{port}"))
                    .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            });
            if all_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port of the node serving `key`'s slot (`CLUSTER KEYSLOT` + `CLUSTER SLOTS`).
    pub fn node_of(&self, key: &str) -> u16 {
        let mut con = redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(1))
            .unwrap();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut con)
            .unwrap();
        let ranges: Vec<(i64, i64, (String, i64))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<redis::Value>>(&mut con)
            .unwrap()
            .into_iter()
            .map(|range| redis::from_redis_value(range).unwrap())
            .map(|(start, end, node): (i64, i64, Vec<redis::Value>)| {
                let host: String = redis::from_redis_value(node[0].clone()).unwrap();
                let port: i64 = redis::from_redis_value(node[1].clone()).unwrap();
                (start, end, (host, port))
            })
            .collect();
        let (_, _, (_, port)) = ranges
            .into_iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .expect("every slot is assigned");
        u16::try_from(port).unwrap()
    }

    /// PTTL of `key` asked of the node `port` directly (-2: not there).
    pub fn pttl_on(&self, port: u16, key: &str) -> i64 {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(1))
            .unwrap();
        redis::cmd("PTTL").arg(key).query(&mut con).unwrap()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
