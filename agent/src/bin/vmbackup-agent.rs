//! `vmbackup-agent`: the backup agent daemon of a KVM host.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use vmbackup_agent::config::AgentConfig;

/// vmbackup agent: backs up and restores this host's VMs for the control plane (gRPC).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// gRPC listen address (overrides the config file).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Data directory: catalog, session file, embedded store (overrides the config file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (see systemd/vmbackup-agent.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Do not run the embedded Image Storage.
    #[arg(long)]
    no_embedded_store: bool,
    /// Listen address of the embedded Image Storage (overrides the config file).
    #[arg(long)]
    embedded_store_listen: Option<std::net::SocketAddr>,
    /// Prometheus /metrics address (overrides the config file).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// ZStack REST API listen address (overrides `rest.listen`).
    #[arg(long)]
    rest_listen: Option<std::net::SocketAddr>,
    /// One more volume root (repeatable), added to `[volumes] roots` of the config file.
    #[arg(long = "volume-root", value_name = "DIR")]
    volume_roots: Vec<PathBuf>,
}

fn load(args: &Args) -> anyhow::Result<AgentConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
            AgentConfig::from_toml(&text).with_context(|| format!("parsing config {}", path.display()))?
        }
        None => AgentConfig::default(),
    };
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = &args.data_dir {
        config.data_dir = d.clone();
    }
    if args.no_embedded_store {
        config.embedded_store.enabled = false;
    }
    if let Some(l) = args.embedded_store_listen {
        config.embedded_store.listen = l;
    }
    if let Some(m) = args.metrics_listen {
        config.metrics_listen = Some(m);
    }
    if let Some(r) = args.rest_listen {
        config.rest.listen = Some(r);
    }
    config.volumes.roots.extend(args.volume_roots.iter().cloned());
    config.volume_roots().map_err(anyhow::Error::msg).context("--volume-root")?;
    Ok(config)
}

fn main() -> anyhow::Result<()> {
    vmbackup_store::daemon::malloc::tune_malloc(&vmbackup_store::daemon::malloc::AGENT_SETTINGS);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = load(&args)?;
    let log = vmbackup_store::daemon::logging::init(&config.log_level, &config.log_format);

    let shutdown = CancellationToken::new();
    let (reload_tx, reloads) = tokio::sync::mpsc::unbounded_channel();
    let token = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
            (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
        else {
            tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    vmbackup_store::daemon::systemd::reloading();
                    match load(&args) {
                        Ok(c) => { let _ = reload_tx.send(c); }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload refused; the running configuration stays"),
                    }
                    vmbackup_store::daemon::systemd::reloaded();
                }
            }
        }
        tracing::info!("shutting down");
        vmbackup_store::daemon::systemd::stopping();
        token.cancel();
    });
    let control = vmbackup_agent::daemon::Control { shutdown, reloads, log: Some(log) };
    vmbackup_agent::daemon::run(config, control).await
}
