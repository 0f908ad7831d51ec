//! The `dynacache` binary, read top to bottom as its start-up story: load the
//! configuration (exit 64 if it is bad), start logging and metrics, connect
//! to DynamoDB, serve, and on SIGTERM/SIGINT drain within the grace period.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Args, Parser, Subcommand};
use figment::Figment;
use figment::providers::Serialized;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use dynacache::config::{Config, LogFormat, SocketMode};
use dynacache::server;
use dynacache::store::{DynamoStore, TableBilling};

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

/// A memcached-protocol cache sidecar that keeps its data in DynamoDB.
///
/// Clients speak memcached to it; hits come from memory, misses from a
/// strongly consistent DynamoDB read, and writes reach DynamoDB before they
/// are acknowledged.
///
/// Settings come from the defaults, then the configuration file, then
/// DYNACACHE_<KEY> environment variables (DYNACACHE_<SECTION>__<KEY> in a
/// section), then flags; every flag works before or after the sub-command.
/// memcached's -l, -p, -s, -a, -m and -c mean what they mean to memcached
/// (but -s keeps TCP on: -p 0 turns it off).
#[derive(Debug, Parser)]
#[command(
    name = "dynacache",
    version,
    about,
    long_about,
    after_help = "Health and metrics: http://<metrics-listen>/metrics, /healthz, /readyz.\n\
                  AWS credentials and region come from the standard AWS chain.\n\
                  Every setting, with its default: config.example.toml."
)]
struct Cli {
    /// TOML configuration file (see config.example.toml); environment and flags override it.
    #[arg(
        long,
        short = 'C',
        value_name = "FILE",
        env = "DYNACACHE_CONFIG",
        global = true
    )]
    config: Option<PathBuf>,
    /// Validate the configuration, print it in full as TOML, and exit:
    /// 0 if valid, 64 if not. Connects to nothing.
    #[arg(long, global = true)]
    check_config: bool,

    #[command(flatten)]
    flags: Flags,

    #[command(subcommand)]
    command: Option<Action>,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Serve memcached clients (the default).
    Serve,
    /// Create the DynamoDB table with TTL on the expiry attribute; a no-op
    /// if it exists. Uses --table, --endpoint-url, --region and the
    /// [dynamodb] and [table] settings.
    InitTable(TableFlags),
}

/// Settings given as flags, each landing on the configuration key of the
/// same name over the file and the environment. Unset flags are left out.
#[derive(Debug, Args, Serialize)]
struct Flags {
    /// TCP address for memcached clients: an IP, or IP:PORT [default: 127.0.0.1:11211].
    #[arg(long, short = 'l', value_name = "ADDR", value_parser = parse_listen, global = true, help_heading = "Listeners")]
    #[serde(skip)]
    listen: Option<ListenAddr>,
    /// TCP port for memcached clients; 0 turns TCP off [default: 11211].
    #[arg(
        long,
        short = 'p',
        value_name = "PORT",
        global = true,
        help_heading = "Listeners"
    )]
    #[serde(skip)]
    port: Option<u16>,
    /// Unix socket for memcached clients, beside TCP.
    #[arg(
        long,
        short = 's',
        value_name = "PATH",
        global = true,
        help_heading = "Listeners"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    unix_socket: Option<PathBuf>,
    /// The unix socket's file mode, octal [default: 0700].
    #[arg(
        long,
        short = 'a',
        value_name = "MODE",
        global = true,
        help_heading = "Listeners"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    unix_socket_mode: Option<SocketMode>,
    /// Client connections served at once [default: 1024].
    #[arg(
        long,
        short = 'c',
        value_name = "N",
        global = true,
        help_heading = "Listeners"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_connections: Option<usize>,
    /// HTTP address of /metrics, /healthz and /readyz [default: 127.0.0.1:9150].
    #[arg(long, value_name = "ADDR", global = true, help_heading = "Listeners")]
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<SocketAddr>,

    /// Cache memory budget, e.g. "64MiB" or "1GiB" [default: 64MiB].
    #[arg(long, value_name = "SIZE", global = true, help_heading = "Cache")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_byte_size")]
    memory_limit: Option<ByteSize>,
    /// Cache memory budget in MiB, as memcached's -m.
    #[arg(
        short = 'm',
        value_name = "MIB",
        conflicts_with = "memory_limit",
        global = true,
        help_heading = "Cache"
    )]
    #[serde(skip)]
    memory_mib: Option<u64>,
    /// Largest item accepted, key and value included, e.g. "100KiB"; at
    /// most 3.9 MiB (4 MiB less 64 KiB) [default: 1MiB].
    #[arg(long, value_name = "SIZE", global = true, help_heading = "Cache")]
    #[serde(skip_serializing_if = "Option::is_none", with = "opt_byte_size")]
    item_size_max: Option<ByteSize>,
    /// How long a cached copy is served before it is re-read from DynamoDB:
    /// the bound on seeing writes made through other sidecars; "0s" = never
    /// re-read [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, global = true, help_heading = "Cache")]
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option"
    )]
    max_local_age: Option<Duration>,
    /// Whether a copy older than max_local_age is served when DynamoDB fails
    /// to re-read it, rather than an error [default: true].
    #[arg(long, value_name = "BOOL", global = true, help_heading = "Cache")]
    #[serde(skip_serializing_if = "Option::is_none")]
    stale_on_error: Option<bool>,

    /// Log lines as human-readable text or JSON objects [default: text].
    /// The level comes from RUST_LOG (default: info).
    #[arg(
        long,
        value_name = "FORMAT",
        value_enum,
        global = true,
        help_heading = "Logging"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,

    #[command(flatten)]
    dynamodb: DynamoFlags,

    #[command(flatten)]
    fleet: FleetFlags,
}

