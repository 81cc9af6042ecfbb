//! Configuration: every shipped example parses, and each kind of mistake is
//! rejected with a message that names the key, through `rekeyd check`, with
//! exit status 78.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use rekeyd::config::{Config, RotationTrigger, SinkFormat, StoreConfig};

fn example_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["config", "deploy", "systemd"] {
        collect_toml(&root.join(dir), &mut files);
    }
    files
}

fn collect_toml(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_toml(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn every_example_config_parses() {
    let files = example_files();
    assert!(
        files.iter().any(|f| f.ends_with("config/rekeyd.toml")),
        "the annotated example is among {files:?}"
    );
    for file in files {
        Config::load_with_env(&file, std::iter::empty())
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
    }
}

#[test]
fn annotated_example_means_what_it_says() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rekeyd.toml");
    let config = Config::load_with_env(&path, std::iter::empty()).unwrap();
    assert_eq!(config.credentials.len(), 3);
    let maps = config.credential("maps").unwrap();
    assert_eq!(
        maps.rotation.as_ref().unwrap().trigger,
        RotationTrigger::Every(std::time::Duration::from_secs(86400))
    );
    assert_eq!(maps.sinks[0].format, SinkFormat::Raw);
    assert_eq!(maps.sinks[0].mode, 0o640);
    assert_eq!(config.credential("places").unwrap().sinks[0].mode, 0o600);
}

#[test]
fn environment_overrides_keys() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rekeyd.toml");
    let env = [
        ("REKEYD__STATE_DIR".to_string(), "/data/rekeyd".to_string()),
        (
            "REKEYD__API__LISTEN".to_string(),
            "127.0.0.1:19860".to_string(),
        ),
        ("REKEYD__LOG__FORMAT".to_string(), "json".to_string()),
        ("UNRELATED".to_string(), "x".to_string()),
    ];
    let config = Config::load_with_env(&path, env).unwrap();
    assert_eq!(config.state_dir, Path::new("/data/rekeyd"));
    assert_eq!(config.api.unwrap().listen.to_string(), "127.0.0.1:19860");
    assert_eq!(config.log.format, rekeyd::config::LogFormat::Json);

    let bad = [("REKEYD__NOPE".to_string(), "1".to_string())];
    let err = Config::load_with_env(&path, bad).unwrap_err().to_string();
    assert!(err.contains("unknown field `nope`"), "{err}");
}

const BASE: &str = r#"
state_dir = "/var/lib/rekeyd"
[[credentials]]
name = "maps"
provider = "mapsindoors"
client_id = "c"
customer_id = "cust"
initial_secret_file = "/etc/rekeyd/maps.secret"
"#;

