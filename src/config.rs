//! Configuration, in layers, each over the one before: the defaults below
//! (and in `config.example.toml`), a TOML file, `DYNACACHE_*` environment
//! variables, then command-line flags ([`Config::load`]). Every key can be
//! set in every layer the same way, so no key has its own override code.
//! Validation names the offending key; `main` exits with 64 (EX_USAGE) on
//! any error here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::{Figment, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::store::{CHUNKS_ATTRIBUTE, DynamoSettings, TableSettings, VALUE_MAX};

/// memcached's default largest item (`-I 1m`).
pub const ITEM_SIZE_MAX_DEFAULT: u64 = 1024 * 1024;

/// Most `cache_shards`: 8192 cores' worth at the automatic 8 per core, and
/// the shards' fixed cost (about 112 bytes each, allocated at start-up)
/// stays near 7 MiB; 100 million shards asked for 15 GB before serving.
pub const CACHE_SHARDS_MAX: usize = 65536;

/// Least share of `memory_limit` per cache shard. Each shard evicts by its
/// own LRU order and never caches an item larger than its share: below
/// 64 KiB (a few hundred small entries) eviction strays far from the
/// cache-wide LRU order, and every item above the share goes uncached.
pub const SHARD_SHARE_MIN: u64 = 64 * 1024;

/// Most `hot_keys`: each tracked key takes a 270-byte slot per direction,
/// and each new key seen scans them for the smallest count.
pub const HOT_KEYS_MAX: usize = 1024;

/// File descriptors kept beside client connections, within the process's
/// open-file limit: DynamoDB's HTTP connection pool, the listeners, the
/// metrics listener and its scrapes, and log or standard files.
pub const RESERVED_FILES: u64 = 64;

/// Most `request_timeout` and `write_timeout`: they bound how long a stalled
/// client holds its connection slot, which past a day is no bound at all
/// (and values near `Duration`'s range overflow the deadline arithmetic).
pub const CLIENT_TIMEOUT_MAX: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where memcached clients connect over TCP; port 0 turns TCP off (as
    /// memcached's `-p 0`), for a unix-socket-only sidecar.
    pub listen: SocketAddr,
    /// A unix domain socket memcached clients connect to, beside TCP.
    pub unix_socket: Option<PathBuf>,
    /// The socket file's permissions (octal); memcached's `-a` default.
    pub unix_socket_mode: SocketMode,
    /// Where Prometheus scrapes `/metrics`.
    pub metrics_listen: SocketAddr,
    /// Byte budget of the in-memory cache (keys, values and per-entry overhead).
    #[serde(with = "byte_size")]
    pub memory_limit: ByteSize,
    /// Largest item accepted (key + value + attribute overhead): memcached's
    /// 1 MiB by default; at most [`VALUE_MAX`], what one DynamoDB
    /// transaction writes (items over 400 KiB are split over several).
    #[serde(with = "byte_size")]
    pub item_size_max: ByteSize,
    /// Connections served at once; more are refused (`ERROR Too many open connections`).
    /// At most the hard open-file limit less [`RESERVED_FILES`].
    pub max_connections: usize,
    /// Cache shards; 0 picks 8 per core. At most [`CACHE_SHARDS_MAX`], and
    /// at most one per [`SHARD_SHARE_MIN`] of `memory_limit`.
    pub cache_shards: usize,
    /// How long shutdown waits for in-flight requests; 0 = not at all.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A cached entry older than this is re-read from DynamoDB before it is
    /// served: the bound on seeing writes made through other sidecars. 0 = never.
    #[serde(with = "humantime_serde")]
    pub max_local_age: Duration,
    /// If that re-read fails (DynamoDB down), serve the older copy rather than an error.
    pub stale_on_error: bool,
    /// Remember, for `max_local_age` at most, that a read found nothing
    /// (the key's next gets are misses without a DynamoDB read).
    pub negative_caching: bool,
    /// Whether `flush_all` is honoured (fleet-wide) or refused with an error.
    pub flush_enabled: bool,
    /// Close a connection idle this long; 0 = never (memcached's default).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A request must arrive whole within this of its first byte, or the
    /// connection is closed (a client trickling bytes cannot hold a slot).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A reply must be taken by the client within this, or the connection
    /// is closed (a client that never reads cannot hold a slot).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Reply memory all connections share beyond the first 64 KiB each: a
    /// connection whose replies need more waits for others' to drain.
    #[serde(with = "byte_size")]
    pub reply_memory_limit: ByteSize,
    /// Keys tracked as the most read and the most written, each (`stats
    /// hotkeys`, `/hotkeys`); 0 = none. At most [`HOT_KEYS_MAX`].
    pub hot_keys: usize,
    /// "text" (human-readable) or "json" logs.
    pub log_format: LogFormat,
    /// Memory for the keys of `local` prefixes, apart from `memory_limit`.
    #[serde(with = "byte_size")]
    pub local_memory_limit: ByteSize,
    pub dynamodb: DynamoSettings,
    /// Used by `dynacache init-table` only.
    pub table: TableSettings,
    /// Fleet mode (docs/fleet.md): off unless `fleet.listen` is set.
    pub fleet: FleetSettings,
    /// Policies by key prefix (`[[prefix]]` tables), first match wins; a
    /// key no rule matches is durable with no expiry cap.
    pub prefix: Vec<PrefixRule>,
}

