use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use toastgate::config::{Config, SecretSource};
use toastgate::server::{self, Listeners};
use toastgate::shutdown::{Stop, stop_pair};

/// jemalloc instead of the system allocator: a request makes many small,
/// short-lived allocations (measured with bench/run.sh), and with its
/// background thread (turned on in `main`) it returns freed pages to the OS
/// within seconds, so the memory 10,000 idle connections took is given back
/// once they close (glibc's arenas keep it).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[cfg(feature = "simulator")]
use toastgate::simulator::{SimConfig, Simulator};

#[derive(Parser)]
#[command(
    name = "toastgate",
    version,
    about = "Authenticating API gateway for the NHN Cloud (TOAST) Compute API"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "TOASTGATE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The config file (YAML; see config/toastgate.example.yaml).
        #[arg(long, env = "TOASTGATE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file: prints "ok" or every problem with its key path.
    CheckConfig {
        /// The config file to check (its secrets are resolved too).
        #[arg(long, required_unless_present = "schema")]
        config: Option<PathBuf>,
        /// Print the JSON Schema of the config file instead (for editors).
        #[arg(long, conflicts_with = "config")]
        schema: bool,
    },
    /// Print a shell completion script, e.g.
    /// `toastgate completions bash > /etc/bash_completion.d/toastgate`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Run the built-in TOAST simulator alone.
    #[cfg(feature = "simulator")]
    Simulate {
        /// Address the simulator listens on (identity and compute APIs).
        #[arg(long, default_value = "127.0.0.1:18774")]
        listen: std::net::SocketAddr,
        /// BUILD -> ACTIVE delay of new instances.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        build_delay: Duration,
        /// Lifetime of issued tokens.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
    },
    /// Run the simulator and the gateway together on config/demo.yaml.
    #[cfg(feature = "simulator")]
    Demo {
        /// The gateway's config (its upstream URLs are pointed at the simulator).
        #[arg(long, default_value = "config/demo.yaml")]
        config: PathBuf,
        /// Public listener (default: listen.public of the config).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Admin listener (default: listen.admin of the config).
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
        /// Address of the built-in simulator the demo gateway calls.
        #[arg(long, default_value = "127.0.0.1:18774")]
        sim_listen: std::net::SocketAddr,
    },
    /// Read and check the audit log: verify, query, tail.
    Audit {
        /// What to do with the audit log.
        #[command(subcommand)]
        cmd: toastgate::audit::AuditCommand,
    },
    /// Say whether TEAM may do ACTION on PROJECT, and by which rule.
    Explain {
        /// The config whose rules are explained.
        #[arg(long)]
        config: PathBuf,
        /// The team (as its JWTs name it).
        #[arg(long, required_unless_present = "list")]
        team: Option<String>,
        /// An Action name, e.g. instance.reboot (`--list` shows them all).
        #[arg(long, required_unless_present = "list")]
        action: Option<String>,
        /// Project alias or tenant id.
        #[arg(long, required_unless_present = "list")]
        project: Option<String>,
        /// List every Action and group instead.
        #[arg(long)]
        list: bool,
    },
    /// What a new config would have decided for the requests in audit logs:
    /// every difference per team and Action, with examples. Exit 0: nothing
    /// newly refused; 1: something would newly be refused (a CI gate for
    /// config changes); 2: a log cannot be read. Needs no secret.
    Replay {
        /// The config to judge the recorded requests with.
        #[arg(long)]
        config: PathBuf,
        /// Audit log files (FILE and its rotated FILE.1, ... in any order).
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// Examples shown per team and Action.
        #[arg(long, default_value_t = 3)]
        examples: usize,
    },
    /// Print a JWT for TEAM signed with the config's HS secret (dev and tests).
    MintToken {
        /// The config with the HS secret (`auth.keys.type: hs_secret`) and the team.
        #[arg(long)]
        config: PathBuf,
        /// The team the token is for (a key of `teams`).
        #[arg(long)]
        team: String,
        /// How long the token is valid ("15m", "1h", "7days").
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The token's `sub` claim: who the caller is within the team (shown in audit records).
        #[arg(long, default_value = "dev")]
        subject: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    give_memory_back();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config: path } => {
            let config = load_or_explain(&path)?;
            let listeners = Listeners::bind(config.listen.public, config.listen.admin).await?;
            let reload = server::ReloadSource {
                path,
                secrets: SecretSource::process_env(),
                poll: Duration::from_secs(2),
            };
            server::run_with_reload(config, listeners, signal_stop(), Some(reload)).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { schema: true, .. } => {
            println!("{}", toastgate::config::json_schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "toastgate",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config, .. } => {
            let config = config.unwrap_or_default();
            match Config::load(&config, &SecretSource::process_env()) {
                Ok(config) => {
                    let problems = server::startup_problems(&config);
                    if problems.is_empty() {
                        println!("ok");
                        return Ok(ExitCode::SUCCESS);
                    }
                    for p in problems {
                        println!("{p}");
                    }
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    for p in e.problems() {
                        println!("{p}");
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        #[cfg(feature = "simulator")]
        Command::Simulate {
            listen,
            build_delay,
            token_lifetime,
        } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            let sim = Simulator::start(
                listener,
                SimConfig {
                    build_delay,
                    token_lifetime,
                    ..SimConfig::demo()
                },
            )
            .await?;
            println!("simulator listening on {}", sim.base_url());
            signal_stop().stopped().await;
            sim.shutdown();
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "simulator")]
        Command::Demo {
            config,
            listen,
            admin_listen,
            sim_listen,
        } => {
            toastgate::demo::run(
                toastgate::demo::DemoOptions {
                    config,
                    listen,
                    admin_listen,
                    sim_listen,
                },
                signal_stop(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { cmd } => toastgate::audit::run_cli(cmd),
        Command::Replay {
            config,
            logs,
            examples,
        } => replay(&config, &logs, examples),
        Command::Explain {
            config,
            team,
            action,
            project,
            list,
        } => {
            if list {
                print!("{}", toastgate::policy::catalog_listing());
                return Ok(ExitCode::SUCCESS);
            }
            let config = load_or_explain(&config)?;
            let text = toastgate::policy::explain(
                &config,
                team.as_deref().unwrap_or_default(),
                action.as_deref().unwrap_or_default(),
                project.as_deref().unwrap_or_default(),
            );
            println!("{text}");
            Ok(if text.starts_with("ALLOWED") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::MintToken {
            config,
            team,
            ttl,
            subject,
        } => {
            let config = load_or_explain(&config)?;
            if !config.teams.contains_key(&team) {
                anyhow::bail!(
                    "team `{team}` is not in the config (teams: {})",
                    config.teams.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            println!(
                "{}",
                toastgate::auth::mint_token(&config.auth, &team, &subject, ttl)?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `toastgate replay`: see the command's help.
fn replay(config: &std::path::Path, logs: &[PathBuf], examples: usize) -> anyhow::Result<ExitCode> {
    let config = Config::load(config, &SecretSource::offline())
        .map_err(|e| anyhow::anyhow!("invalid config {}:\n{e}", config.display()))?;
    let mut records = Vec::new();
    for path in logs {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", path.display());
                return Ok(ExitCode::from(2));
            }
        };
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) if v.is_object() => records.push(v),
                _ => {
                    eprintln!(
                        "error: {}:{}: not an audit record (a JSON object per line)",
                        path.display(),
                        i + 1
                    );
                    return Ok(ExitCode::from(2));
                }
            }
        }
    }
    let report = toastgate::replay::replay(&config, &records);
    print!("{}", toastgate::replay::render(&report, examples));
    Ok(if report.newly_refused() > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn load_or_explain(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path, &SecretSource::process_env())
        .map_err(|e| anyhow::anyhow!("invalid config {}:\n{e}", path.display()))
}

/// A stop signal fired by SIGINT or SIGTERM.
fn signal_stop() -> Stop {
    let (handle, stop) = stop_pair();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop signal received; draining");
        handle.stop();
    });
    stop
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// jemalloc's background thread purges freed pages after its decay time
/// (10 s by default), without waiting for the next allocation.
fn give_memory_back() {
    #[cfg(not(target_env = "msvc"))]
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "could not start the allocator's background thread");
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: a file or a log collector
    // would get the escape codes as text. NO_COLOR (no-color.org) wins.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .event_format(toastgate::logs::FastText::new())
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .event_format(toastgate::logs::FastJson::new())
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every flag and argument of every command says what it is for.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "toastgate", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:#?}");
        Cli::command().debug_assert();
    }
}
