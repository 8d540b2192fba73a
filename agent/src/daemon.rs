//! The agent daemon: opens the catalog, loads sessions, starts the embedded Image Storage,
//! binds the API listener and serves until shutdown.
//!
//! Reload (SIGHUP, from the binary): a new configuration replaces the sessions (with their
//! expiries), the log filter and the [`Live`] settings (volume roots included); nothing else
//! changes and no connection drops.
//! Shutdown (SIGTERM): new jobs are refused at once, running jobs get
//! `shutdown_grace_seconds` to end and are then cancelled (a cancelled backup is never
//! committed, so nothing half-written becomes visible), and only then do the API server and
//! the embedded store stop.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::api::State;
use crate::api::auth::{self, Sessions};
use crate::catalog::{Catalog, CatalogHandle};
use crate::config::AgentConfig;
use crate::live::Live;
use crate::ops::Ops;
use crate::storage::local::LocalStore;
use crate::storage::registry::Registry;

/// How the binary steers a running daemon.
#[derive(Debug)]
pub struct Control {
    /// Cancelled on SIGTERM.
    pub shutdown: CancellationToken,
    /// New configurations to apply (SIGHUP).
    pub reloads: tokio::sync::mpsc::UnboundedReceiver<AgentConfig>,
    /// The log filter, when the binary installed a reloadable one.
    pub log: Option<vmbackup_store::daemon::logging::LogLevel>,
}

/// Runs the agent until `control.shutdown` is cancelled.
pub async fn run(config: AgentConfig, control: Control) -> anyhow::Result<()> {
    let Control { shutdown, reloads, log } = control;
    let tls = config.tls.load(config.listen).context("TLS configuration of the agent API")?;
    let registry = Registry::new(
        open_catalog(&config.data_dir).await?,
        config.store_tls.clone(),
        crate::storage::credentials::Credentials::new(&config.data_dir),
        config.ceph.clone(),
        crate::keys::Keys::new(config.keys.clone()),
    );
    let sessions = sessions(&config)?;

    let mut tasks = tokio::task::JoinSet::new();
    // The embedded store outlives the API server: draining jobs still upload to it.
    let store_stop = CancellationToken::new();
    if config.embedded_store.enabled {
        start_embedded_store(&config, &registry, &mut tasks, store_stop.clone()).await?;
    }

    // Export sockets of a previous process serve nothing any more.
    let _ = std::fs::remove_dir_all(config.data_dir.join("run").join("exports"));
    // Partial restore files a killed agent left: removed before jobs are marked Failed.
    match crate::volume::writer::partials::track(&config.data_dir.join("run").join("partials")) {
        Ok(removed) => {
            for p in removed {
                tracing::warn!(path = %p.display(), "removed a partial restore file an interrupted restore left");
            }
        }
        Err(e) => tracing::error!(error = %e, "partial restore files are not tracked: the run directory is unusable"),
    }
    let jobs = crate::jobs::Jobs::open(registry.catalog().clone()).await?;
    // What an earlier process asked of stores but stopped before recording: commits, deletes.
    let settle = std::time::Duration::from_secs(5);
    if let Err(e) = crate::backup::lifecycle::finish_pending_commits(&registry, settle).await {
        tracing::error!(error = %e, "commits an earlier run left could not be settled");
    }
    if let Err(e) = crate::backup::lifecycle::finish_pending_deletes(&registry, settle).await {
        tracing::error!(error = %e, "deletes an earlier run left could not be finished");
    }
    let live = Arc::new(Live::new(&config));
    let ops = Ops::new(registry, jobs, live, config.data_dir.join("run"));
    let state = State { config: Arc::new(config.clone()), sessions, ops };
    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("binding agent API on {}", config.listen))?;
    if let Some(addr) = config.metrics_listen {
        serve_metrics(addr, &state, store_stop.clone()).await?;
    }
    if let Some(addr) = config.rest.listen {
        start_rest(addr, &state, &mut tasks, store_stop.clone()).await?;
    }
    tracing::info!(listen = %listener.local_addr()?, data_dir = %config.data_dir.display(), "vmbackup-agent ready");
    let router = crate::api::router(&state, tls)?;
    vmbackup_store::daemon::systemd::ready(&format!("serving on {}", config.listen));
    let jobs = state.ops.jobs().clone();
    vmbackup_store::daemon::systemd::spawn_watchdog(shutdown.clone(), move || {
        Some(format!("{} jobs running", jobs.all_running().len()))
    });
    spawn_reloads(state.clone(), reloads, log, shutdown.clone());
    spawn_ceph_gc(&state, &config.ceph, shutdown.clone());

    let (token, jobs, stop) = (shutdown.clone(), state.ops.jobs().clone(), store_stop.clone());
    let grace = std::time::Duration::from_secs(config.shutdown_grace_seconds);
    tasks.spawn(async move {
        let drained = async move {
            token.cancelled().await;
            jobs.drain(grace).await;
        };
        let r = router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drained)
            .await
            .context("agent API server");
        stop.cancel();
        r
    });
    first_to_end(tasks, &shutdown, &store_stop).await
}

