//! The simulator on its own, over real HTTP on an ephemeral port: a client
//! that talks to it as a cloud caller does (Keystone tokens in
//! X-Auth-Token), the set-ups the simulator tests share, and the spec's
//! shapes they check against.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use toastgate::simulator::{self, DEMO_BATCH_TENANT_ID, DEMO_WEB_TENANT_ID, SimConfig, SimHandle};

pub use super::http::Answer;
use super::{fast_sim, http, start_sim};

pub const WEB: &str = DEMO_WEB_TENANT_ID;
pub const BATCH: &str = DEMO_BATCH_TENANT_ID;

/// The delay of every transition in the state machine tests. Their
/// simulator's clock stands still until the test moves it with
/// [`wait_steps`], so a transitional state is always seen however slow the
/// machine, and then the next one.
pub const STEP: Duration = Duration::from_secs(300);

/// Moves the simulator's clock until `steps` transitions have completed.
pub async fn wait_steps(sim: &Sim, steps: u32) {
    sim.h.advance(STEP * steps);
}

/// Builds and actions both take one `STEP`, long enough to observe each
/// transitional state.
pub fn observable() -> SimConfig {
    SimConfig {
        build_delay: STEP,
        action_delay: STEP,
        manual_clock: true,
        ..SimConfig::demo()
    }
}

/// Servers are built at once; actions take one `STEP`.
pub fn observable_actions() -> SimConfig {
    SimConfig {
        build_delay: Duration::ZERO,
        ..observable()
    }
}

pub struct Sim {
    pub h: SimHandle,
    pub http: reqwest::Client,
    pub base: String,
}

pub async fn start(config: SimConfig) -> Sim {
    let h = start_sim(config).await;
    let base = h.base_url();
    Sim {
        h,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        base,
    }
}

/// A simulator started with `config`, and a token of the web tenant.
pub async fn with_web_token(config: SimConfig) -> (Sim, String) {
    let sim = start(config).await;
    let t = sim.web_token().await;
    (sim, t)
}

/// As `with_web_token`, with the web tenant's key pair `access-key` (the
/// one `spec_create_example` and `u2_server` use).
pub async fn with_access_key(config: SimConfig) -> (Sim, String) {
    let (sim, t) = with_web_token(config).await;
    sim.keypair(&t, WEB, "access-key").await;
    (sim, t)
}

/// `with_access_key` on a simulator without delays.
pub async fn fast_with_access_key() -> (Sim, String) {
    with_access_key(fast_sim()).await
}

impl Sim {
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("X-Auth-Token", t);
        }
        req = http::with_headers(req, headers);
        if let Some(b) = body {
            req = req.json(&b);
        }
        http::send(req).await
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Answer {
        self.raw(method, path, Some(token), body, &[]).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path, token, Some(body)).await
    }

    pub async fn keystone(&self, tenant: &str, user: &str, password: &str) -> Answer {
        let body = json!({"auth": {"tenantId": tenant,
            "passwordCredentials": {"username": user, "password": password}}});
        self.raw(Method::POST, "/v2.0/tokens", None, Some(body), &[])
            .await
    }

    /// Keystone's answer to the web tenant's demo user and API password.
    pub async fn web_keystone(&self) -> Answer {
        self.keystone(
            WEB,
            simulator::DEMO_WEB_USERNAME,
            simulator::DEMO_WEB_API_PASSWORD,
        )
        .await
    }

    pub async fn web_token(&self) -> String {
        token_of(&self.web_keystone().await)
    }

    pub async fn batch_token(&self) -> String {
        let a = self
            .keystone(
                BATCH,
                simulator::DEMO_BATCH_USERNAME,
                simulator::DEMO_BATCH_API_PASSWORD,
            )
            .await;
        token_of(&a)
    }

    pub async fn keypair(&self, token: &str, tenant: &str, name: &str) {
        let a = self
            .post(
                &format!("/v2/{tenant}/os-keypairs"),
                token,
                json!({"keypair": {"name": name}}),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }

    /// Creates a u2 server (local disk, no block device mapping) and returns its id.
    pub async fn u2_server(&self, token: &str, name: &str) -> String {
        let a = self
            .post(
                &format!("/v2/{WEB}/servers"),
                token,
                json!({"server": {
                    "name": name,
                    "imageRef": simulator::IMAGE_CENTOS_7_8,
                    "flavorRef": simulator::FLAVOR_U2_C1M1,
                    "networks": [{"uuid": simulator::NETWORK_VPC1}],
                    "key_name": "access-key"
                }}),
            )
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
        a.body["server"]["id"].as_str().unwrap().to_string()
    }

    /// Sends the spec's create example and returns the new server's id.
    pub async fn spec_server(&self, token: &str) -> String {
        let created = self
            .post(&format!("/v2/{WEB}/servers"), token, spec_create_example())
            .await;
        created.body["server"]["id"].as_str().unwrap().to_string()
    }

    pub async fn server(&self, token: &str, id: &str) -> Value {
        let a = self.get(&format!("/v2/{WEB}/servers/{id}"), token).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["server"].clone()
    }

    pub async fn action(&self, token: &str, id: &str, body: Value) -> Answer {
        self.post(&format!("/v2/{WEB}/servers/{id}/action"), token, body)
            .await
    }
}

/// The token id of a Keystone answer; asserts it was issued.
fn token_of(a: &Answer) -> String {
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["access"]["token"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The spec's create example, verbatim (key pair `access-key` must exist).
pub fn spec_create_example() -> Value {
    json!({
      "server": {
        "name": "DB-Master",
        "imageRef": "9956f822-29c9-4f81-9410-0c392d9c8c24",
        "flavorRef": "a4b6a0f7-aeff-4d78-a8d5-7de9f007012d",
        "networks": [{
          "subnet": "b83863ff-0355-4c73-8c10-0bdf66a69aab"
        }],
        "availability_zone": "kr-pub-a",
        "key_name": "access-key",
        "max_count": 1,
        "min_count": 1,
        "block_device_mapping_v2": [{
          "uuid": "9956f822-29c9-4f81-9410-0c392d9c8c24",
          "boot_index": 0,
          "volume_size": 1000,
          "device_name": "vda",
          "source_type": "image",
          "destination_type": "volume",
          "delete_on_termination": 1
        }],
        "security_groups": [{
          "name": "default"
        }]
      }
    })
}

pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit())
}

pub fn matches(re: &str, s: &str) -> bool {
    regex::Regex::new(re).unwrap().is_match(s)
}

/// A time as `2020-04-01T07:59:59Z`.
pub const Z_TIME: &str = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$";
/// A time as `2020-04-01T07:59:59.123456`.
pub const MICRO_TIME: &str = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$";

/// Keystone's 401.
pub fn assert_unauthorized(a: &Answer) {
    assert_eq!(a.status, 401);
    assert_eq!(
        a.body,
        json!({"error": {"message": "The request you have made requires authentication.",
                         "code": 401, "title": "Unauthorized"}})
    );
}

/// Asserts a Nova fault `{fault: {code: status, message}}`; returns the message.
pub fn fault_message(a: &Answer, fault: &str, status: u16) -> String {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body[fault]["code"], status, "{}", a.body);
    a.body[fault]["message"].as_str().unwrap().to_string()
}
