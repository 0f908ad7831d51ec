//! What operators look at (examples/monitoring): the Prometheus rules, their
//! promtool unit tests, and the Grafana dashboard, checked with Debian's
//! promtool and against a real Prometheus scraping real dynacache binaries.
//!
//! promtool and prometheus must be on PATH (scripts/test.sh installs
//! Debian's `prometheus` package); without them these tests fail, they do
//! not skip. Every process a test starts is killed when the test ends,
//! passed or failed; everything listens on 127.0.0.1; every wait polls for
//! its condition within [`WAIT`].

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy};
use common::{DynamoLocal, McClient, WAIT, free_port};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dynacache");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SECRET: &str = "the monitoring test's fleet secret";

fn monitoring(file: &str) -> PathBuf {
    Path::new(ROOT).join("examples/monitoring").join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// --- Processes --------------------------------------------------------------

/// `name` on PATH, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not on PATH: install Debian's prometheus package \
                 (apt-get install prometheus; scripts/test.sh does)"
            )
        })
}

/// A child process, killed (SIGKILL) and reaped on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its exit, which must come within [`WAIT`].
fn run(mut cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    let mut child = Killed(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}")),
    );
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.0.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.0.stderr.take().unwrap()));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{what} ran past {WAIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// `promtool args...`, which must succeed.
fn promtool(args: &[&str]) -> String {
    let mut cmd = Command::new(tool("promtool"));
    cmd.args(args);
    let out = run(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

// --- Reading the rules, their tests and the dashboard ---------------------

/// The rules file's recording and alerting rules, by name: each with its
/// expression (for alerts, also whether it has `for:`). Read by lines: the
/// file is ours and keeps one layout (`- record:`/`- alert:` then `expr:`,
/// on one line or as a `|` block).
#[derive(Default, Debug)]
struct Rules {
    recorded: BTreeMap<String, String>,
    alerts: BTreeMap<String, String>,
}

fn rules() -> Rules {
    let text = read(&monitoring("dynacache.rules.yml"));
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Rules::default();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        let (record, name) = if let Some(name) = line.strip_prefix("- record: ") {
            (true, name.trim())
        } else if let Some(name) = line.strip_prefix("- alert: ") {
            (false, name.trim())
        } else {
            i += 1;
            continue;
        };
        let expr_at = (i + 1..lines.len())
            .find(|&j| lines[j].trim_start().starts_with("expr:"))
            .unwrap_or_else(|| panic!("{name} has no expr"));
        let first = lines[expr_at].trim_start()["expr:".len()..].trim();
        let expr = if first == "|" {
            let indent = |l: &str| l.len() - l.trim_start().len();
            let base = indent(lines[expr_at]);
            lines[expr_at + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || indent(l) > base)
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            first.to_string()
        };
        let map = if record {
            &mut rules.recorded
        } else {
            &mut rules.alerts
        };
        assert!(map.insert(name.to_string(), expr).is_none(), "{name} twice");
        i = expr_at + 1;
    }
    rules
}

/// Every dynacache metric name the source exports (its string literals),
/// and the process metrics the `metrics-process` collector exports (the
/// live test checks that Prometheus has every one the dashboard names).
fn exported_in_source() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = [
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_threads",
    ]
    .map(String::from)
    .into();
    let mut dirs = vec![Path::new(ROOT).join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = read(&path);
                for (at, _) in text.match_indices("\"dynacache_") {
                    let rest = &text[at + 1..];
                    let end = rest
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap();
                    if rest[end..].starts_with('"') {
                        names.insert(rest[..end].to_string());
                    }
                }
            }
        }
    }
    names
}