/// Collects the garbage of the Ceph storages' pools every `gc_interval_seconds` (the first
/// round one interval after start), until shutdown.
fn spawn_ceph_gc(state: &State, config: &crate::config::CephConfig, stop: CancellationToken) {
    if config.gc_interval_seconds == 0 {
        return;
    }
    let every = std::time::Duration::from_secs(config.gc_interval_seconds);
    let margin = std::time::Duration::from_secs(config.gc_safety_margin_seconds);
    let registry = state.ops.registry().clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = registry.collect_ceph_garbage(margin).await {
                tracing::warn!(error = %e, "garbage collection of the Ceph storages failed");
            }
        }
    });
}

/// Opens (creating) the data directory and the catalog in it.
async fn open_catalog(data_dir: &std::path::Path) -> anyhow::Result<CatalogHandle> {
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let path = data_dir.join("catalog.sqlite");
    let catalog = tokio::task::spawn_blocking(move || Catalog::open(&path))
        .await?
        .with_context(|| format!("opening catalog in {}", data_dir.display()))?;
    Ok(CatalogHandle::new(catalog))
}

/// The configured sessions, or the one in `<data-dir>/session` (created on first start).
fn sessions(config: &AgentConfig) -> anyhow::Result<Sessions> {
    let configured = config.session_list().map_err(anyhow::Error::msg).context("sessions in the configuration")?;
    let sessions = Sessions::new(configured);
    if sessions.is_empty() {
        let token = auth::load_or_create_session_file(&config.data_dir)
            .with_context(|| format!("creating session file in {}", config.data_dir.display()))?;
        sessions.insert(token);
        tracing::info!(path = %config.data_dir.join(auth::SESSION_FILE).display(), "no session configured; using the session in this file");
    }
    Ok(sessions)
}

/// Opens the embedded Image Storage, serves it until `stop`, and registers it.
async fn start_embedded_store(
    config: &AgentConfig,
    registry: &Registry,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let es = &config.embedded_store;
    let dir = es.data_dir.clone().unwrap_or_else(|| config.data_dir.join("store"));
    if !es.listen.ip().is_loopback() {
        anyhow::bail!(
            "embedded_store.listen {} is not a loopback address: the embedded store serves plaintext; run vmbackup-store with TLS for other hosts",
            es.listen
        );
    }
    let (dir2, chunk_size, auth) = (dir.clone(), es.chunk_size, es.auth.clone());
    let service =
        tokio::task::spawn_blocking(move || vmbackup_store::server::StoreService::open(dir2, chunk_size, &auth))
            .await?
            .with_context(|| format!("opening embedded store at {}", dir.display()))?;
    let listener =
        TcpListener::bind(es.listen).await.with_context(|| format!("binding embedded store on {}", es.listen))?;
    let addr = listener.local_addr()?;
    let url = crate::validate::endpoint_url(&addr.ip().to_string(), addr.port(), false);
    registry.set_local(LocalStore::new(service.store().clone(), url));
    tasks.spawn(async move {
        vmbackup_store::server::serve(Arc::new(service), listener, None, stop).await.context("embedded store server")
    });
    let record = registry
        .ensure_embedded(&es.name, &addr.ip().to_string(), addr.port())
        .await
        .context("registering the embedded store")?;
    tracing::info!(uuid = %record.uuid, name = %record.name, url = %record.url, dir = %dir.display(), "embedded Image Storage ready");
    Ok(())
}

