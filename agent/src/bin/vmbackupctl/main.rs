//! `vmbackupctl`: the operator's command-line client of vmbackup-agent.
//!
//! Tables for people, `--json` for scripts (proto3 JSON: ZStack's camelCase field names).

use std::path::PathBuf;

mod backup;
mod export;
mod files;
mod key;
mod lifecycle;
mod snapshot;
mod status;
mod store;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use tonic::transport::Channel;
use vmbackup_proto::agent::v1 as pb;
use vmbackup_proto::agent::v1::backup_storage_service_client::BackupStorageServiceClient;

/// Operate a vmbackup agent.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Agent endpoint.
    #[arg(long, global = true, env = "VMBACKUP_AGENT", default_value = "http://127.0.0.1:7870")]
    agent: String,
    /// Session uuid (default: read from --session-file).
    #[arg(long, global = true, env = "VMBACKUP_SESSION", hide_env_values = true)]
    session: Option<String>,
    /// File holding the session uuid.
    #[arg(long, global = true, env = "VMBACKUP_SESSION_FILE", default_value = "/var/lib/vmbackup/session")]
    session_file: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Backup storages (Image Storage servers).
    #[command(subcommand)]
    Storage(StorageCommand),
    /// VM layouts the agent backs up.
    #[command(subcommand)]
    Vm(backup::VmCommand),
    /// VM backups.
    #[command(subcommand)]
    Backup(backup::BackupCommand),
    /// Long-running jobs.
    #[command(subcommand)]
    Job(backup::JobCommand),
    /// Volume snapshot groups.
    #[command(subcommand, name = "snapshot-group")]
    SnapshotGroup(snapshot::SnapshotCommand),
    /// Volume backups served as read-only NBD disks (no restore).
    #[command(subcommand)]
    Export(export::ExportCommand),
    /// Encryption key files on this host (no agent needed).
    #[command(subcommand)]
    Key(key::KeyCommand),
    /// The agent and every store it uses, on one screen.
    Status,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output.
    Man,
    /// Talk to an Image Storage server directly.
    Store {
        /// Store endpoint.
        #[arg(long, env = "VMBACKUP_STORE", default_value = "http://127.0.0.1:7871")]
        store: String,
        /// File holding the store API token (default: the embedded store's admin token).
        #[arg(long, env = "VMBACKUP_STORE_TOKEN_FILE", default_value = "/var/lib/vmbackup/store/admin.token")]
        token_file: PathBuf,
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Identity, capacity, counters.
    Status,
    /// Committed backup groups.
    Groups,
    /// Remove chunks no committed backup uses.
    Gc {
        /// Keep chunks touched this many seconds before the cutoff (default: the store's).
        #[arg(long)]
        safety_margin_seconds: Option<u64>,
    },
    /// Delete a committed group (admin; refused while it is retention-locked).
    Delete {
        /// Group uuid.
        group: String,
    },
    /// Extend a group's retention lock (admin; a lock is never shortened).
    Retain {
        /// Group uuid.
        group: String,
        /// Unix seconds until which the group cannot be deleted.
        #[arg(long)]
        until: u64,
    },
    /// Re-read chunks and check them (all, or those of the named groups).
    Verify {
        /// Group uuids.
        groups: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum StorageCommand {
    /// Register an Image Storage (a vmbackup-store server).
    Add {
        /// Name of the backup storage.
        #[arg(long)]
        name: String,
        /// Host of the store (or give --url).
        #[arg(long, default_value = "")]
        hostname: String,
        /// gRPC port of the store (default: the agent's default_store_port).
        #[arg(long, default_value_t = 0)]
        port: u32,
        /// Endpoint URL of the store, e.g. http://10.0.0.5:7871.
        #[arg(long, default_value = "")]
        url: String,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Uuid for the new record (makes a retried add return the same record).
        #[arg(long, default_value = "")]
        resource_uuid: String,
        /// Zone the storage is attached to (repeatable).
        #[arg(long = "zone")]
        zones: Vec<String>,
        /// File holding the store API token the agent presents (kept by the agent, mode
        /// 0600; never shown again).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Seal everything written there with the agent's configured key NAME
        /// (`[keys.NAME]`); chosen once, when the storage is added.
        #[arg(long)]
        encryption_key: Option<String>,
    },
    /// Register a Ceph pool the agent writes directly (a Ceph backup storage).
    AddCeph {
        /// Name of the backup storage.
        #[arg(long)]
        name: String,
        /// Monitor, `host[:port]` or ZStack's `user:password@host/?monPort=6789` (repeatable).
        #[arg(long = "mon", required = true)]
        mons: Vec<String>,
        /// Pool the backups go to (it must exist).
        #[arg(long)]
        pool: String,
        /// cephx client (default client.admin).
        #[arg(long, default_value = "")]
        client: String,
        /// Keyring file holding the client's key (default: the host's /etc/ceph files).
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
        /// Uuid for the new record (makes a retried add return the same record).
        #[arg(long, default_value = "")]
        resource_uuid: String,
        /// Zone the storage is attached to (repeatable).
        #[arg(long = "zone")]
        zones: Vec<String>,
        /// Seal everything written there with the agent's configured key NAME.
        #[arg(long)]
        encryption_key: Option<String>,
    },
    /// List every backup storage.
    List,
    /// Query backup storages with ZStack conditions, e.g. `status=Connected name~=%nfs%`.
    Query {
        /// Conditions, AND-ed.
        conditions: Vec<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<i32>,
        /// Skip this many.
        #[arg(long)]
        start: Option<i32>,
        /// Sort by this field.
        #[arg(long, default_value = "")]
        sort_by: String,
        /// asc or desc.
        #[arg(long, default_value = "")]
        sort_direction: String,
        /// Print only the number of matches.
        #[arg(long)]
        count: bool,
    },
    /// Probe a backup storage again and refresh its status and capacity.
    Reconnect {
        /// Backup storage uuid.
        uuid: String,
    },
    /// Remove a backup storage record (its data stays on the store).
    Delete {
        /// Backup storage uuid.
        uuid: String,
        /// Permissive (refuse while backups use it) or Enforcing.
        #[arg(long, default_value = "Permissive")]
        mode: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Attaches the session to every call.
#[derive(Clone)]
pub(crate) struct Auth(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

type Client = BackupStorageServiceClient<tonic::service::interceptor::InterceptedService<Channel, Auth>>;

/// A channel to the agent and the session to send on it.
async fn channel_and_auth(cli: &Cli) -> anyhow::Result<(Channel, Auth)> {
    let session = match &cli.session {
        Some(s) => s.clone(),
        None => std::fs::read_to_string(&cli.session_file)
            .with_context(|| format!("reading session file {} (or pass --session)", cli.session_file.display()))?
            .trim()
            .to_string(),
    };
    let header = format!("OAuth {session}").parse().context("session is not valid ASCII")?;
    let channel = Channel::from_shared(cli.agent.clone())
        .with_context(|| format!("{:?} is not an endpoint URL", cli.agent))?
        .connect()
        .await
        .with_context(|| format!("connecting to the agent at {}", cli.agent))?;
    Ok((channel, Auth(header)))
}

/// Formats an agent error with its ZStack code.
pub(crate) fn rpc_error(s: tonic::Status) -> anyhow::Error {
    match vmbackup_agent::api::error_code_of(&s) {
        Some(ec) => anyhow::anyhow!("{} ({}): {}", ec.code, ec.description, ec.details),
        None => anyhow::anyhow!("{:?}: {}", s.code(), s.message()),
    }
}

/// Runs one command: those that need no agent first, then those that talk to it, each
/// family by its own function.
async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Completions { shell } => return print_completions(*shell),
        Command::Man => return print_man(),
        Command::Key(cmd) => return key::run(cmd, cli.json),
        Command::Store { store, token_file, command } => {
            return store::run_store(store, token_file, command, cli.json).await;
        }
        _ => {}
    }
    let (channel, auth) = channel_and_auth(&cli).await?;
    match cli.command {
        Command::Status => {
            let data_dir = cli.session_file.parent().unwrap_or(std::path::Path::new("/var/lib/vmbackup"));
            status::run(&cli.agent, data_dir, channel, auth, cli.json).await
        }
        Command::SnapshotGroup(cmd) => snapshot::run(cmd, channel, auth, cli.json).await,
        Command::Export(cmd) => export::run(cmd, channel, auth, cli.json).await,
        command @ (Command::Vm(_) | Command::Backup(_) | Command::Job(_)) => {
            backup::run(command, channel, auth, cli.json).await
        }
        Command::Storage(cmd) => {
            run_storage(cmd, BackupStorageServiceClient::with_interceptor(channel, auth), cli.json).await
        }
        // Run above, without a connection to the agent.
        Command::Completions { .. } | Command::Man | Command::Store { .. } | Command::Key(_) => Ok(()),
    }
}

/// `completions SHELL`: the completion script, on standard output.
fn print_completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    clap_complete::generate(
        shell,
        &mut <Cli as clap::CommandFactory>::command(),
        "vmbackupctl",
        &mut std::io::stdout(),
    );
    Ok(())
}

/// `man`: the manual page (roff), on standard output.
fn print_man() -> anyhow::Result<()> {
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout())?;
    Ok(())
}

/// The system tag that binds a storage being added to a configured key.
fn encryption_tags(key: Option<String>) -> Vec<String> {
    key.map(|k| format!("backup::encryption::key::{k}")).into_iter().collect()
}

/// `storage ...`: the backup storage records of the agent.
async fn run_storage(cmd: StorageCommand, mut client: Client, json: bool) -> anyhow::Result<()> {
    match cmd {
        StorageCommand::Add {
            name,
            hostname,
            port,
            url,
            description,
            resource_uuid,
            zones,
            token_file,
            encryption_key,
        } => {
            let token = match token_file {
                Some(p) => std::fs::read_to_string(&p)
                    .with_context(|| format!("reading token file {}", p.display()))?
                    .trim()
                    .to_string(),
                None => String::new(),
            };
            let request = pb::AddImageStoreBackupStorageRequest {
                token,
                name,
                description,
                hostname,
                port,
                url,
                resource_uuid,
                attached_zone_uuids: zones,
                system_tags: encryption_tags(encryption_key),
                ..Default::default()
            };
            let r = client.add_image_store_backup_storage(request).await.map_err(rpc_error)?.into_inner();
            print_storages(json, &r, r.inventory.iter().cloned().collect())
        }
        StorageCommand::AddCeph {
            name,
            mons,
            pool,
            client: ceph_client,
            keyring,
            description,
            resource_uuid,
            zones,
            encryption_key,
        } => {
            let request = pb::AddCephBackupStorageRequest {
                name,
                description,
                mon_urls: mons,
                pool_name: pool,
                resource_uuid,
                attached_zone_uuids: zones,
                ceph_client,
                keyring_path: keyring.map(|k| k.display().to_string()).unwrap_or_default(),
                system_tags: encryption_tags(encryption_key),
                ..Default::default()
            };
            let r = client.add_ceph_backup_storage(request).await.map_err(rpc_error)?.into_inner();
            print_storages(json, &r, r.inventory.iter().cloned().collect())
        }
        StorageCommand::List => {
            let request = pb::QueryBackupStorageRequest::default();
            let r = client.query_backup_storage(request).await.map_err(rpc_error)?.into_inner();
            print_storages(json, &r, r.inventories.clone())
        }
        StorageCommand::Query { conditions, limit, start, sort_by, sort_direction, count } => {
            let request = pb::QueryBackupStorageRequest {
                conditions,
                limit,
                start,
                count,
                sort_by,
                sort_direction,
                ..Default::default()
            };
            let r = client.query_backup_storage(request).await.map_err(rpc_error)?.into_inner();
            if count && !json {
                println!("{}", r.total.unwrap_or(0));
                return Ok(());
            }
            print_storages(json, &r, r.inventories.clone())
        }
        StorageCommand::Reconnect { uuid } => {
            let request = pb::ReconnectBackupStorageRequest { uuid, ..Default::default() };
            let r = client.reconnect_backup_storage(request).await.map_err(rpc_error)?.into_inner();
            print_storages(json, &r, r.inventory.iter().cloned().collect())
        }
        StorageCommand::Delete { uuid, mode } => delete_storage(&mut client, uuid, mode, json).await,
    }
}

/// `storage delete`: a mode other than Permissive or Enforcing is refused before the agent
/// is asked.
async fn delete_storage(client: &mut Client, uuid: String, mode: String, json: bool) -> anyhow::Result<()> {
    if !matches!(mode.as_str(), "Permissive" | "Enforcing") {
        bail!("--mode must be Permissive or Enforcing, not {mode:?}");
    }
    let request = pb::DeleteBackupStorageRequest { uuid: uuid.clone(), delete_mode: mode, ..Default::default() };
    let r = client.delete_backup_storage(request).await.map_err(rpc_error)?.into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("deleted backup storage {uuid} (its data stays on the store)");
    }
    Ok(())
}

fn print_storages<T: serde::Serialize>(
    json: bool,
    reply: &T,
    rows: Vec<pb::BackupStorageInventory>,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(reply)?);
        return Ok(());
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(["UUID", "NAME", "TYPE", "STATUS", "URL", "TOTAL", "AVAILABLE"]);
    for r in rows {
        table.add_row([
            r.uuid,
            r.name,
            r.r#type,
            r.status,
            r.url,
            bytes(r.total_capacity),
            bytes(r.available_capacity),
        ]);
    }
    println!("{table}");
    Ok(())
}

/// Bytes in binary units, e.g. `1.5 GiB`.
pub(crate) fn bytes(n: i64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}