/// The metric names a PromQL expression selects: identifiers outside
/// strings, label matchers, ranges and grouping clauses that are neither
/// keywords, aggregations nor functions (followed by `(`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let s: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Skips from an opening delimiter at `i` past its closing one, minding quotes.
    let skip = |mut i: usize, close: char| -> usize {
        let mut quote = None;
        i += 1;
        while i < s.len() {
            match (quote, s[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), c) if c == q => quote = None,
                (None, '"' | '\'' | '`') => quote = Some(s[i]),
                (None, c) if c == close => return i + 1,
                _ => {}
            }
            i += 1;
        }
        panic!("unbalanced {close} in {expr}")
    };
    let next_char = |mut i: usize| -> Option<char> {
        while i < s.len() && s[i].is_whitespace() {
            i += 1;
        }
        s.get(i).copied()
    };
    while i < s.len() {
        let c = s[i];
        if c == '"' || c == '\'' || c == '`' {
            let mut j = i + 1;
            while s[j] != c {
                j += if s[j] == '\\' { 2 } else { 1 };
            }
            i = j + 1;
        } else if c == '{' {
            i = skip(i, '}');
        } else if c == '[' {
            i = skip(i, ']');
        } else if c.is_ascii_digit() || c == '.' {
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.' || s[i] == '_') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            if GROUPING.contains(&word.as_str()) {
                if next_char(i) == Some('(') {
                    while s[i] != '(' {
                        i += 1;
                    }
                    i = skip(i, ')');
                }
            } else if !KEYWORDS.contains(&word.as_str()) && next_char(i) != Some('(') {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// What a name in an expression stands for, if it is a dynacache metric,
/// a recording rule, or Prometheus's own (`up`, `ALERTS`): the name a
/// scrape or Prometheus must have (a histogram's `_bucket`, not its base).
fn must_exist(name: &str, rules: &Rules, exported: &BTreeSet<String>) -> Result<(), String> {
    if rules.recorded.contains_key(name) || name == "up" || name == "ALERTS" {
        return Ok(());
    }
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|base| exported.contains(*base))
        .unwrap_or(name);
    if exported.contains(base) {
        Ok(())
    } else {
        Err(format!(
            "{name} is neither a metric dynacache exports nor a recording rule"
        ))
    }
}

/// The dashboard's panels with their queries, Grafana's variables replaced
/// by what the tests stand in for them: (panel title, refId, expr).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: a target without expr"));
            out.push((
                title.clone(),
                target["refId"].as_str().unwrap().to_string(),
                grafana_to_promql(expr),
            ));
        }
    }
    out
}

fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$job", ".+")
        .replace("$instance", ".+")
}

/// GitHub's anchor of a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn readme_anchors() -> BTreeSet<String> {
    read(&monitoring("README.md"))
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

// --- promtool -----------------------------------------------------------

#[test]
fn rules_pass_promtool_check_and_unit_tests() {
    let rules_file = monitoring("dynacache.rules.yml");
    let checked = promtool(&["check", "rules", rules_file.to_str().unwrap()]);
    let rules = rules();
    let count = rules.recorded.len() + rules.alerts.len();
    assert!(
        checked.contains(&format!("SUCCESS: {count} rules found")),
        "promtool and this test read the same rules: {checked}"
    );
    // Run from the directory, as the README does: rule_files is relative.
    let mut cmd = Command::new(tool("promtool"));
    cmd.current_dir(monitoring(""))
        .args(["test", "rules", "dynacache.rules.test.yml"]);
    let out = run(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("SUCCESS"),
        "promtool test rules:\n{text}"
    );

    // Every alert is shown firing on a failure and quiet on health: the
    // test file names it in an alert_rule_test with alerts expected
    // (`alertname: X` on its own line, exp_alerts below) and in one
    // without (`{..., alertname: X, exp_alerts: []}`).
    let tests = read(&monitoring("dynacache.rules.test.yml"));
    for alert in rules.alerts.keys() {
        let mentions: Vec<&str> = tests
            .lines()
            .filter(|l| l.contains(&format!("alertname: {alert}")))
            .collect();
        assert!(
            mentions
                .iter()
                .any(|l| l.trim() == format!("alertname: {alert}")),
            "no promtool test shows {alert} firing"
        );
        assert!(
            mentions.iter().any(|l| l.contains("exp_alerts: []")),
            "no promtool test shows {alert} quiet"
        );
    }
}