/// One `[[prefix]]` table: what happens to the keys that begin with `prefix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixRule {
    /// The key's first bytes, as the client sends them (Django: the
    /// cache's KEY_PREFIX, then `:<version>:`).
    pub prefix: String,
    /// "durable" (DynamoDB, then memory: the default) or "local" (this
    /// sidecar's memory only, as memcached keeps it).
    #[serde(default)]
    pub policy: PrefixPolicy,
    /// A write asking for a later expiry, or none, gets this from now.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_ttl: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefixPolicy {
    #[default]
    Durable,
    Local,
}

/// The `[fleet]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSettings {
    /// The peer port; set = fleet mode on.
    pub listen: Option<SocketAddr>,
    /// The address peers dial (`host:port`); `listen` if unset.
    pub advertise: Option<String>,
    /// How long a peer's permission to serve from memory lasts: a write
    /// waits at most this long for a peer that stopped answering.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often every member reads the membership (one strongly
    /// consistent read of one item).
    #[serde(with = "humantime_serde")]
    pub membership_period: Duration,
    /// The secret peers prove they share (or `DYNACACHE_FLEET_SECRET`).
    /// Never printed.
    #[serde(skip_serializing)]
    pub secret: Option<String>,
}

impl Default for FleetSettings {
    fn default() -> Self {
        FleetSettings {
            listen: None,
            advertise: None,
            lease: Duration::from_secs(1),
            membership_period: Duration::from_secs(1),
            secret: None,
        }
    }
}

