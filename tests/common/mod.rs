//! Shared test harness: the real simulator and the real gateway, each on an
//! ephemeral port, talking HTTP (`Env`), configured from tests/fixtures
//! (`fixtures`). Beside it: one way to send a request and read the answer
//! (`http`), the simulator on its own (`sim`), a real redis-server
//! (`redis`), /metrics readers (`metrics`), captured logs (`logs`), temp
//! folders (`tempdir`) and the toastgate binary (`process`).
#![allow(dead_code)]

pub mod fixtures;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod process;
pub mod redis;
pub mod sim;
pub mod tempdir;

use std::time::Duration;

use serde_json::{Value, json};
use toastgate::config::{Config, SecretSource};
use toastgate::server::{self, Listeners};
use toastgate::shutdown::{StopHandle, stop_pair};
use toastgate::simulator::{
    FLAVOR_U2_C1M1, IMAGE_CENTOS_7_8, NETWORK_VPC1, SimConfig, SimHandle, Simulator,
};

pub const WEB_TENANT: &str = "6cdebe3eb0094910bc41f1d42ebe4cb7";
pub const BATCH_TENANT: &str = "9a1f3c5e7b2d4f6a8c0e1b3d5f7a9c2e";
pub const JWT_SECRET: &str = "integration-test-hs256-secret-0123456789";
pub const WEB_API_PASSWORD: &str = "demo-web-api-password";
pub const BATCH_SECRET_KEY: &str = "demo-batch-secret-key";

/// The secrets tests/fixtures/gateway.yaml names.
pub fn secrets() -> SecretSource {
    SecretSource::default()
        .with_override("TG_JWT_SECRET", JWT_SECRET)
        .with_override("TG_WEB_PW", WEB_API_PASSWORD)
        .with_override("TG_BATCH_SK", BATCH_SECRET_KEY)
}

pub struct Env {
    pub sim: SimHandle,
    pub gw: String,
    pub admin: String,
    pub config: Config,
    pub http: reqwest::Client,
    stop: StopHandle,
    server: tokio::task::JoinHandle<()>,
}