/// Serves ZStack's REST API on `addr` until `stop` (with the gRPC listener's TLS).
async fn start_rest(
    addr: std::net::SocketAddr,
    state: &State,
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let tls = crate::rest::tls::server_config(&state.config.tls, addr).context("TLS configuration of the REST API")?;
    let l = TcpListener::bind(addr).await.with_context(|| format!("binding the REST API on {addr}"))?;
    tracing::info!(rest_listen = %l.local_addr()?, tls = tls.is_some(), "REST API at /zstack/v1/");
    let state = state.clone();
    tasks.spawn(async move { crate::rest::serve(l, state, tls, stop).await.context("REST API server") });
    Ok(())
}

/// Serves `/metrics` on `addr` until `stop`.
async fn serve_metrics(addr: std::net::SocketAddr, state: &State, stop: CancellationToken) -> anyhow::Result<()> {
    let l = TcpListener::bind(addr).await.with_context(|| format!("binding metrics on {addr}"))?;
    tracing::info!(metrics_listen = %l.local_addr()?, "metrics at /metrics");
    let jobs = state.ops.jobs().clone();
    let running: crate::metrics::RunningJobs = Arc::new(move || jobs.all_running().len());
    let registry = Arc::new(crate::metrics::registry(state.ops.jobs().metrics(), running));
    tokio::spawn(async move {
        if let Err(e) = vmbackup_store::daemon::metrics_http::serve(l, registry, stop).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// Applies each new configuration the binary sends (SIGHUP) until shutdown.
fn spawn_reloads(
    state: State,
    mut reloads: tokio::sync::mpsc::UnboundedReceiver<AgentConfig>,
    log: Option<vmbackup_store::daemon::logging::LogLevel>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                next = reloads.recv() => match next {
                    Some(new) => apply_reload(&state, &new, log.as_ref()),
                    None => return,
                },
            }
        }
    });
}

/// Waits for the servers: the first to end (error or shutdown) stops the others; the first
/// error is the result.
async fn first_to_end(
    mut tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    shutdown: &CancellationToken,
    store_stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let r = joined.context("server task panicked").and_then(|r| r);
        if let Err(e) = r {
            tracing::error!(error = %format!("{e:#}"), "server stopped");
            if result.is_ok() {
                result = Err(e);
            }
        }
        shutdown.cancel();
        store_stop.cancel();
    }
    result
}

fn apply_reload(state: &State, new: &AgentConfig, log: Option<&vmbackup_store::daemon::logging::LogLevel>) {
    let old = &state.config;
    if !new.sessions.is_empty() {
        match new.session_list() {
            Ok(sessions) => state.sessions.replace(sessions),
            Err(e) => tracing::error!(error = %e, "sessions not applied; the current ones stay"),
        }
    } else if !old.sessions.is_empty() {
        tracing::warn!("the reloaded configuration lists no sessions; keeping the current ones");
    }
    state.ops.live().apply(new);
    state.ops.registry().keys().reload(new.keys.clone());
    if let Some(log) = log
        && let Err(e) = log.set(&new.log_level)
    {
        tracing::error!(error = %e, "log_level not applied");
    }
    let restart_only = [
        ("listen", old.listen != new.listen),
        ("data_dir", old.data_dir != new.data_dir),
        ("embedded_store", format!("{:?}", old.embedded_store) != format!("{:?}", new.embedded_store)),
        ("tls", format!("{:?}", old.tls) != format!("{:?}", new.tls)),
        ("store_tls", format!("{:?}", old.store_tls) != format!("{:?}", new.store_tls)),
        ("ceph", old.ceph != new.ceph),
        ("rest", old.rest != new.rest),
        ("shutdown_grace_seconds", old.shutdown_grace_seconds != new.shutdown_grace_seconds),
    ];
    for (key, changed) in restart_only {
        if changed {
            tracing::warn!(key, "changed in the configuration file; takes effect at the next restart");
        }
    }
    tracing::info!(
        default_parallelism = new.default_parallelism,
        max_backups_per_storage = new.max_backups_per_storage,
        log_level = %new.log_level,
        limits = ?new.limits,
        volume_roots = %state.ops.live().roots().describe(),
        "configuration reloaded"
    );
}
