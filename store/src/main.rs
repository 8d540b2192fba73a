//! `vmbackup-store`: the Image Storage daemon.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use vmbackup_store::access::Access;
use vmbackup_store::backend::rados::RadosBackend;
use vmbackup_store::backend::s3::S3Backend;
use vmbackup_store::chunk_store::ChunkStore;
use vmbackup_store::config::{BackendKind, StoreConfig};
use vmbackup_store::daemon::systemd;
use vmbackup_store::server::{self, StoreService};
use vmbackup_store::shared::Shared;

/// vmbackup Image Storage: a content-addressed chunk store served over gRPC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// gRPC listen address (overrides the config file).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Data directory (overrides the config file).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Chunk size in bytes of a new store (overrides the config file).
    #[arg(long)]
    chunk_size: Option<u32>,
    /// Prometheus /metrics address (overrides the config file).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a new API token and the `token_blake3` line for a principal in the config.
    /// Give the token to the client; keep only the hash in the config.
    Token,
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<StoreConfig> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
            StoreConfig::from_toml(&text).with_context(|| format!("parsing config {}", path.display()))
        }
        None => Ok(StoreConfig::default()),
    }
}

fn main() -> anyhow::Result<()> {
    if let Some(Command::Token) = Args::parse().command {
        let token = vmbackup_store::access::new_token()?;
        println!("token = \"{token}\"");
        println!("token_blake3 = \"{}\"", vmbackup_store::access::token_hash(&token));
        return Ok(());
    }
    vmbackup_store::daemon::malloc::tune_malloc(&vmbackup_store::daemon::malloc::STORE_SETTINGS);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let _log = vmbackup_store::daemon::logging::init("info", "auto");
    let args = Args::parse();
    let mut config = load_config(args.config.as_ref())?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(c) = args.chunk_size {
        config.chunk_size = c;
    }
    if let Some(m) = args.metrics_listen {
        config.metrics_listen = Some(m);
    }

    let tls = config.tls.load(config.listen).context("TLS configuration")?;
    let dir = config.data_dir.clone();
    let margin = std::time::Duration::from_secs(config.gc_safety_margin_seconds);
    let (chunk_size, scope) = (config.chunk_size, config.dedup_scope);
    let retention = std::time::Duration::from_secs(config.default_retention_seconds);
    let store = match config.backend {
        BackendKind::Fs => tokio::task::spawn_blocking(move || ChunkStore::open(&dir, chunk_size))
            .await?
            .with_context(|| format!("opening store at {}", config.data_dir.display()))?,
        BackendKind::S3 => {
            let section = config.s3.clone().ok_or_else(|| anyhow::anyhow!("backend = \"s3\" needs an [s3] section"))?;
            let settings = section.settings().map_err(|e| anyhow::anyhow!(e))?;
            let lease = std::time::Duration::from_secs(section.gc_lease_seconds);
            open_shared("S3", lease, margin, move || {
                let backend = Arc::new(S3Backend::connect(&settings)?);
                let identity = backend.open_or_create_identity(chunk_size)?;
                Ok((backend, identity))
            })
            .await?
        }
        BackendKind::Rados => {
            let section =
                config.rados.clone().ok_or_else(|| anyhow::anyhow!("backend = \"rados\" needs a [rados] section"))?;
            let lease = std::time::Duration::from_secs(section.gc_lease_seconds);
            open_shared("RADOS", lease, margin, move || {
                let backend = Arc::new(RadosBackend::connect(&section.settings())?);
                let identity = backend.open_or_create_identity(chunk_size)?;
                Ok((backend, identity))
            })
            .await?
        }
    }
    .with_dedup_scope(scope)
    .with_sealed_chunks(config.accept_sealed_chunks)
    .with_default_retention(Some(retention));
    let access = Arc::new(
        Access::new(&config.auth, &config.data_dir).map_err(|e| anyhow::anyhow!("[auth] configuration: {e}"))?,
    );
    let service = StoreService::with_store(store, access.clone()).with_gc_margin(margin);
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let shutdown = CancellationToken::new();
    if let Some(addr) = config.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics on {addr}"))?;
        tracing::info!(metrics_listen = %l.local_addr()?, "metrics at /metrics");
        let (registry, token) = (Arc::new(service.metrics()), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = vmbackup_store::daemon::metrics_http::serve(l, registry, token).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        backend = %service.store().backend_description(),
        store_uuid = %service.identity().store_uuid,
        dedup_scope = config.dedup_scope.as_str(),
        "vmbackup-store ready"
    );
    if let Some(path) = args.config.clone() {
        tokio::spawn(reload_on_hangup(path, access));
    }
    let signal_token = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        systemd::stopping();
        signal_token.cancel();
    });
    let bound = listener.local_addr()?;
    systemd::ready(&format!("serving store {} on {bound}", service.identity().store_uuid));
    systemd::spawn_watchdog(shutdown.clone(), || None);
    server::serve(Arc::new(service), listener, tls, shutdown).await?;
    Ok(())
}

/// SIGHUP (systemctl reload) re-reads the config file's `[auth]` section: a removed
/// principal or token stops working at the next call. Other keys need a restart.
async fn reload_on_hangup(path: PathBuf, access: Arc<Access>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; restart the store to change principals");
        return;
    };
    while hup.recv().await.is_some() {
        let applied = load_config(Some(&path))
            .map_err(|e| format!("{e:#}"))
            .and_then(|c| access.reload(&c.auth).map(|()| c.auth.principals.len()));
        match applied {
            Ok(n) => {
                tracing::info!(principals = n, config = %path.display(), "configuration reloaded");
                systemd::reloaded();
            }
            Err(e) => {
                tracing::error!(error = %e, config = %path.display(), "reload refused; the previous principals stay")
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop the store with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Opens a store on a backend that any number of servers may share (a bucket, a pool):
/// `open` connects and reads the identity; sessions and GC then coordinate through the
/// backend ([`Shared`]). A failure is one line naming `what`, its causes joined, so a bad
/// bucket, pool, key or endpoint reads at a glance.
async fn open_shared<B, F>(
    what: &'static str,
    lease: std::time::Duration,
    margin: std::time::Duration,
    open: F,
) -> anyhow::Result<ChunkStore>
where
    B: vmbackup_store::backend::Backend + vmbackup_store::shared::SharedObjects + 'static,
    F: FnOnce() -> Result<(Arc<B>, vmbackup_store::identity::StoreIdentity), vmbackup_store::error::StoreError>
        + Send
        + 'static,
{
    tokio::task::spawn_blocking(move || {
        let (backend, identity) = open()?;
        let shared = Shared::new(backend.clone()).with_lease_ttl(lease);
        shared.set_margin(margin);
        Ok::<_, vmbackup_store::error::StoreError>(
            ChunkStore::with_backend(backend, identity).with_shared(Arc::new(shared)),
        )
    })
    .await?
    .map_err(|e| anyhow::anyhow!("opening the {what} store: {}", e.full_message().replace('\n', " ")))
}
