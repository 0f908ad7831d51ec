//! The deployment examples stay true to the code: their configuration is
//! valid and the same in every copy, and the IAM policies grant what the
//! binary calls and nothing more. (The Dockerfile, systemd unit and pod are
//! not run here: no docker, systemd or cluster on the test machine.)

use dynacache::config::Config;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/deploy");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{DEPLOY}/{name}")).unwrap()
}

fn parse(text: &str, what: &str) -> Config {
    let config = Config::from_toml(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    config.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
    config
}

#[test]
fn example_configs_are_valid_and_agree() {
    let file = parse(&read("dynacache.toml"), "dynacache.toml");
    assert!(file.unix_socket.is_some() && file.tcp_listen().is_some());
    // The pod's ConfigMap carries the same settings (comments aside).
    let pod = read("kubernetes-pod.yaml");
    let embedded: String = pod
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("dynacache.toml: |"))
        .skip(1)
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect();
    assert_eq!(parse(&embedded, "the ConfigMap"), file);
    assert!(pod.contains(&format!(
        "prometheus.io/port: \"{}\"",
        file.metrics_listen.port()
    )));
    let unit = read("dynacache.service");
    assert!(unit.contains("RuntimeDirectory=dynacache"));
    assert!(file.unix_socket.unwrap().starts_with("/run/dynacache/"));
}

fn actions(policy: &str) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_str(&read(policy)).unwrap();
    json["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap().clone())
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The IAM actions the store needs while serving: every call goes through
/// one wrapper, `.send("<Operation>", ...)` in src/store/dynamo.rs, and IAM
/// authorizes a TransactWriteItems by the actions inside it (`Put`,
/// `Update`, `Delete`, `ConditionCheck`: PutItem, UpdateItem, DeleteItem,
/// ConditionCheckItem), not by an action of its own.
fn operations_called() -> Vec<String> {
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/store/dynamo.rs"))
            .unwrap();
    let mut called: Vec<String> = source
        .split(".send(\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_string())
        .collect();
    if called.iter().any(|op| op == "TransactWriteItems") {
        called.retain(|op| op != "TransactWriteItems");
        for (inside, action) in [
            ("Put::builder()", "PutItem"),
            ("Update::builder()", "UpdateItem"),
            ("Delete::builder()", "DeleteItem"),
            ("ConditionCheck::builder()", "ConditionCheckItem"),
        ] {
            if source.contains(inside) {
                called.push(action.to_string());
            }
        }
    }
    called.sort();
    called.dedup();
    called
}

#[test]
fn iam_policies_grant_only_what_is_called() {
    let serving = actions("iam-policy.json");
    let expected: Vec<String> = operations_called()
        .iter()
        .map(|a| format!("dynamodb:{a}"))
        .collect();
    assert!(
        expected.len() >= 5,
        "the wrapper is where calls are made: {expected:?}"
    );
    let mut got = serving.clone();
    got.sort();
    assert_eq!(got, expected);
    let admin = actions("iam-policy-init-table.json");
    for action in ["CreateTable", "UpdateTimeToLive", "DescribeTable"] {
        assert!(admin.contains(&format!("dynamodb:{action}")), "{action}");
    }
    assert!(
        !serving
            .iter()
            .any(|a| a.contains("Create") || a.contains("TimeToLive")),
        "serving needs no table administration"
    );
}
