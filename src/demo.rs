//! `toastgate demo`: the simulator and the gateway in one process, with a
//! dev JWT per team and a few ready-to-paste curl lines.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::config::{Config, SecretSource};
use crate::server::{self, Listeners};
use crate::shutdown::Stop;
use crate::simulator::{SimConfig, Simulator};

pub struct DemoOptions {
    pub config: PathBuf,
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub sim_listen: SocketAddr,
}

pub async fn run(opts: DemoOptions, stop: Stop) -> anyhow::Result<()> {
    let mut config = Config::load(&opts.config, &SecretSource::process_env())
        .with_context(|| format!("loading {}", opts.config.display()))?;
    if let Some(a) = opts.listen {
        config.listen.public = a;
    }
    if let Some(a) = opts.admin_listen {
        config.listen.admin = a;
    }

    let sim_listener = tokio::net::TcpListener::bind(opts.sim_listen)
        .await
        .with_context(|| format!("binding the simulator to {}", opts.sim_listen))?;
    let sim = Simulator::start(sim_listener, SimConfig::demo()).await?;
    // The gateway talks to wherever the simulator actually listens.
    let base = sim.base_url();
    config.upstream.identity_url = base.clone();
    config.upstream.compute_url = base.clone();
    config.upstream.compute_v1_url = Some(base.clone());

    let listeners = Listeners::bind(config.listen.public, config.listen.admin)
        .await
        .context("binding the gateway listeners")?;
    let public = listeners.public.local_addr()?;
    let admin = listeners.admin.local_addr()?;
    print_banner(&config, &base, public, admin)?;

    let result = server::run(config, listeners, stop).await;
    sim.shutdown();
    result.map_err(Into::into)
}

fn print_banner(
    config: &Config,
    sim: &str,
    public: SocketAddr,
    admin: SocketAddr,
) -> anyhow::Result<()> {
    println!("toastgate demo");
    println!("  gateway   http://{public}");
    println!("  admin     http://{admin}/readyz");
    println!("  simulator {sim} (fake TOAST identity + compute)");
    println!();
    let mut first_token = None;
    for (team, t) in &config.teams {
        let jwt = crate::auth::mint_token(
            &config.auth,
            team,
            &format!("demo-user@{team}"),
            Duration::from_secs(12 * 3600),
        )
        .context("minting a demo JWT")?;
        println!("  team {team} (projects: {})", t.projects.join(", "));
        println!("    TOKEN_{}={jwt}", team.to_uppercase().replace('-', "_"));
        if first_token.is_none() {
            first_token = Some((
                team.clone(),
                t.projects.first().cloned().unwrap_or_default(),
                jwt,
            ));
        }
    }
    if let Some((team, project, jwt)) = first_token {
        println!();
        println!("Try ({team}):");
        println!("  curl -s http://{public}/v2/{project}/flavors -H 'Authorization: Bearer {jwt}'");
        println!("  curl -s http://{public}/v2/{project}/servers/detail -H 'X-Auth-Token: {jwt}'");
        println!("  curl -s http://{public}/v2/{project}/os-keypairs -H 'X-Auth-Token: {jwt}' \\");
        println!(
            "       -H 'Content-Type: application/json' -d '{{\"keypair\":{{\"name\":\"demo-key\"}}}}' -X POST"
        );
        println!("  curl -s http://{admin}/readyz");
    }
    println!();
    println!("Ctrl-C stops.");
    Ok(())
}