/// Flags of the `[fleet]` section (docs/fleet.md).
#[derive(Debug, Args, Serialize)]
struct FleetFlags {
    /// The peer port, e.g. 0.0.0.0:11311; set = fleet mode on [default: off].
    #[arg(
        long = "fleet-listen",
        value_name = "ADDR",
        global = true,
        help_heading = "Fleet"
    )]
    #[serde(rename = "listen", skip_serializing_if = "Option::is_none")]
    fleet_listen: Option<SocketAddr>,
    /// The address peers dial, host:port [default: --fleet-listen; required when that is 0.0.0.0].
    #[arg(
        long = "fleet-advertise",
        value_name = "HOST:PORT",
        global = true,
        help_heading = "Fleet"
    )]
    #[serde(rename = "advertise", skip_serializing_if = "Option::is_none")]
    fleet_advertise: Option<String>,
    /// A lease's term: how long a write waits at most for a peer that stopped answering [default: 1s].
    #[arg(long = "fleet-lease", value_name = "DURATION", value_parser = humantime::parse_duration, global = true, help_heading = "Fleet")]
    #[serde(
        rename = "lease",
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option"
    )]
    fleet_lease: Option<Duration>,
    /// How often the membership is read from DynamoDB [default: 1s].
    #[arg(long = "fleet-membership-period", value_name = "DURATION", value_parser = humantime::parse_duration, global = true, help_heading = "Fleet")]
    #[serde(
        rename = "membership_period",
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option"
    )]
    fleet_membership_period: Option<Duration>,
    /// The secret every member shares (prefer DYNACACHE_FLEET_SECRET: flags show in `ps`).
    #[arg(
        long = "fleet-secret",
        value_name = "SECRET",
        global = true,
        help_heading = "Fleet"
    )]
    #[serde(rename = "secret", skip_serializing_if = "Option::is_none")]
    fleet_secret: Option<String>,
}

/// Flags of the `[dynamodb]` section.
#[derive(Debug, Args, Serialize)]
struct DynamoFlags {
    /// DynamoDB table [default: dynacache].
    #[arg(long, value_name = "NAME", global = true, help_heading = "DynamoDB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<String>,
    /// DynamoDB endpoint, e.g. http://127.0.0.1:8000 for DynamoDB Local.
    #[arg(long, value_name = "URL", global = true, help_heading = "DynamoDB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint_url: Option<String>,
    /// AWS region [default: from the AWS chain].
    #[arg(long, value_name = "REGION", global = true, help_heading = "DynamoDB")]
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<String>,
    /// Store values of at least compression_threshold zstd-compressed when
    /// that makes them smaller, or never ("off": for tables other programs
    /// read) [default: zstd].
    #[arg(
        long,
        value_name = "CODEC",
        value_enum,
        global = true,
        help_heading = "DynamoDB"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    compression: Option<dynacache::store::Compression>,
}

/// Flags of the `[table]` section: how `init-table` creates the table.
#[derive(Debug, Default, Args, Serialize)]
struct TableFlags {
    /// Pay per request, or provisioned capacity [default: on_demand].
    #[arg(long, value_name = "MODE", value_enum, help_heading = "Table")]
    #[serde(skip_serializing_if = "Option::is_none")]
    billing_mode: Option<TableBilling>,
    /// Read capacity units, when provisioned [default: 5].
    #[arg(long, value_name = "RCU", help_heading = "Table")]
    #[serde(skip_serializing_if = "Option::is_none")]
    read_capacity: Option<i64>,
    /// Write capacity units, when provisioned [default: 5].
    #[arg(long, value_name = "WCU", help_heading = "Table")]
    #[serde(skip_serializing_if = "Option::is_none")]
    write_capacity: Option<i64>,
}