impl FleetSettings {
    /// The fleet's options, when fleet mode is on.
    pub fn options(&self) -> Option<crate::fleet::FleetOptions> {
        let listen = self.listen?;
        Some(crate::fleet::FleetOptions {
            listen,
            advertise: self.advertise.clone().unwrap_or_else(|| listen.to_string()),
            lease: self.lease,
            membership_period: self.membership_period,
            secret: self.secret.clone().unwrap_or_default(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:11211".parse().unwrap(),
            unix_socket: None,
            unix_socket_mode: SocketMode(0o700),
            metrics_listen: "127.0.0.1:9150".parse().unwrap(),
            memory_limit: ByteSize::mib(64),
            item_size_max: ByteSize::b(ITEM_SIZE_MAX_DEFAULT),
            max_connections: 1024,
            cache_shards: 0,
            shutdown_grace: Duration::from_secs(10),
            max_local_age: Duration::from_secs(2),
            stale_on_error: true,
            negative_caching: true,
            flush_enabled: true,
            idle_timeout: Duration::ZERO,
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            reply_memory_limit: ByteSize::mib(64),
            hot_keys: 32,
            log_format: LogFormat::Text,
            dynamodb: DynamoSettings::default(),
            prefix: Vec::new(),
            local_memory_limit: ByteSize::mib(64),
            table: TableSettings::default(),
            fleet: FleetSettings::default(),
        }
    }
}

/// Permission bits of the unix socket file, written in octal ("0700"):
/// connecting needs write permission on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl std::fmt::Display for SocketMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl std::str::FromStr for SocketMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SocketMode, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        match u32::from_str_radix(digits, 8) {
            Ok(mode) if !digits.is_empty() && mode <= 0o777 => Ok(SocketMode(mode)),
            _ => Err(format!(
                "{s:?} is not a file mode: octal permission bits like \"0700\" or \"0660\""
            )),
        }
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SocketMode, D::Error> {
        // A string, as TOML has no octal-looking integers that read naturally.
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A configuration error, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A value of the wrong type, or an unknown key, in the file, the
    /// environment or a flag (the message says which).
    #[error("{0}")]
    Layer(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The environment variables [`Config::load`] reads: `DYNACACHE_<KEY>` for a
/// top-level key, `DYNACACHE_<SECTION>__<KEY>` for one in a section (e.g.
/// `DYNACACHE_MAX_LOCAL_AGE=500ms`, `DYNACACHE_DYNAMODB__TABLE=sessions`).
/// Variables whose first part names no key (`DYNACACHE_CONFIG`, the file's
/// path) are not configuration and are left alone.
pub const ENV_PREFIX: &str = "DYNACACHE_";

impl Config {
    /// The configuration from every layer: defaults, then the TOML `file`
    /// (if any), then `DYNACACHE_*` variables, then `flags` (a provider of
    /// the keys given on the command line, e.g. [`Serialized::globals`]).
    /// Then validated.
    pub fn load(file: Option<&Path>, flags: impl figment::Provider) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // Checked here: figment would take a missing file for an empty one.
            std::fs::metadata(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        // Figment's message names the key and the layer it came from.
        let config: Config = figment
            .merge(environment())
            .merge(flags)
            .extract()
            .map_err(|e| ConfigError::Layer(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// A configuration file's text over the defaults, as [`Config::load`]
    /// reads it (not validated).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| e.to_string())
    }

    /// The effective configuration as TOML (it holds no secrets: credentials
    /// come from the AWS chain, never from this file).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }

    /// The TCP address to serve, unless TCP is off (port 0).
    pub fn tcp_listen(&self) -> Option<SocketAddr> {
        (self.listen.port() != 0).then_some(self.listen)
    }

    /// Checks what types alone cannot, including the bounds this machine
    /// sets (its open-file limit and physical memory).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_on(&Machine::this())
    }

    /// [`Config::validate`] against `machine`'s limits.
    fn validate_on(&self, machine: &Machine) -> Result<(), ConfigError> {
        let f = &self.fleet;
        if f.listen.is_some() {
            if f.secret.as_deref().is_none_or(|s| s.len() < 16) {
                return Err(invalid(
                    "fleet.secret",
                    "fleet mode needs a secret of at least 16 bytes (or DYNACACHE_FLEET_SECRET), the same on every member",
                ));
            }
            if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&f.lease) {
                return Err(invalid("fleet.lease", "must be between 100ms and 60s"));
            }
            if !(Duration::from_millis(100)..=Duration::from_secs(60))
                .contains(&f.membership_period)
            {
                return Err(invalid(
                    "fleet.membership_period",
                    "must be between 100ms and 60s",
                ));
            }
            match (&f.advertise, f.listen) {
                (Some(advertise), _) => {
                    let port = advertise.rsplit_once(':').map(|(host, port)| {
                        (!host.is_empty())
                            .then_some(())
                            .and(port.parse::<u16>().ok())
                    });
                    if !matches!(port, Some(Some(p)) if p != 0) {
                        return Err(invalid(
                            "fleet.advertise",
                            format!("{advertise:?} is not host:port"),
                        ));
                    }
                }
                // Peers would dial 0.0.0.0: their own host.
                (None, Some(listen)) if listen.ip().is_unspecified() => {
                    return Err(invalid(
                        "fleet.advertise",
                        format!(
                            "fleet.listen {listen} is every address of this host, which peers cannot dial: set the address they reach this host at (e.g. the pod IP and port)"
                        ),
                    ));
                }
                (None, _) => {}
            }
        }
        if self.tcp_listen().is_none() && self.unix_socket.is_none() {
            return Err(invalid(
                "listen",
                "port 0 turns TCP off, and no unix_socket is set: clients could not connect",
            ));
        }
        if let Some(path) = &self.unix_socket
            && (path.as_os_str().is_empty() || path.to_string_lossy().ends_with('/'))
        {
            return Err(invalid(
                "unix_socket",
                format!("{path:?} is not a socket file path"),
            ));
        }
        let d = &self.dynamodb;
        let table_ok = (3..=255).contains(&d.table.len())
            && d.table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if !table_ok {
            return Err(invalid(
                "dynamodb.table",
                format!(
                    "{:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)",
                    d.table
                ),
            ));
        }
        let attributes = [
            ("dynamodb.key_attribute", &d.key_attribute),
            ("dynamodb.value_attribute", &d.value_attribute),
            ("dynamodb.flags_attribute", &d.flags_attribute),
            ("dynamodb.expiry_attribute", &d.expiry_attribute),
            ("dynamodb.version_attribute", &d.version_attribute),
        ];
        for (i, (key, name)) in attributes.iter().enumerate() {
            if name.is_empty() || name.len() > 255 {
                return Err(invalid(key, "must be 1 to 255 bytes"));
            }
            if attributes[..i].iter().any(|(_, other)| other == name) {
                return Err(invalid(
                    key,
                    format!("{name:?} is already used by another attribute"),
                ));
            }
            if name.as_str() == CHUNKS_ATTRIBUTE {
                return Err(invalid(
                    key,
                    format!("{name:?} is the attribute dynacache counts a large value's chunks in"),
                ));
            }
        }
        if d.max_attempts == 0 {
            return Err(invalid("dynamodb.max_attempts", "must be at least 1"));
        }
        // One reply as large as the largest item must fit, or it would wait
        // for budget that can never be free.
        if self.reply_memory_limit.as_u64() < self.item_size_max.as_u64() {
            return Err(invalid(
                "reply_memory_limit",
                format!("must be at least item_size_max ({})", self.item_size_max),
            ));
        }
        if d.operation_timeout.is_zero() {
            return Err(invalid("dynamodb.operation_timeout", "must be above zero"));
        }
        if d.connect_timeout.is_zero() {
            return Err(invalid("dynamodb.connect_timeout", "must be above zero"));
        }
        if let Some(url) = &d.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(invalid(
                "dynamodb.endpoint_url",
                format!("{url:?} is not an http(s) URL"),
            ));
        }
        let memory = self.memory_limit.as_u64();
        if memory == 0 {
            return Err(invalid("memory_limit", "must be above zero"));
        }
        // The cache would be swapped or OOM-killed long before it filled.
        // A container's cgroup limit (memory.max) is usually lower still; it
        // is not read here, so keep memory_limit well below it: the process,
        // its connection buffers and the DynamoDB client need room too.
        if let Some(physical) = machine.physical_memory
            && memory > physical
        {
            return Err(invalid(
                "memory_limit",
                format!(
                    "{} is more than this machine's physical memory, {} (MemTotal in /proc/meminfo)",
                    self.memory_limit,
                    ByteSize::b(physical)
                ),
            ));
        }
        // 0 is automatic (8 per core); see CACHE_SHARDS_MAX and SHARD_SHARE_MIN.
        if self.cache_shards != 0 {
            if self.cache_shards > CACHE_SHARDS_MAX {
                return Err(invalid(
                    "cache_shards",
                    format!(
                        "{} is more than {CACHE_SHARDS_MAX}; 0 picks 8 per core",
                        self.cache_shards
                    ),
                ));
            }
            // The cache rounds the count up to a power of two; one shard is
            // always allowed, however small the budget.
            let most = max_shards(memory);
            if self.cache_shards > most {
                let rounded = self.cache_shards.next_power_of_two();
                let rounding = if rounded == self.cache_shards {
                    String::new()
                } else {
                    format!(" (rounded up to {rounded})")
                };
                return Err(invalid(
                    "cache_shards",
                    format!(
                        "{} shards{rounding} would leave each less than {} of memory_limit ({}): use at most {most}, or 0 for automatic",
                        self.cache_shards,
                        ByteSize::b(SHARD_SHARE_MIN),
                        self.memory_limit,
                    ),
                ));
            }
        }
        if !(1024..=VALUE_MAX as u64).contains(&self.item_size_max.as_u64()) {
            return Err(invalid(
                "item_size_max",
                format!(
                    "must be between 1 KiB and {VALUE_MAX} bytes (4 MiB less 64 KiB: what one DynamoDB transaction writes)"
                ),
            ));
        }
        if !(1..=19).contains(&d.compression_level) {
            return Err(invalid(
                "dynamodb.compression_level",
                "must be 1 (fastest) to 19 (smallest)",
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        for (i, rule) in self.prefix.iter().enumerate() {
            let which =
                |what: String| invalid("prefix", format!("[[prefix]] number {}: {what}", i + 1));
            if rule.prefix.is_empty() || rule.prefix.len() > 250 {
                return Err(which("prefix must be 1 to 250 bytes".into()));
            }
            if rule
                .prefix
                .as_bytes()
                .starts_with(crate::store::RESERVED_PREFIX)
            {
                return Err(which(format!(
                    "{:?} names dynacache's own keys, which no client can write",
                    rule.prefix
                )));
            }
            if rule.max_ttl.is_some_and(|t| t < Duration::from_secs(1)) {
                return Err(which("max_ttl must be at least 1s".into()));
            }
        }
        if self.prefix.iter().any(|r| r.policy == PrefixPolicy::Local) {
            let local = self.local_memory_limit.as_u64();
            if local == 0 {
                return Err(invalid("local_memory_limit", "must be above zero"));
            }
            if let Some(physical) = machine.physical_memory
                && local + memory > physical
            {
                return Err(invalid(
                    "local_memory_limit",
                    format!(
                        "with memory_limit, more than this machine's physical memory, {}",
                        ByteSize::b(physical)
                    ),
                ));
            }
        }
        if self.hot_keys > HOT_KEYS_MAX {
            return Err(invalid(
                "hot_keys",
                format!("must be at most {HOT_KEYS_MAX}; 0 turns it off"),
            ));
        }
        // Every connection is a file descriptor, and the process needs some
        // of its own (RESERVED_FILES). The hard limit is the most the
        // process could raise its soft limit to.
        if let Some(hard) = machine.open_files {
            let most = hard.saturating_sub(RESERVED_FILES);
            let wanted = self.max_connections as u64;
            if wanted > most {
                let fit = if most == 0 {
                    String::new()
                } else {
                    format!("use at most {most}, or ")
                };
                return Err(invalid(
                    "max_connections",
                    format!(
                        "{wanted} connections and {RESERVED_FILES} files for DynamoDB, the listeners and logs need {} open files, but this process may open at most {hard} (its hard RLIMIT_NOFILE): {fit}raise that limit (`ulimit -n` in the shell that starts dynacache, LimitNOFILE= in its systemd unit, `--ulimit nofile=` for docker)",
                        wanted.saturating_add(RESERVED_FILES)
                    ),
                ));
            }
        }
        // Zero would close every request that does not arrive in one read,
        // and every reply the socket cannot take at once.
        for (key, timeout) in [
            ("request_timeout", self.request_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if timeout.is_zero() || timeout > CLIENT_TIMEOUT_MAX {
                return Err(invalid(key, "must be above zero and at most 1 day"));
            }
        }
        // shutdown_grace may be zero: stop at once. Requests in flight are
        // cut off, and their clients see the connection close, never an
        // acknowledgement, so no acknowledged write is lost. idle_timeout
        // and max_local_age take zero for "never".
        if self.table.read_capacity < 1 || self.table.write_capacity < 1 {
            return Err(invalid(
                "table.read_capacity",
                "capacities must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The most shards `memory` can give a useful share each (at least one).
impl Config {
    /// The cache's shard count: `cache_shards`, or when 0, 8 per core but
    /// no more than leave each [`SHARD_SHARE_MIN`] of `memory_limit`.
    pub fn shards(&self) -> usize {
        match self.cache_shards {
            0 => crate::cache::ItemCache::default_shards()
                .min(max_shards(self.memory_limit.as_u64())),
            n => n,
        }
    }
}

fn max_shards(memory: u64) -> usize {
    let fit = (memory / SHARD_SHARE_MIN).clamp(1, CACHE_SHARDS_MAX as u64);
    // The largest power of two within `fit`: any count up to it rounds up
    // to at most it.
    1 << fit.ilog2()
}

/// The limits of the machine that validation checks against; `None` where
/// one cannot be read (that check is then skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Machine {
    /// The process's hard RLIMIT_NOFILE (`None`: unlimited or unknown).
    open_files: Option<u64>,
    /// Physical memory in bytes, MemTotal of /proc/meminfo.
    physical_memory: Option<u64>,
}

impl Machine {
    fn this() -> Machine {
        use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
        let open_files = getrlimit(Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(_soft, hard)| hard)
            .filter(|&hard| hard != RLIM_INFINITY);
        let physical_memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_total(&text));
        Machine {
            open_files,
            physical_memory,
        }
    }
}

/// MemTotal, in bytes, from the text of /proc/meminfo.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut words = line.split_whitespace();
    let number: u64 = words.next()?.parse().ok()?;
    // The kernel writes "kB" and means KiB.
    match words.next() {
        Some("kB") => number.checked_mul(1024),
        _ => None,
    }
}

/// The `DYNACACHE_*` layer: variables that name a configuration key.
fn environment() -> Env {
    let keys: Vec<String> = match Serialized::defaults(Config::default()).data() {
        Ok(mut profiles) => profiles
            .remove(&figment::Profile::Default)
            .map(|dict| dict.into_keys().collect())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    Env::prefixed(ENV_PREFIX)
        // The one variable named without the section separator, as the
        // README documents it.
        .map(|key| {
            if key.as_str().eq_ignore_ascii_case("fleet_secret") {
                "fleet__secret".into()
            } else {
                key.into()
            }
        })
        .split("__")
        .filter(move |key| {
            let first = key.as_str().split('.').next().unwrap_or_default();
            keys.iter().any(|k| k.eq_ignore_ascii_case(first))
        })
}

/// Byte sizes written as people write them ("64 MiB"), or as a number of
/// bytes when no unit divides them: exact both ways, unlike ByteSize's own
/// text ("95.4 MiB"), so `--check-config` prints what is in effect.
mod byte_size {
    use bytesize::ByteSize;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(size: &ByteSize, serializer: S) -> Result<S::Ok, S::Error> {
        let bytes = size.as_u64();
        for (unit, name) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
            if bytes != 0 && bytes.is_multiple_of(unit) {
                return serializer.collect_str(&format_args!("{} {name}", bytes / unit));
            }
        }
        serializer.serialize_u64(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        ByteSize::deserialize(deserializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config, Config::default());
        config.validate().unwrap();
        assert_eq!(config.dynamodb.table, "dynacache");
        assert!(config.dynamodb.consistent_reads);
    }

    #[test]
    fn units_and_durations() {
        let config = Config::from_toml(
            "memory_limit = \"256 MiB\"\nshutdown_grace = \"1500ms\"\n[dynamodb]\noperation_timeout = \"2s\"\nkey_type = \"B\"\n",
        )
        .unwrap();
        assert_eq!(config.memory_limit, ByteSize::mib(256));
        assert_eq!(config.shutdown_grace, Duration::from_millis(1500));
        assert_eq!(config.dynamodb.operation_timeout, Duration::from_secs(2));
    }

    #[test]
    fn unknown_and_mistyped_keys_are_named() {
        let err = Config::from_toml("[dynamodb]\ntabel = \"x\"\n").unwrap_err();
        assert!(err.contains("tabel"), "{err}");
        let err = Config::from_toml("max_connections = \"many\"\n").unwrap_err();
        assert!(err.contains("max_connections"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let mut config = Config::default();
        config.dynamodb.table = "ab".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("dynamodb.table")
        );
        let mut config = Config::default();
        config.dynamodb.flags_attribute = "value".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("dynamodb.flags_attribute")
        );
        let config = Config {
            item_size_max: ByteSize::mib(4),
            ..Config::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("item_size_max")
        );
    }

    /// A machine with 20000 open files and 16 GiB.
    const MACHINE: Machine = Machine {
        open_files: Some(20_000),
        physical_memory: Some(16 << 30),
    };

    /// The error `config` gets on `machine`, which must name `key`.
    fn refused(config: &Config, machine: &Machine, key: &str) -> String {
        let err = config
            .validate_on(machine)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(&format!("`{key}`")), "names {key}: {err}");
        err
    }

    #[test]
    fn the_defaults_are_valid_here_and_on_a_usual_machine() {
        Config::default().validate().unwrap();
        Config::default().validate_on(&MACHINE).unwrap();
        // Linux's own default hard limit is 4096; systemd's is 524288.
        let usual = Machine {
            open_files: Some(4096),
            physical_memory: Some(1 << 30),
        };
        Config::default().validate_on(&usual).unwrap();
    }

    #[test]
    fn cache_shards_at_most_65536() {
        let big = Machine {
            physical_memory: Some(1 << 40),
            ..MACHINE
        };
        let with = |cache_shards, memory_limit| Config {
            cache_shards,
            memory_limit,
            ..Config::default()
        };
        for shards in [0, 1, 7, 65536] {
            with(shards, ByteSize::gib(4)).validate_on(&big).unwrap();
        }
        for shards in [65537, 100_000_000, usize::MAX] {
            let err = refused(&with(shards, ByteSize::gib(64)), &big, "cache_shards");
            assert!(err.contains("65536"), "{err}");
        }
        let err = refused(
            &with(100_000_000, ByteSize::mib(64)),
            &MACHINE,
            "cache_shards",
        );
        assert!(err.contains("0 picks 8 per core"), "{err}");
    }

    #[test]
    fn cache_shards_leave_each_64_kib_of_memory_limit() {
        let with = |cache_shards, memory_limit| Config {
            cache_shards,
            memory_limit,
            ..Config::default()
        };
        // 64 MiB: 1024 shards of 64 KiB; 1025 rounds up to 2048 of 32 KiB.
        with(1024, ByteSize::mib(64)).validate_on(&MACHINE).unwrap();
        with(1000, ByteSize::mib(64)).validate_on(&MACHINE).unwrap();
        let err = refused(&with(1025, ByteSize::mib(64)), &MACHINE, "cache_shards");
        assert!(err.contains("rounded up to 2048"), "{err}");
        assert!(err.contains("at most 1024"), "{err}");
        // Not a power of two of 64 KiB: the largest power of two that fits.
        with(8, ByteSize::kib(600)).validate_on(&MACHINE).unwrap();
        refused(&with(9, ByteSize::kib(600)), &MACHINE, "cache_shards");
        // One shard however small the budget; automatic is not checked.
        with(1, ByteSize::kib(1)).validate_on(&MACHINE).unwrap();
        with(0, ByteSize::kib(1)).validate_on(&MACHINE).unwrap();
        refused(&with(2, ByteSize::kib(100)), &MACHINE, "cache_shards");
        assert_eq!(max_shards(1), 1);
        assert_eq!(max_shards(u64::MAX), CACHE_SHARDS_MAX);
    }

    #[test]
    fn max_connections_within_the_open_file_limit() {
        let with = |max_connections| Config {
            max_connections,
            ..Config::default()
        };
        refused(&with(0), &MACHINE, "max_connections");
        with(1).validate_on(&MACHINE).unwrap();
        with(20_000 - 64).validate_on(&MACHINE).unwrap();
        let err = refused(&with(20_000 - 63), &MACHINE, "max_connections");
        assert!(err.contains("at most 19936"), "{err}");
        assert!(err.contains("RLIMIT_NOFILE"), "{err}");
        let err = refused(&with(99_999_999_999), &MACHINE, "max_connections");
        assert!(err.contains("100000000063 open files"), "{err}");
        refused(&with(usize::MAX), &MACHINE, "max_connections");
        // This process's own limit (always finite on Linux).
        let err = with(99_999_999_999).validate().unwrap_err().to_string();
        assert!(err.contains("`max_connections`"), "{err}");
        // A limit that cannot be read is not checked.
        let unknown = Machine {
            open_files: None,
            ..MACHINE
        };
        with(99_999_999_999).validate_on(&unknown).unwrap();
    }

    #[test]
    fn a_low_open_file_limit_says_how_to_raise_it() {
        let low = Machine {
            open_files: Some(1024),
            ..MACHINE
        };
        let err = refused(&Config::default(), &low, "max_connections");
        for hint in ["at most 960", "ulimit -n", "LimitNOFILE=", "nofile"] {
            assert!(err.contains(hint), "{hint}: {err}");
        }
        let tiny = Machine {
            open_files: Some(64),
            ..MACHINE
        };
        let err = refused(&Config::default(), &tiny, "max_connections");
        assert!(!err.contains("at most 0"), "{err}");
        assert!(err.contains("ulimit -n"), "{err}");
    }

    #[test]
    fn memory_limit_above_zero_and_within_physical_memory() {
        let with = |memory_limit| Config {
            memory_limit,
            ..Config::default()
        };
        refused(&with(ByteSize::b(0)), &MACHINE, "memory_limit");
        with(ByteSize::b(1)).validate_on(&MACHINE).unwrap();
        with(ByteSize::gib(16)).validate_on(&MACHINE).unwrap();
        let err = refused(
            &with(ByteSize::gib(16) + ByteSize::b(1)),
            &MACHINE,
            "memory_limit",
        );
        assert!(err.contains("physical memory, 16.0 GiB"), "{err}");
        let pib: ByteSize = "97.7 PiB".parse().unwrap();
        refused(&with(pib), &MACHINE, "memory_limit");
        // This machine's own memory, if /proc/meminfo can be read.
        if Machine::this().physical_memory.is_some() {
            let err = with(pib).validate().unwrap_err().to_string();
            assert!(err.contains("`memory_limit`"), "{err}");
        }
        // Unknown physical memory: not checked.
        let unknown = Machine {
            physical_memory: None,
            ..MACHINE
        };
        with(pib).validate_on(&unknown).unwrap();
    }

    #[test]
    fn mem_total_reads_proc_meminfo() {
        let text = "MemTotal:       24684092 kB\nMemFree:         1234 kB\n";
        assert_eq!(mem_total(text), Some(24_684_092 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots kB\n"), None);
        assert_eq!(mem_total("MemTotal: 12 pages\n"), None);
    }

    #[test]
    fn client_timeouts_above_zero_and_at_most_a_day() {
        for key in ["request_timeout", "write_timeout"] {
            let with = |timeout| {
                let mut config = Config::default();
                match key {
                    "request_timeout" => config.request_timeout = timeout,
                    _ => config.write_timeout = timeout,
                }
                config
            };
            refused(&with(Duration::ZERO), &MACHINE, key);
            refused(
                &with(CLIENT_TIMEOUT_MAX + Duration::from_nanos(1)),
                &MACHINE,
                key,
            );
            refused(&with(Duration::MAX), &MACHINE, key);
            with(Duration::from_millis(1))
                .validate_on(&MACHINE)
                .unwrap();
            with(CLIENT_TIMEOUT_MAX).validate_on(&MACHINE).unwrap();
        }
    }

    #[test]
    fn zero_means_never_or_at_once_where_documented() {
        let config = Config::from_toml(
            "shutdown_grace = \"0s\"\nidle_timeout = \"0s\"\nmax_local_age = \"0s\"\n",
        )
        .unwrap();
        config.validate_on(&MACHINE).unwrap();
    }

    #[test]
    fn unix_socket_mode_is_octal() {
        let config = Config::from_toml(
            "unix_socket = \"/run/dynacache/sock\"\nunix_socket_mode = \"0660\"\n",
        )
        .unwrap();
        assert_eq!(config.unix_socket_mode, SocketMode(0o660));
        assert_eq!(Config::default().unix_socket_mode.to_string(), "0700");
        assert!(config.to_toml().contains("unix_socket_mode = \"0660\""));
        for bad in ["\"0800\"", "\"rw\"", "\"\"", "\"01777\"", "660"] {
            let err = Config::from_toml(&format!("unix_socket_mode = {bad}\n")).unwrap_err();
            assert!(err.contains("unix_socket_mode"), "{bad}: {err}");
        }
    }

    #[test]
    fn some_listener_is_required() {
        let config = Config::from_toml("listen = \"127.0.0.1:0\"\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("`listen`"), "{err}");
        let config =
            Config::from_toml("listen = \"127.0.0.1:0\"\nunix_socket = \"/tmp/d.sock\"\n").unwrap();
        config.validate().unwrap();
        assert_eq!(config.tcp_listen(), None);
    }

    #[test]
    fn example_file_parses_to_the_defaults() {
        let text = include_str!("../config.example.toml");
        let config = Config::from_toml(text).expect("config.example.toml parses");
        config.validate().unwrap();
        assert_eq!(
            config,
            Config::default(),
            "config.example.toml documents the defaults"
        );
    }
}