#[test]
fn rules_and_dashboard_name_only_metrics_dynacache_exports() {
    let rules = rules();
    let exported = exported_in_source();
    assert!(
        exported.contains("dynacache_cache_hits_total")
            && exported.contains("dynacache_fleet_coherent"),
        "the source's metric names were found: {exported:?}"
    );
    let mut unknown = Vec::new();
    for (name, expr) in rules.recorded.iter().chain(&rules.alerts) {
        for metric in metric_names(expr) {
            if let Err(e) = must_exist(&metric, &rules, &exported) {
                unknown.push(format!("rule {name}: {e}"));
            }
        }
    }

    let dashboard: Value =
        serde_json::from_str(&read(&monitoring("dynacache.dashboard.json"))).unwrap();
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap() >= 36,
        "a recent schema"
    );
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["job", "instance"] {
        let v = var(name);
        let query = v["definition"].as_str().unwrap();
        let metric = query
            .strip_prefix("label_values(")
            .and_then(|q| q.split([',', '{']).next())
            .unwrap_or_else(|| panic!("${name}: {query}"));
        if let Err(e) = must_exist(metric, &rules, &exported) {
            unknown.push(format!("variable {name}: {e}"));
        }
    }

    // Panels: unique ids, on the grid without overlapping, each query on
    // the templated data source and filtered by $instance.
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeMap::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "{title}: id twice"
        );
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{title}: wider than the grid");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title) {
                    panic!("{title} overlaps {other}");
                }
            }
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"].as_str().unwrap();
            assert!(
                expr.contains("instance=~\"$instance\""),
                "{title}: {expr} ignores $instance"
            );
        }
    }

    // Every query parses as PromQL: promtool checks them as recording rules.
    let queries = dashboard_queries(&dashboard);
    let dir = tempfile::tempdir().unwrap();
    let mut file = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, ref_id, expr)) in queries.iter().enumerate() {
        file.push_str(&format!(
            "      # {title} {ref_id}\n      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
        for metric in metric_names(expr) {
            if let Err(e) = must_exist(&metric, &rules, &exported) {
                unknown.push(format!("panel {title:?} {ref_id}: {e}"));
            }
        }
    }
    let path = dir.path().join("dashboard.rules.yml");
    std::fs::write(&path, &file).unwrap();
    let checked = promtool(&["check", "rules", path.to_str().unwrap()]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}\n{file}"
    );
    assert!(unknown.is_empty(), "{}", unknown.join("\n"));
}