/// `Option<ByteSize>` as the configuration writes sizes.
mod opt_byte_size {
    use bytesize::ByteSize;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(
        size: &Option<ByteSize>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match size {
            Some(size) => serializer.serialize_u64(size.as_u64()),
            None => serializer.serialize_none(),
        }
    }
}

/// memcached's -l names an interface (an IP); dynacache also takes IP:PORT.
#[derive(Debug, Clone, Copy)]
enum ListenAddr {
    Ip(IpAddr),
    Addr(SocketAddr),
}

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(ListenAddr::Addr(addr));
    }
    s.parse()
        .map(ListenAddr::Ip)
        .map_err(|_| "expected an IP address (127.0.0.1, ::1) or IP:PORT ([::1]:11211)".into())
}

impl Cli {
    /// Every layer (see `Config::load`); then memcached's -l, -p and -m,
    /// which change part of a key (the address's IP or port) or name it
    /// in other units.
    fn config(&self) -> Result<Config, dynacache::config::ConfigError> {
        let mut flags = Figment::from(Serialized::globals(&self.flags));
        if let Some(mib) = self.flags.memory_mib {
            flags = flags.merge(Serialized::global("memory_limit", mib << 20));
        }
        if let Some(Action::InitTable(table)) = &self.command {
            flags = flags.merge(Serialized::global("table", table));
        }
        let base = Config::load(self.config.as_deref(), flags)?;
        let mut listen = base.listen;
        match self.flags.listen {
            Some(ListenAddr::Addr(addr)) => listen = addr,
            Some(ListenAddr::Ip(ip)) => listen.set_ip(ip),
            None => {}
        }
        if let Some(port) = self.flags.port {
            listen.set_port(port);
        }
        if listen == base.listen {
            return Ok(base);
        }
        let config = Config { listen, ..base };
        config.validate()?;
        Ok(config)
    }
}

/// mimalloc rather than glibc's malloc: no per-allocation header and finer
/// size classes (a cached item's 48-byte key+value allocation takes 48 bytes,
/// not 64), and 13% less CPU per DynamoDB miss (BENCHMARKS.md, section 2).
/// Version 2 (feature `v2`): v3 kept partly used pages under eviction churn
/// (BENCHMARKS.md, section 3).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dynacache: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    init_logging(config.log_format);
    raise_open_file_limit();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Action::Serve) {
        Action::Serve => runtime.block_on(serve(config)),
        Action::InitTable(_) => runtime.block_on(init_table(config)),
    };
    // Don't wait for blocking tasks (e.g. the SDK's DNS lookups) at exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft open-file limit to the hard one, as memcached does: a
/// shell's soft limit (often 1024) would make accepts fail (EMFILE) before
/// `max_connections` is reached; validation already checked the hard one.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn init_table(config: Config) -> Result<(), String> {
    let store = DynamoStore::connect(config.dynamodb.clone()).await;
    match store.create_table(&config.table).await {
        Ok(true) => {
            tracing::info!(table = %config.dynamodb.table, "table created, TTL on {}", config.dynamodb.expiry_attribute)
        }
        Ok(false) => {
            tracing::info!(table = %config.dynamodb.table, "table already exists; nothing changed")
        }
        Err(e) => {
            return Err(format!(
                "cannot create table {}: {e}",
                config.dynamodb.table
            ));
        }
    }
    Ok(())
}

async fn serve(config: Config) -> Result<(), String> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config.to_toml().lines().filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; "),
        "starting"
    );
    if let Some(addr) = config.tcp_listen()
        && !addr.ip().is_loopback()
    {
        tracing::warn!(listen = %addr, "listening beyond loopback: any host that reaches this address can read and write the cache");
    }
    let recorder = dynacache::metrics::install()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let store = DynamoStore::connect(config.dynamodb.clone()).await;
    let running = server::start(&config, store, Some(recorder)).await?;
    tokio::spawn(wait_for_signal(running.shutdown_token()));
    if running.stopped().await {
        tracing::info!("stopped");
    } else {
        tracing::warn!(grace = ?config.shutdown_grace, "stopped with requests still in flight after the grace period");
    }
    Ok(())
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutting down: no new connections, finishing requests in flight"
    );
    shutdown.cancel();
}
