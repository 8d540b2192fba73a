//! The agent daemon: opens the catalog, loads sessions, starts the embedded Image Storage,
//! binds the API listener and serves until shutdown.

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, Sessions};
use crate::catalog::Catalog;
use crate::config::AgentConfig;
use crate::storage::registry::Registry;

/// What every request handler shares.
#[derive(Debug, Clone)]
pub struct State {
    /// Effective configuration.
    pub config: Arc<AgentConfig>,
    /// Accepted sessions.
    pub sessions: Sessions,
    /// Backup storages.
    pub registry: Registry,
    /// Running and past jobs.
    pub jobs: crate::jobs::Jobs,
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tls = config.tls.load(config.listen).context("TLS configuration of the agent API")?;
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating data directory {}", data_dir.display()))?;

    let catalog_path = data_dir.join("catalog.sqlite");
    let catalog = tokio::task::spawn_blocking(move || Catalog::open(&catalog_path))
        .await?
        .with_context(|| format!("opening catalog in {}", data_dir.display()))?;
    let registry = Registry::new(Arc::new(catalog), config.store_tls.clone());

    let sessions = Sessions::new(config.sessions.iter().cloned());
    if sessions.is_empty() {
        let token = auth::load_or_create_session_file(&config.data_dir)
            .with_context(|| format!("creating session file in {}", config.data_dir.display()))?;
        sessions.insert(token);
        tracing::info!(path = %config.data_dir.join(auth::SESSION_FILE).display(), "no session configured; using the session in this file");
    }

    let mut tasks = tokio::task::JoinSet::new();
    if config.embedded_store.enabled {
        let es = &config.embedded_store;
        let dir = es.data_dir.clone().unwrap_or_else(|| config.data_dir.join("store"));
        let chunk_size = es.chunk_size;
        let dir2 = dir.clone();
        let service = tokio::task::spawn_blocking(move || vmbackup_store::server::StoreService::open(dir2, chunk_size))
            .await?
            .with_context(|| format!("opening embedded store at {}", dir.display()))?;
        let listener =
            TcpListener::bind(es.listen).await.with_context(|| format!("binding embedded store on {}", es.listen))?;
        let addr = listener.local_addr()?;
        let token = shutdown.clone();
        tasks.spawn(async move {
            vmbackup_store::server::serve(Arc::new(service), listener, None, token)
                .await
                .context("embedded store server")
        });
        let record = registry
            .ensure_embedded(&es.name, &addr.ip().to_string(), addr.port())
            .await
            .context("registering the embedded store")?;
        tracing::info!(uuid = %record.uuid, name = %record.name, url = %record.url, dir = %dir.display(), "embedded Image Storage ready");
    }

    let jobs = crate::jobs::Jobs::open(registry.catalog().clone()).await?;
    let state = State { config: Arc::new(config.clone()), sessions, registry, jobs };
    let listener =
        TcpListener::bind(config.listen).await.with_context(|| format!("binding agent API on {}", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, data_dir = %config.data_dir.display(), "vmbackup-agent ready");
    let router = crate::api::router(&state, tls)?;
    vmbackup_store::systemd::ready(&format!("serving on {}", config.listen));
    let jobs = state.jobs.clone();
    vmbackup_store::systemd::spawn_watchdog(shutdown.clone(), move || {
        Some(format!("{} jobs running", jobs.all_running().len()))
    });
    let token = shutdown.clone();
    tasks.spawn(async move {
        router
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), token.cancelled_owned())
            .await
            .context("agent API server")
    });

    // The first task to end (error or shutdown) stops the others.
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
    }
    result
}