#[test]
fn the_name_reader_finds_metrics_and_nothing_else() {
    let names = metric_names(
        r#"sum without (instance, operation) (rate(dynacache_x_total{a="}1",b=~"c|d"}[5m]))
           / on (job) group_left (le) histogram_quantile(0.99, rate(dynacache_y_bucket[1m] offset 5m))
           > 1/60 and ignoring(q) instance:dynacache_z:rate5m * 1e-3 or vector(0) unless up"#,
    );
    let expected: BTreeSet<String> = [
        "dynacache_x_total",
        "dynacache_y_bucket",
        "instance:dynacache_z:rate5m",
        "up",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(names, expected);
}

// --- A real Prometheus scraping real sidecars -------------------------------

/// One dynacache binary in fleet mode on `table`, its DynamoDB at `endpoint`.
struct Sidecar {
    _child: Killed,
    port: u16,
    metrics: u16,
    log: PathBuf,
}

impl Sidecar {
    fn start(endpoint: &str, table: &str, extra: &[&str], dir: &Path) -> Sidecar {
        let (port, metrics, peer) = (free_port(), free_port(), free_port());
        let log = dir.join(format!("dynacache-{port}.log"));
        let peer_addr = format!("127.0.0.1:{peer}");
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
            "--table",
            table,
            "--endpoint-url",
            endpoint,
            // Fleet mode keeps the copies coherent: none is re-read by age,
            // so the traffic's hits and misses are what it asks for.
            "--max-local-age",
            "1h",
            "--fleet-listen",
            &peer_addr,
            "--fleet-advertise",
            &peer_addr,
            "--item-size-max",
            "1MiB",
        ])
        .args(extra)
        .env("DYNACACHE_FLEET_SECRET", SECRET)
        // Throttled calls back off for up to 3 s in all: let them finish
        // as throttled, not as timed out.
        .env("DYNACACHE_DYNAMODB__OPERATION_TIMEOUT", "10s")
        .env("AWS_ACCESS_KEY_ID", common::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", "us-east-1")
        .env_remove("DYNACACHE_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
        Sidecar {
            _child: Killed(cmd.spawn().unwrap()),
            port,
            metrics,
            log,
        }
    }

    fn target(&self) -> String {
        format!("127.0.0.1:{}", self.metrics)
    }

    async fn client(&self) -> McClient {
        McClient::connect(format!("127.0.0.1:{}", self.port).parse().unwrap()).await
    }

    /// A sample of its /metrics (0 if the series is not there yet).
    async fn metric(&self, series: &str) -> f64 {
        let (status, body) = http_get(self.metrics, "/metrics")
            .await
            .unwrap_or_else(|| panic!("{} does not serve /metrics", self.target()));
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.parse().unwrap())
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        while http_get(self.metrics, "/readyz").await.map(|r| r.0) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "dynacache never got ready:\n{}",
                read(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_coherent(&self) {
        let deadline = Instant::now() + WAIT;
        while self.metric("dynacache_fleet_coherent").await != 1.0 {
            assert!(
                Instant::now() < deadline,
                "never coherent:\n{}",
                read(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// An HTTP/1.0 GET on 127.0.0.1:`port`: status and body, or None if
/// nothing answers (bounded by [`WAIT`]).
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = Vec::new();
        s.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8(response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    };
    tokio::time::timeout(WAIT, exchange).await.ok().flatten()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus of the test's own: its config, its data directory, its port.
struct Prometheus {
    _child: Killed,
    port: u16,
    log: PathBuf,
}

impl Prometheus {
    /// Scrapes `targets` (job "dynacache") and evaluates the rules every second.
    async fn start(targets: &[String], dir: &Path) -> Prometheus {
        let port = free_port();
        let config = dir.join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - '{}'\n\
                 scrape_configs:\n  - job_name: dynacache\n    static_configs:\n      - targets: [{}]\n",
                monitoring("dynacache.rules.yml").display(),
                targets.join(", ")
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let prometheus = Prometheus {
            _child: Killed(child),
            port,
            log,
        };
        let deadline = Instant::now() + WAIT;
        while http_get(port, "/-/ready").await.map(|r| r.0) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "Prometheus never got ready:\n{}",
                read(&prometheus.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        prometheus
    }

    /// `/api/v1/<path>`'s data, which must be a success.
    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.port, &format!("/api/v1/{path}"))
            .await
            .expect("Prometheus answers");
        let json: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(
            status == 200 && json["status"] == "success",
            "{path}: {status} {body}"
        );
        json["data"].clone()
    }

    /// An instant query's samples: labels and value.
    async fn query(&self, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let data = self.api(&format!("query?query={}", url_encode(expr))).await;
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                let value = s["value"][1].as_str().unwrap().parse().unwrap();
                (labels, value)
            })
            .collect()
    }

    /// The one sample of `expr`, once there is exactly one.
    async fn one(&self, expr: &str) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let samples = self.query(expr).await;
            if let [(_, value)] = samples.as_slice() {
                return *value;
            }
            assert!(
                Instant::now() < deadline,
                "{expr}: {samples:?}\n{}",
                read(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `expr` has exactly the value `value`.
    async fn wait_for(&self, expr: &str, value: f64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let samples = self.query(expr).await;
            if samples.iter().any(|(_, v)| *v == value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{expr} never became {value}: {samples:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_dynacache_and_the_rules_agree_with_the_traffic() {
    let rules = rules();
    let dir = tempfile::tempdir().unwrap();
    let db = DynamoLocal::shared().await;
    let table = db.new_table().await.table;
    // Sidecar a reaches DynamoDB through a fault proxy (to be throttled) and
    // serves 4 connections at most (to refuse one); b reaches it directly.
    let proxy = FaultProxy::start(&db.endpoint).await;
    // a keeps `page:` keys in its memory only (a local prefix), so the
    // dashboard's local-key panels have something to draw.
    let config = dir.path().join("a.toml");
    std::fs::write(
        &config,
        "[[prefix]]\nprefix = \"page:\"\npolicy = \"local\"\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let a = Sidecar::start(
        &proxy.endpoint(),
        &table,
        &["--max-connections", "4", "--config", &config],
        dir.path(),
    );
    let b = Sidecar::start(&db.endpoint, &table, &[], dir.path());
    a.wait_ready().await;
    b.wait_ready().await;

    // Before Prometheus scrapes: one of each failure, so that every series
    // the dashboard draws exists (a labelled counter appears on first use),
    // and none of them is in the rates the assertions below read.
    proxy.set_fault(Fault::Throttle);
    let mut c = a.client().await;
    let reply = c.call(b"set throttled 0 0 1\r\nx\r\n").await;
    assert!(reply.starts_with("SERVER_ERROR"), "{reply}");
    proxy.set_fault(Fault::Pass);
    let long_key = format!("get {}\r\n", "k".repeat(300));
    assert!(
        c.call(long_key.as_bytes())
            .await
            .starts_with("CLIENT_ERROR")
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(a.client().await);
    }
    let mut refused = a.client().await;
    assert_eq!(
        refused.try_reply().await.as_deref(),
        Some("ERROR Too many open connections\r\n")
    );
    drop((held, refused));
    // The keys the traffic hits, in a's memory, once a is coherent again
    // (the throttled membership reads may have cost it its leases).
    a.wait_coherent().await;
    b.wait_coherent().await;
    for k in 0..10 {
        let set = format!("set k{k} 0 0 2\r\nv{k}\r\n");
        assert_eq!(c.call(set.as_bytes()).await, "STORED\r\n");
    }
    // An absent key read twice (the second answered by its negative entry)
    // and a local key written and read.
    for _ in 0..2 {
        assert_eq!(c.call(b"get absent\r\n").await, "END\r\n");
    }
    assert!(a.metric("dynacache_cache_negative_hits_total").await >= 1.0);
    assert_eq!(
        c.call(b"set page:home 0 0 4\r\nhome\r\n").await,
        "STORED\r\n"
    );
    assert_eq!(
        c.call(b"get page:home\r\n").await,
        "VALUE page:home 0 4\r\nhome\r\nEND\r\n"
    );
    // A value stored compressed and one stored in chunks (random bytes, more
    // than one item holds), read back by b from DynamoDB.
    let compressible = "dynacache ".repeat(820).into_bytes();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let random: Vec<u8> = (0..500_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for (key, value) in [("compressed", &compressible), ("chunked", &random)] {
        let mut set = format!("set {key} 0 0 {}\r\n", value.len()).into_bytes();
        set.extend_from_slice(value);
        set.extend_from_slice(b"\r\n");
        assert_eq!(c.call(&set).await, "STORED\r\n", "{key}");
        let mut cb = b.client().await;
        let reply = cb.call(format!("get {key}\r\n").as_bytes()).await;
        let head = format!("VALUE {key} 0 {}\r\n", value.len());
        assert!(
            reply.starts_with(&head) && reply.ends_with("\r\nEND\r\n"),
            "{key}: {}",
            reply.chars().take(80).collect::<String>()
        );
    }
    for k in 0..10 {
        let get = format!("get k{k}\r\n");
        assert_eq!(
            c.call(get.as_bytes()).await,
            format!("VALUE k{k} 0 2\r\nv{k}\r\nEND\r\n")
        );
    }

    let prometheus = Prometheus::start(&[a.target(), b.target()], dir.path()).await;
    let at = |s: &Sidecar| format!("instance=\"{}\"", s.target());
    for s in [&a, &b] {
        prometheus
            .wait_for(&format!("up{{job=\"dynacache\",{}}}", at(s)), 1.0)
            .await;
    }

    // The traffic: on a, rounds of three hits and one miss (a key never
    // written), and a write every fourth round (b holds a's lease: the
    // write waits for b's acknowledgement); on b, multi-gets of one hit
    // and two misses (a BatchGetItem).
    let (hits0, misses0, through0) = (
        a.metric("dynacache_cache_hits_total").await,
        a.metric("dynacache_cache_misses_total").await,
        a.metric("dynacache_fleet_reads_through_total").await,
    );
    let mut cb = b.client().await;
    let started = Instant::now();
    let mut rounds = 0u64;
    while rounds < 40 || (rounds < 2000 && started.elapsed() < Duration::from_secs(3)) {
        for k in [rounds % 10, (rounds + 3) % 10, (rounds + 6) % 10] {
            let reply = c.call(format!("get k{k}\r\n").as_bytes()).await;
            assert!(reply.starts_with("VALUE"), "{reply}");
        }
        let reply = c.call(format!("get never-{rounds}\r\n").as_bytes()).await;
        assert_eq!(reply, "END\r\n");
        if rounds.is_multiple_of(4) {
            let set = format!("set w{} 0 0 1\r\nx\r\n", rounds % 10);
            assert_eq!(c.call(set.as_bytes()).await, "STORED\r\n");
        }
        let multi = format!("get k{} b1-{rounds} b2-{rounds}\r\n", rounds % 10);
        assert!(cb.call(multi.as_bytes()).await.ends_with("END\r\n"));
        rounds += 1;
    }
    let (hits, misses, through) = (
        a.metric("dynacache_cache_hits_total").await - hits0,
        a.metric("dynacache_cache_misses_total").await - misses0,
        a.metric("dynacache_fleet_reads_through_total").await - through0,
    );
    // Three hits to one miss, but for any get a read through to DynamoDB
    // while a lacked b's lease (a miss; none, unless the machine stalls a
    // lease renewal).
    let (sent_hits, sent_misses) = (3.0 * rounds as f64, rounds as f64);
    assert_eq!(
        hits + misses,
        sent_hits + sent_misses,
        "every key asked for counted once"
    );
    assert!(
        hits <= sent_hits && hits >= sent_hits - through,
        "{hits} hits, {misses} misses, {through} reads through in {rounds} rounds"
    );
    let expected = hits / (hits + misses);

    // Once Prometheus holds a's final counters, and a rule evaluation came
    // after that scrape, the recording rule is the traffic's ratio: 3/4
    // (if a stayed coherent, as it does unless stalled).
    let final_hits = hits0 + hits;
    let scraped = format!("dynacache_cache_hits_total{{{}}}", at(&a));
    prometheus.wait_for(&scraped, final_hits).await;
    let scraped_at = prometheus.one(&format!("timestamp({scraped})")).await;
    let ratio_rule = format!("instance:dynacache_hit_ratio:rate5m{{{}}}", at(&a));
    let deadline = Instant::now() + WAIT;
    while prometheus.one(&format!("timestamp({ratio_rule})")).await < scraped_at + 1.5 {
        assert!(Instant::now() < deadline, "{ratio_rule} never re-evaluated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ratio = prometheus.one(&ratio_rule).await;
    assert!(
        (ratio - expected).abs() < 0.005,
        "{ratio_rule} = {ratio}, the traffic's hit ratio is {expected} ({hits} hits, {misses} misses)"
    );
    if through == 0.0 {
        assert_eq!(expected, 0.75);
    }
    // A strongly consistent read of an item of less than 4 KB is one RCU: a's
    // read capacity per second is its GetItem calls per second.
    let rcu = prometheus
        .one(&format!(
            "instance_operation:dynacache_dynamodb_consumed_read_capacity_units:rate5m{{operation=\"GetItem\",{}}}",
            at(&a)
        ))
        .await;
    let gets = prometheus
        .one(&format!(
            "instance_operation_outcome:dynacache_dynamodb_requests:rate5m{{operation=\"GetItem\",outcome=\"ok\",{}}}",
            at(&a)
        ))
        .await;
    assert!(
        rcu > 0.0 && (rcu / gets - 1.0).abs() < 0.01,
        "RCU/s {rcu} against GetItem/s {gets}"
    );
    let ack_p99 = prometheus
        .one(&format!(
            "instance:dynacache_fleet_ack_wait_seconds:p99_rate5m{{{}}}",
            at(&a)
        ))
        .await;
    assert!(
        ack_p99 > 0.0 && ack_p99 <= 1.05,
        "a's writes waited for b, within a lease: {ack_p99}"
    );
    for (rule, value) in [
        ("instance:dynacache_commands_server_error:rate5m", 0.0),
        ("instance:dynacache_dynamodb_requests_failed:rate5m", 0.0),
        ("dynacache_fleet_coherent", 1.0),
        ("dynacache_fleet_leases_missing", 0.0),
    ] {
        for s in [&a, &b] {
            let got = prometheus.one(&format!("{rule}{{{}}}", at(s))).await;
            assert_eq!(got, value, "{rule} of {}", s.target());
        }
    }

    // Prometheus loaded every rule as written, each healthy, every alert
    // with a for:, a severity, a summary, a description and a runbook.
    let groups = prometheus.api("rules").await;
    let anchors = readme_anchors();
    let mut loaded = BTreeSet::new();
    for rule in groups["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
    {
        let name = rule["name"].as_str().unwrap();
        assert_eq!(rule["health"], "ok", "{name}: {rule}");
        loaded.insert(name.to_string());
        if rule["type"] == "alerting" {
            assert!(rule["duration"].as_f64().unwrap() >= 60.0, "{name}: for");
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["warning", "critical"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            let notes = &rule["annotations"];
            assert!(notes["summary"].is_string() && notes["description"].is_string());
            let runbook = notes["runbook_url"].as_str().unwrap_or_default();
            let fragment = runbook
                .strip_prefix("examples/monitoring/README.md#")
                .unwrap_or_else(|| panic!("{name}: runbook_url {runbook:?}"));
            assert_eq!(fragment, name.to_lowercase(), "{name}: runbook anchor");
            assert!(
                anchors.contains(fragment),
                "{name}: no heading for #{fragment} in examples/monitoring/README.md"
            );
        }
    }
    let written: BTreeSet<String> = rules
        .recorded
        .keys()
        .chain(rules.alerts.keys())
        .cloned()
        .collect();
    assert_eq!(loaded, written);

    // Every recording rule has a value, every metric the rules and the
    // dashboard name exists in Prometheus, and every query of the dashboard
    // draws something.
    let names: BTreeSet<String> =
        serde_json::from_value(prometheus.api("label/__name__/values").await).unwrap();
    let mut missing = Vec::new();
    for rule in rules.recorded.keys() {
        if !names.contains(rule) {
            missing.push(format!("recording rule {rule} has no value"));
        }
    }
    let dashboard: Value =
        serde_json::from_str(&read(&monitoring("dynacache.dashboard.json"))).unwrap();
    let queries = dashboard_queries(&dashboard);
    let named = rules
        .recorded
        .values()
        .chain(rules.alerts.values())
        .chain(queries.iter().map(|(_, _, e)| e));
    for metric in named.flat_map(|e| metric_names(e)).collect::<BTreeSet<_>>() {
        // ALERTS exists only while an alert is pending or firing.
        if metric != "ALERTS" && !names.contains(&metric) {
            missing.push(format!("{metric} is not in Prometheus"));
        }
    }
    for (title, ref_id, expr) in &queries {
        if prometheus.query(expr).await.is_empty() {
            missing.push(format!("panel {title:?} {ref_id} draws nothing: {expr}"));
        }
    }
    assert!(
        missing.is_empty(),
        "{}\nin Prometheus: {names:?}",
        missing.join("\n")
    );
}