/// (what is wrong, config text, fragments the error must contain)
fn invalid_cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let with = |extra: &str| format!("{BASE}{extra}");
    // A top-level table goes between state_dir and the credentials.
    let with_table = |table: &str| {
        BASE.replacen(
            "\n[[credentials]]",
            &format!("\n{table}\n[[credentials]]"),
            1,
        )
    };
    vec![
        (
            "unknown top-level key",
            format!("colour = 1\n{BASE}"),
            vec!["unknown field `colour`"],
        ),
        (
            "unknown credential key",
            BASE.replace("client_id = \"c\"", "client_id = \"c\"\nclientid = \"x\""),
            vec!["unknown field `clientid`", "credentials[0]"],
        ),
        (
            "relative state_dir",
            BASE.replace("/var/lib/rekeyd", "state"),
            vec!["`state_dir`", "absolute"],
        ),
        (
            "no credentials",
            "state_dir = \"/x\"\n".to_string(),
            vec!["`credentials`", "at least one"],
        ),
        (
            "bad name",
            BASE.replace("\"maps\"", "\"Maps_1\""),
            vec!["`credentials[0].name`", "a-z"],
        ),
        (
            "duplicate name",
            format!(
                "{BASE}{}",
                BASE.replace("state_dir = \"/var/lib/rekeyd\"", "")
            ),
            vec!["`credentials[1].name`", "duplicate"],
        ),
        (
            "unknown provider",
            BASE.replace("mapsindoors", "okta"),
            vec!["`credentials[0].provider`", "okta"],
        ),
        (
            "missing client_id",
            BASE.replace("client_id = \"c\"\n", ""),
            vec!["`credentials[0].client_id`", "required"],
        ),
        (
            "missing initial_secret_file",
            BASE.replace("initial_secret_file = \"/etc/rekeyd/maps.secret\"\n", ""),
            vec!["`credentials[0].initial_secret_file`", "required"],
        ),
        (
            "auth_method on mapsindoors",
            with("auth_method = \"client_secret_basic\"\n"),
            vec![
                "`credentials[0].auth_method`",
                "only supports client_secret_post",
            ],
        ),
        (
            "oauth2 without token_url",
            BASE.replace("mapsindoors", "oauth2")
                .replace("customer_id = \"cust\"\n", ""),
            vec!["`credentials[0].endpoints.token_url`", "required"],
        ),
        (
            "plain http to a remote host",
            with(
                "[credentials.endpoints]\ntoken_url = \"http://auth.example.com/connect/token\"\n",
            ),
            vec!["`credentials[0].endpoints.token_url`", "plain http"],
        ),
        (
            "not a URL",
            with("[credentials.endpoints]\ntoken_url = \"auth example\"\n"),
            vec!["`credentials[0].endpoints.token_url`", "invalid URL"],
        ),
        (
            "secrets_url for mappls",
            BASE.replace("mapsindoors", "mappls")
                + "[credentials.endpoints]\nsecrets_url = \"https://x.example/api\"\n",
            vec!["`credentials[0].endpoints.secrets_url`", "no secret API"],
        ),
        (
            "bad duration",
            with("[credentials.refresh]\nbefore_expiry = \"soon\"\n"),
            vec!["`credentials[0].refresh.before_expiry`", "invalid duration"],
        ),
        (
            "both every and schedule",
            with("[credentials.rotation]\nevery = \"1h\"\nschedule = \"0 0 3 * * *\"\n"),
            vec!["`credentials[0].rotation.every`", "not both"],
        ),
        (
            "bad cron",
            with("[credentials.rotation]\nschedule = \"0 61 3 * * *\"\n"),
            vec!["`credentials[0].rotation.schedule`", "invalid cron"],
        ),
        (
            "cron without seconds",
            with("[credentials.rotation]\nschedule = \"0 3 * * *\"\n"),
            vec!["`credentials[0].rotation.schedule`", "6"],
        ),
        (
            "rotation without trigger",
            with("[credentials.rotation]\ngrace = \"1m\"\n"),
            vec!["`credentials[0].rotation.every`", "required"],
        ),
        (
            "rotation on mappls",
            BASE.replace("mapsindoors", "mappls") + "[credentials.rotation]\nevery = \"1h\"\n",
            vec!["`credentials[0].rotation`", "no secret API"],
        ),
        (
            "rotation without customer_id",
            BASE.replace("customer_id = \"cust\"\n", "")
                + "[credentials.rotation]\nevery = \"1h\"\n",
            vec!["`credentials[0].customer_id`", "required"],
        ),
        (
            "world-readable sink",
            with("[[credentials.sinks]]\npath = \"/run/rekeyd/t\"\nmode = \"0644\"\n"),
            vec!["`credentials[0].sinks[0].mode`", "world"],
        ),
        (
            "unknown sink format",
            with("[[credentials.sinks]]\npath = \"/run/rekeyd/t\"\nformat = \"yaml\"\n"),
            vec!["`credentials[0].sinks[0].format`", "yaml"],
        ),
        (
            "relative sink path",
            with("[[credentials.sinks]]\npath = \"t\"\n"),
            vec!["`credentials[0].sinks[0].path`", "absolute"],
        ),
        (
            "non-loopback API",
            with_table("[api]\nlisten = \"0.0.0.0:9860\""),
            vec!["`api.listen`", "allow_non_loopback"],
        ),
        (
            "bad API address",
            with_table("[api]\nlisten = \"localhost\""),
            vec!["`api.listen`", "IP:PORT"],
        ),
        (
            "bad log format",
            with_table("[log]\nformat = \"xml\""),
            vec!["`log.format`", "xml"],
        ),
        (
            "extra param overriding the secret",
            BASE.replace("mapsindoors", "oauth2")
                .replace("customer_id = \"cust\"\n", "")
                + "extra_params = { client_secret = \"x\" }\n[credentials.endpoints]\ntoken_url = \"https://x.example/token\"\n",
            vec!["`credentials[0].extra_params.client_secret`"],
        ),
        (
            "unknown store kind",
            with_table("[store]\nkind = \"redis\""),
            vec!["`store.kind`", "redis"],
        ),
        (
            "etcd setting on a kubernetes store",
            with_table("[store]\nkind = \"kubernetes\"\nendpoints = [\"http://127.0.0.1:2379\"]"),
            vec!["`store.endpoints`", "\"etcd\"", "not \"kubernetes\""],
        ),
        (
            "shared-store setting on the file store",
            with_table("[store]\nsecret = \"rekeyd-state\""),
            vec!["`store.secret`", "not \"file\""],
        ),
        (
            "bad Secret name",
            with_table("[store]\nkind = \"kubernetes\"\nsecret = \"Rekeyd_State\""),
            vec!["`store.secret`", "Rekeyd_State"],
        ),
        (
            "claim ttl too short",
            with_table("[store]\nkind = \"kubernetes\"\nclaim_ttl = \"100ms\""),
            vec!["`store.claim_ttl`", "between"],
        ),
        (
            "unknown store key",
            with_table("[store]\nkind = \"kubernetes\"\nsecrets = \"x\""),
            vec!["unknown field `secrets`"],
        ),
        (
            "not TOML",
            "state_dir = \n".to_string(),
            vec!["cannot load config"],
        ),
    ]
}