/// The demo simulator without build or action delays.
pub fn fast_sim() -> SimConfig {
    SimConfig {
        build_delay: Duration::ZERO,
        action_delay: Duration::ZERO,
        ..SimConfig::demo()
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The simulator on an ephemeral loopback port.
pub async fn start_sim(config: SimConfig) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(listener, config).await.unwrap()
}

/// The first fixed address of a v2 server document.
pub fn first_fixed_ip(server: &Value) -> String {
    server["addresses"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()[0]["addr"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until `/readyz` of the admin listener at `admin` (a base URL)
/// answers 200, as a readiness probe would.
pub async fn wait_ready(http: &reqwest::Client, admin: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = http
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if matches!(status, Ok(200)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready after 30 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the server closes the connection (EOF or reset); false if it
/// is still open after `within`. Whatever the server sends before closing
/// (a 408, a TLS alert) is read past.
pub async fn closed_by_server(conn: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// The sending half of an HTTP/2 client connection.
pub type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// An HTTP/2 client connection over `io` (prior knowledge on plain TCP, or a
/// TLS stream that negotiated `h2`): its sender, and the task driving the
/// connection, which ends with how the connection ended.
pub async fn h2_handshake<I>(io: I) -> (H2Sender, tokio::task::JoinHandle<hyper::Result<()>>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    (send, tokio::spawn(conn))
}

/// A gateway run by `server::run_with_reload` on the config file at `path`
/// (test secrets), which it checks for changes every 100 ms.
pub struct ReloadingGateway {
    pub gw: String,
    pub admin: String,
    /// The config it started with.
    pub config: Config,
    stop: StopHandle,
    server: tokio::task::JoinHandle<Result<(), server::RunError>>,
}

impl ReloadingGateway {
    pub async fn start(path: &std::path::Path) -> ReloadingGateway {
        let config = Config::load(path, &secrets()).unwrap();
        let listeners = Listeners::bind(config.listen.public, config.listen.admin)
            .await
            .unwrap();
        let gw = format!("http://{}", listeners.public.local_addr().unwrap());
        let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
        let (stop, stopped) = stop_pair();
        let source = server::ReloadSource {
            path: path.to_path_buf(),
            secrets: secrets(),
            poll: Duration::from_millis(100),
        };
        let server = tokio::spawn(server::run_with_reload(
            config.clone(),
            listeners,
            stopped,
            Some(source),
        ));
        ReloadingGateway {
            gw,
            admin,
            config,
            stop,
            server,
        }
    }

    /// Stops it and asserts it ended cleanly.
    pub async fn stop(self) {
        self.stop.stop();
        self.server.await.unwrap().unwrap();
    }
}

impl Env {
    /// A fast simulator and the gateway on tests/fixtures/gateway.yaml.
    pub async fn start() -> Env {
        Env::start_with_overlays(fast_sim(), &[], json!({})).await
    }

    /// Starts a simulator with `sim`, then the gateway on
    /// tests/fixtures/gateway.yaml with the fixtures named in `overlays`
    /// (e.g. "overlays/builders-team.yaml") and then `extra` merged onto it
    /// (see fixtures.rs).
    pub async fn start_with_overlays(sim: SimConfig, overlays: &[&str], extra: Value) -> Env {
        let sim = start_sim(sim).await;
        Env::start_on(sim, overlays, extra, &secrets()).await
    }

    /// Starts another gateway (a replica) in front of an existing simulator,
    /// configured as `start_with_overlays` does, with `secrets`.
    pub async fn start_on(
        sim: SimHandle,
        overlays: &[&str],
        extra: Value,
        secrets: &SecretSource,
    ) -> Env {
        let config = fixtures::gateway_config(&sim.base_url(), overlays, extra);
        let yaml = fixtures::to_text(&config);
        let config = Config::from_yaml(&yaml, secrets, None).expect("test config is valid");
        let listeners = Listeners::bind(config.listen.public, config.listen.admin)
            .await
            .unwrap();
        let gw = format!("http://{}", listeners.public.local_addr().unwrap());
        let admin = format!("http://{}", listeners.admin.local_addr().unwrap());
        let (stop, stopped) = stop_pair();
        let run_config = config.clone();
        let server = tokio::spawn(async move {
            server::run(run_config, listeners, stopped)
                .await
                .expect("gateway runs");
        });
        Env {
            sim,
            gw,
            admin,
            config,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            stop,
            server,
        }
    }

    pub fn token(&self, team: &str) -> String {
        toastgate::auth::mint_token(
            &self.config.auth,
            team,
            &format!("{team}-user"),
            Duration::from_secs(600),
        )
        .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.gw, path)
    }

    /// A v2-style call as `team` (a bearer JWT): the whole answer.
    pub async fn request(
        &self,
        team: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> http::Answer {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(self.token(team));
        if let Some(b) = body {
            req = req.json(&b);
        }
        http::send(req).await
    }

    /// A v2-style call as `team` (a bearer JWT): status and body.
    pub async fn call(
        &self,
        team: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let a = self.request(team, method, path, body).await;
        (a.status, a.body)
    }

    /// A v1.0 call for `team` on the web project's appkey: always HTTP 200,
    /// returns the envelope.
    pub async fn v1(
        &self,
        team: &str,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Value {
        self.v1_on("WebAppKey0001", team, method, path_and_query, body)
            .await
    }

    pub async fn v1_on(
        &self,
        appkey: &str,
        team: &str,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Value {
        let mut req = self
            .http
            .request(
                method,
                self.url(&format!("/v1.0/appkeys/{appkey}{path_and_query}")),
            )
            .header("X-Auth-Token", self.token(team));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let a = http::send(req).await;
        assert_eq!(a.status, 200, "the v1.0 surface always answers 200");
        assert!(a.body.is_object(), "a v1.0 answer is JSON: {}", a.body);
        a.body
    }

    /// Any request, exactly as given: raw body bytes, headers as listed
    /// (repeats included). Returns status, headers and the body (JSON when
    /// it parses, else a string; null when empty).
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let req = self.http.request(method, self.url(path)).body(body);
        let a = http::send(http::with_headers(req, headers)).await;
        (a.status, a.headers, a.body)
    }

    /// Creates key pair `name` in the web project as `team`; asserts 200.
    pub async fn web_keypair(&self, team: &str, name: &str) -> Value {
        let (s, b) = self
            .post(
                team,
                "/v2/web/os-keypairs",
                json!({"keypair": {"name": name}}),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        b
    }

    /// Creates key pair `key` and then a u2 server `name` (CentOS on vpc1)
    /// with it in the web project as `team`; asserts 202; returns its id.
    pub async fn web_u2_server(&self, team: &str, key: &str, name: &str) -> String {
        self.web_keypair(team, key).await;
        let (s, b) = self
            .post(
                team,
                "/v2/web/servers",
                json!({"server": {"name": name, "imageRef": IMAGE_CENTOS_7_8,
                                  "flavorRef": FLAVOR_U2_C1M1,
                                  "networks": [{"uuid": NETWORK_VPC1}], "key_name": key}}),
            )
            .await;
        assert_eq!(s, 202, "{b}");
        b["server"]["id"].as_str().unwrap().to_string()
    }

    /// `n` concurrent GETs of `path` as `team`; their statuses.
    pub async fn concurrent_statuses(&self, n: usize, team: &str, path: &str) -> Vec<u16> {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let req = self.http.get(self.url(path)).bearer_auth(self.token(team));
                tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
            })
            .collect();
        let mut statuses = Vec::new();
        for c in calls {
            statuses.push(c.await.unwrap());
        }
        statuses
    }

    pub async fn get(&self, team: &str, path: &str) -> (u16, Value) {
        self.call(team, reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, team: &str, path: &str, body: Value) -> (u16, Value) {
        self.call(team, reqwest::Method::POST, path, Some(body))
            .await
    }

    /// `POST /v2/web/os-keypairs` creating key pair `name` as `team`.
    pub async fn create_keypair(&self, team: &str, name: &str) -> (u16, Value) {
        self.post(
            team,
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": name}}),
        )
        .await
    }

    /// Requests the simulator saw on its compute API (identity calls excluded).
    pub fn compute_requests(&self) -> Vec<toastgate::simulator::RecordedRequest> {
        self.sim
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/v2/"))
            .collect()
    }

    pub async fn stop(self) {
        let sim = self.sim.clone();
        self.stop_gateway().await;
        sim.shutdown();
    }

    /// Stops this gateway only (replicas share one simulator).
    pub async fn stop_gateway(self) {
        self.stop.stop();
        // A gateway that does not stop, or whose task failed, fails the
        // test: both are bugs the test would otherwise hide.
        match tokio::time::timeout(Duration::from_secs(30), self.server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the gateway's task failed: {e}"),
            Err(_) => panic!("the gateway did not stop within 30 s of being told to"),
        }
    }

    /// Waits until `/readyz` answers 200 (the refreshers hold a token for
    /// every project), as a readiness probe would.
    pub async fn wait_ready(&self) {
        wait_ready(&self.http, &self.admin).await;
    }

    /// The admin listener's /metrics text.
    pub async fn metrics(&self) -> String {
        metrics::fetch(&self.http, &self.admin).await
    }

    /// The admin listener's /readyz: status and body.
    pub async fn readyz(&self) -> (u16, Value) {
        let a = http::send(self.http.get(format!("{}/readyz", self.admin))).await;
        (a.status, a.body)
    }
}

/// Asserts `body` is a v1.0 failure envelope with `code`; returns its message.
pub fn assert_v1_failure(body: &Value, code: i64) -> String {
    assert_eq!(body["header"]["isSuccessful"], false, "body: {body}");
    assert_eq!(body["header"]["resultCode"], code, "body: {body}");
    body["header"]["resultMessage"]
        .as_str()
        .unwrap_or_else(|| panic!("no resultMessage in {body}"))
        .to_string()
}

/// Asserts `body` is a Nova-style error `{"<fault>": {"code": status, "message": ..}}`.
pub fn assert_nova_error(body: &Value, fault: &str, status: u16) -> String {
    let inner = &body[fault];
    assert_eq!(inner["code"], status, "body: {body}");
    let msg = inner["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message in {body}"));
    assert!(!msg.is_empty());
    msg.to_string()
}
