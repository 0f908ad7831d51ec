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

use crate::store::{DynamoSettings, TableSettings};

/// DynamoDB's item size limit: key, value and attribute names included.
pub const DYNAMODB_ITEM_MAX: u64 = 400 * 1024;

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
    /// Largest item accepted (key + value + attribute overhead); at most DynamoDB's 400 KiB.
    #[serde(with = "byte_size")]
    pub item_size_max: ByteSize,
    /// Connections served at once; more are refused (`ERROR Too many open connections`).
    pub max_connections: usize,
    /// Cache shards; 0 picks 8 per core.
    pub cache_shards: usize,
    /// How long shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A cached entry older than this is re-read from DynamoDB before it is
    /// served: the bound on seeing writes made through other sidecars. 0 = never.
    #[serde(with = "humantime_serde")]
    pub max_local_age: Duration,
    /// If that re-read fails (DynamoDB down), serve the older copy rather than an error.
    pub stale_on_error: bool,
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
    /// "text" (human-readable) or "json" logs.
    pub log_format: LogFormat,
    pub dynamodb: DynamoSettings,
    /// Used by `dynacache init-table` only.
    pub table: TableSettings,
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
            item_size_max: ByteSize::b(DYNAMODB_ITEM_MAX),
            max_connections: 1024,
            cache_shards: 0,
            shutdown_grace: Duration::from_secs(10),
            max_local_age: Duration::from_secs(2),
            stale_on_error: true,
            flush_enabled: true,
            idle_timeout: Duration::ZERO,
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            log_format: LogFormat::Text,
            dynamodb: DynamoSettings::default(),
            table: TableSettings::default(),
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

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        }
        if d.max_attempts == 0 {
            return Err(invalid("dynamodb.max_attempts", "must be at least 1"));
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
        if self.memory_limit.as_u64() == 0 {
            return Err(invalid("memory_limit", "must be above zero"));
        }
        if !(1024..=DYNAMODB_ITEM_MAX).contains(&self.item_size_max.as_u64()) {
            return Err(invalid(
                "item_size_max",
                format!(
                    "must be between 1 KiB and DynamoDB's item limit, {DYNAMODB_ITEM_MAX} bytes"
                ),
            ));
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.table.read_capacity < 1 || self.table.write_capacity < 1 {
            return Err(invalid(
                "table.read_capacity",
                "capacities must be at least 1",
            ));
        }
        Ok(())
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
    Env::prefixed(ENV_PREFIX).split("__").filter(move |key| {
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
            item_size_max: ByteSize::mib(1),
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