#[test]
fn invalid_configs_name_the_key_and_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, text, fragments)) in invalid_cases().into_iter().enumerate() {
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("REKEYD_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(78),
            "{what}: exit status; stderr: {stderr}"
        );
        for fragment in fragments {
            assert!(
                stderr.contains(fragment),
                "{what}: {fragment:?} not in {stderr:?}"
            );
        }
        assert!(out.stdout.is_empty(), "{what}: nothing printed on stdout");
    }
}

#[test]
fn store_section_parses_with_defaults() {
    let with_store = |store: &str| {
        Config::from_toml(&BASE.replacen(
            "\n[[credentials]]",
            &format!("\n[store]\n{store}\n[[credentials]]"),
            1,
        ))
    };
    assert_eq!(with_store("").unwrap().store, StoreConfig::File);
    assert_eq!(Config::from_toml(BASE).unwrap().store, StoreConfig::File);
    let StoreConfig::Kubernetes(k) = with_store("kind = \"kubernetes\"").unwrap().store else {
        panic!("not a kubernetes store");
    };
    assert_eq!(
        (
            k.namespace,
            k.secret.as_str(),
            k.lease.as_str(),
            k.claim_ttl
        ),
        (
            None,
            "rekeyd-state",
            "rekeyd-rotation",
            Duration::from_secs(15)
        )
    );
    let etcd = with_store("kind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]");
    if cfg!(feature = "etcd") {
        let StoreConfig::Etcd(e) = etcd.unwrap().store else {
            panic!("not an etcd store");
        };
        assert_eq!(e.prefix, "/rekeyd");
        assert_eq!(e.endpoints, ["http://127.0.0.1:2379"]);
        let err = with_store("kind = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`store.endpoints[0]`"), "{err}");
        let err = with_store("kind = \"etcd\"").unwrap_err().to_string();
        assert!(err.contains("`store.endpoints`"), "{err}");
    } else {
        let err = etcd.unwrap_err().to_string();
        assert!(
            err.contains("`store.kind`") && err.contains("`etcd` cargo feature"),
            "{err}"
        );
    }
}

#[test]
fn missing_config_file_exits_78() {
    let out = Command::new(env!("CARGO_BIN_EXE_rekeyd"))
        .args(["check", "--config", "/nonexistent/rekeyd.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/rekeyd.toml"), "{stderr}");
}
