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
    assert_eq!(config.credentials.len(), 4);
    let maps = config.credential("maps").unwrap();
    assert_eq!(
        maps.rotation.as_ref().unwrap().trigger,
        RotationTrigger::Every(std::time::Duration::from_secs(86400))
    );
    assert_eq!(maps.sinks[0].format, SinkFormat::Raw);
    assert_eq!(maps.sinks[0].file().unwrap().mode, 0o640);
    assert_eq!(
        config.credential("places").unwrap().sinks[0]
            .file()
            .unwrap()
            .mode,
        0o600
    );
    let (internal, write) = config.token_profile("internal-api-write").unwrap();
    assert_eq!(internal.name, "internal-api");
    assert_eq!(write.scope.as_deref(), Some("api:write"));
    assert_eq!(
        write.sinks[0].file().unwrap().path,
        Path::new("/run/rekeyd/internal-api-write.token")
    );
    assert!(config.serves_token("internal-api") && config.serves_token("internal-api-write"));
    let billing = config.credential("billing").unwrap();
    assert_eq!(billing.provider.as_str(), "auth0");
    let management = billing.secret_api_credential.as_ref().unwrap();
    assert_eq!(
        (management.name.as_str(), management.secret_of.as_str()),
        ("billing-management", "billing")
    );
}

/// The commented key-based credentials at the end of the annotated example
/// parse as they are shown once uncommented.
#[test]
fn annotated_key_based_clients_parse() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rekeyd.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let section = &text[text.find("# Key-based clients").expect("the section")..];
    let toml: String = section
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.starts_with("[credentials")
                || l.starts_with("[[credentials")
                || l.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let config = Config::from_toml(&format!("state_dir = \"/var/lib/rekeyd\"\n{toml}")).unwrap();
    let reports = config.credential("reports").unwrap();
    assert_eq!(
        reports.auth_method,
        rekeyd::config::AuthMethod::PrivateKeyJwt
    );
    assert_eq!(
        reports.initial_secret_file.as_deref(),
        Some(Path::new("/etc/rekeyd/reports.key"))
    );
    assert_eq!(
        reports.assertion.as_ref().unwrap().audience.as_deref(),
        Some("https://sso.example.internal")
    );
    let billing = config.credential("billing").unwrap();
    let jwks = billing.jwks.as_deref().expect("[credentials.jwks]");
    assert_eq!(
        jwks.file.as_deref(),
        Some(Path::new("/srv/www/jwks/billing.json"))
    );
    assert!(billing.rotation.is_some(), "rotates through the JWK Set");
    assert!(billing.registration.is_none());
    let ledger = config.credential("ledger").unwrap();
    assert_eq!(
        ledger.endpoints.secrets_url.as_ref().unwrap().as_str(),
        "https://example.okta.com/api/v1/apps/0oa5e6f7g8/credentials/jwks"
    );
    let graph = config.credential("graph").unwrap();
    assert_eq!(
        graph.auth_method,
        rekeyd::config::AuthMethod::ClientAssertionFile
    );
    assert_eq!(
        graph.assertion.as_ref().unwrap().file.as_deref(),
        Some(Path::new(
            "/var/run/secrets/azure/tokens/azure-identity-token"
        ))
    );
}

#[test]
fn jwks_serve_path_defaults_its_file_and_a_secret_takes_the_store_namespace() {
    let config = Config::from_toml(
        "state_dir = \"/var/lib/rekeyd\"\n[diag]\nlisten = \"127.0.0.1:9861\"\n\
         [store]\nkind = \"kubernetes\"\nnamespace = \"apps\"\n\
         [[credentials]]\nname = \"idp\"\nprovider = \"oauth2\"\nclient_id = \"c\"\n\
         auth_method = \"private_key_jwt\"\ninitial_key_file = \"/etc/rekeyd/idp.key\"\n\
         [credentials.endpoints]\ntoken_url = \"https://idp.example/token\"\n\
         [credentials.rotation]\nevery = \"30d\"\n\
         [credentials.jwks]\nserve_path = \"/jwks/idp.json\"\nkubernetes_secret = \"idp-jwks\"\n",
    )
    .unwrap();
    let jwks = config.credentials[0].jwks.as_deref().unwrap();
    assert_eq!(
        jwks.file.as_deref(),
        Some(Path::new("/var/lib/rekeyd/jwks/idp.json"))
    );
    assert_eq!(jwks.serve_path.as_deref(), Some("/jwks/idp.json"));
    let secret = jwks.kubernetes_secret.as_ref().unwrap();
    assert_eq!(
        (
            secret.namespace.as_deref(),
            secret.secret.as_str(),
            secret.key.as_str()
        ),
        (Some("apps"), "idp-jwks", "jwks.json")
    );
    let caps = rekeyd::provider::capabilities_of(&config.credentials[0]).unwrap();
    assert_eq!(caps.value, rekeyd::provider::ValueOrigin::Key);
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

/// An Okta credential rotated with an administrative credential's token.
const OKTA: &str = r#"
state_dir = "/var/lib/rekeyd"
[[credentials]]
name = "app"
provider = "okta"
org_url = "https://example.okta.com"
app_id = "0oa1"
client_id = "c"
initial_secret_file = "/etc/rekeyd/app.secret"
initial_secret_id = "ocs1"
secret_api_credential = "admin"
[credentials.rotation]
every = "30d"
[[credentials]]
name = "admin"
provider = "okta"
org_url = "https://example.okta.com"
app_id = "0oa2"
client_id = "admin"
initial_secret_file = "/etc/rekeyd/admin.secret"
"#;

/// [`OKTA`] with the app authenticating with a key (`private_key_jwt`).
fn okta_keys() -> String {
    OKTA.replace(
        "initial_secret_file = \"/etc/rekeyd/app.secret\"\ninitial_secret_id = \"ocs1\"\n",
        "auth_method = \"private_key_jwt\"\ninitial_key_file = \"/etc/rekeyd/app.key\"\n",
    )
}

#[test]
fn an_okta_key_client_publishes_through_the_apps_jwks() {
    let config = Config::from_toml(&okta_keys()).unwrap();
    let app = config.credential("app").unwrap();
    assert_eq!(app.auth_method.as_str(), "private_key_jwt");
    assert_eq!(
        app.endpoints.secrets_url.as_ref().unwrap().as_str(),
        "https://example.okta.com/api/v1/apps/0oa1/credentials/jwks",
        "derived from org_url and app_id; no initial_secret_id needed (a key's id is its kid)"
    );
    assert_eq!(
        rekeyd::provider::capabilities_of(app),
        Some(rekeyd::provider::okta_keys::CAPABILITIES)
    );
}

#[test]
fn okta_and_auth0_urls_derive_from_their_ids() {
    let config = Config::from_toml(OKTA).unwrap();
    let app = config.credential("app").unwrap();
    assert_eq!(
        app.endpoints.token_url.as_str(),
        "https://example.okta.com/oauth2/v1/token"
    );
    assert_eq!(
        app.endpoints.secrets_url.as_ref().unwrap().as_str(),
        "https://example.okta.com/api/v1/apps/0oa1/credentials/secrets"
    );
    let admin = app.secret_api_credential.as_ref().unwrap();
    assert_eq!(admin.secret_of, "admin");
    assert_eq!(admin.login.as_ref().unwrap().client_id, "admin");

    let auth0 = Config::from_toml(
        r#"
[[credentials]]
name = "app"
provider = "auth0"
domain = "tenant.eu.auth0.com"
client_id = "abc"
initial_secret_file = "/etc/rekeyd/app.secret"
audience = "https://api.example.com/"
secret_api_credential = "management"
[credentials.rotation]
every = "30d"
[[credentials.tokens]]
name = "management"
audience = "https://tenant.eu.auth0.com/api/v2/"
"#,
    )
    .unwrap();
    let app = auth0.credential("app").unwrap();
    assert_eq!(
        app.endpoints.token_url.as_str(),
        "https://tenant.eu.auth0.com/oauth/token"
    );
    assert_eq!(
        app.endpoints.secrets_url.as_ref().unwrap().as_str(),
        "https://tenant.eu.auth0.com/api/v2/clients/abc"
    );
    // A token profile of the credential itself calls the Management API.
    let admin = app.secret_api_credential.as_ref().unwrap();
    assert_eq!(admin.secret_of, "app");
    let login = admin.login.as_ref().unwrap();
    assert_eq!(
        login.audience.as_deref(),
        Some("https://tenant.eu.auth0.com/api/v2/")
    );
    assert!(login.rotation.is_none());
}

#[test]
fn keycloak_and_entra_urls_derive_from_their_ids() {
    let config = Config::from_toml(
        r#"
[[credentials]]
name = "kc"
provider = "keycloak"
base_url = "https://sso.example.com/auth"
realm = "apps"
client_uuid = "0f1e2d3c"
client_id = "billing"
initial_secret_file = "/etc/rekeyd/kc.secret"
[credentials.rotation]
every = "30d"

[[credentials]]
name = "graph-app"
provider = "entra"
tenant = "contoso.onmicrosoft.com"
application_object_id = "11111111-2222-3333-4444-555555555555"
client_id = "66666666-7777-8888-9999-000000000000"
initial_secret_file = "/etc/rekeyd/graph-app.secret"
scope = "api://orders/.default"
secret_api_credential = "graph-app-graph"
[credentials.rotation]
every = "30d"
[[credentials.tokens]]
name = "graph-app-graph"
scope = "https://graph.microsoft.com/.default"
"#,
    )
    .unwrap();
    let kc = config.credential("kc").unwrap();
    assert_eq!(
        kc.endpoints.token_url.as_str(),
        "https://sso.example.com/auth/realms/apps/protocol/openid-connect/token"
    );
    assert_eq!(
        kc.endpoints.secrets_url.as_ref().unwrap().as_str(),
        "https://sso.example.com/auth/admin/realms/apps/clients/0f1e2d3c"
    );
    // Keycloak: the client's own token may set its secret.
    assert!(kc.secret_api_credential.is_none());
    let entra = config.credential("graph-app").unwrap();
    assert_eq!(
        entra.endpoints.token_url.as_str(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(
        entra.endpoints.secrets_url.as_ref().unwrap().as_str(),
        "https://graph.microsoft.com/v1.0/applications/11111111-2222-3333-4444-555555555555"
    );
    let graph = entra.secret_api_credential.as_ref().unwrap();
    assert_eq!(graph.secret_of, "graph-app");
    assert_eq!(
        graph.login.as_ref().unwrap().scope.as_deref(),
        Some("https://graph.microsoft.com/.default")
    );
}

/// (what is wrong, config text, fragments the error must contain)
fn invalid_cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let with = |extra: &str| format!("{BASE}{extra}");
    // An oauth2 credential with `keys` and, after its endpoints, `tables`.
    let oauth2 = |keys: &str, tables: &str| {
        format!(
            "state_dir = \"/var/lib/rekeyd\"\n[[credentials]]\nname = \"idp\"\nprovider = \"oauth2\"\n\
             client_id = \"c\"\ninitial_secret_file = \"/etc/rekeyd/idp.secret\"\n{keys}\
             [credentials.endpoints]\ntoken_url = \"https://idp.example/token\"\n{tables}"
        )
    };
    let registration = |uri: &str| {
        format!(
            "[credentials.registration]\nclient_uri = \"{uri}\"\naccess_token_file = \"/etc/rekeyd/rat\"\n"
        )
    };
    // A top-level table goes between state_dir and the credentials.
    let with_table = |table: &str| {
        BASE.replacen(
            "\n[[credentials]]",
            &format!("\n{table}\n[[credentials]]"),
            1,
        )
    };
    let mut cases = vec![
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
            BASE.replace("mapsindoors", "okra"),
            vec!["`credentials[0].provider`", "okra"],
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
            "initial_secret_credential and initial_secret_file",
            BASE.replace(
                "initial_secret_file = \"/etc/rekeyd/maps.secret\"",
                "initial_secret_file = \"/etc/rekeyd/maps.secret\"\n\
                 initial_secret_credential = \"maps.secret\"",
            ),
            vec!["`credentials[0].initial_secret_credential`", "not both"],
        ),
        (
            "initial_secret_credential with a directory",
            BASE.replace(
                "initial_secret_file = \"/etc/rekeyd/maps.secret\"",
                "initial_secret_credential = \"../maps.secret\"",
            ),
            vec![
                "`credentials[0].initial_secret_credential`",
                "not a credential name",
            ],
        ),
        (
            "initial_secret_credential \"..\"",
            BASE.replace(
                "initial_secret_file = \"/etc/rekeyd/maps.secret\"",
                "initial_secret_credential = \"..\"",
            ),
            vec![
                "`credentials[0].initial_secret_credential`",
                "not a credential name",
            ],
        ),
        (
            "empty initial_secret_credential",
            BASE.replace(
                "initial_secret_file = \"/etc/rekeyd/maps.secret\"",
                "initial_secret_credential = \"\"",
            ),
            vec![
                "`credentials[0].initial_secret_credential`",
                "not a credential name",
            ],
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
            "forced refresh interval too long",
            with("[credentials.refresh]\nmin_forced_interval = \"2h\"\n"),
            vec!["`credentials[0].refresh.min_forced_interval`", "at most 1h"],
        ),
        (
            "forced refresh interval without a unit",
            with("[credentials.refresh]\nmin_forced_interval = 5\n"),
            vec![
                "`credentials[0].refresh.min_forced_interval`",
                "without a unit",
            ],
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
            "max_secret_age not longer than grace",
            with(
                "[credentials.rotation]\nevery = \"1h\"\ngrace = \"10m\"\nmax_secret_age = \"5m\"\n",
            ),
            vec![
                "`credentials[0].rotation.max_secret_age`",
                "longer than `grace`",
            ],
        ),
        (
            "max_secret_age without a unit",
            with("[credentials.rotation]\nevery = \"1h\"\nmax_secret_age = 3600\n"),
            vec!["`credentials[0].rotation.max_secret_age`"],
        ),
        (
            "before_expiry zero",
            with("[credentials.rotation]\nbefore_expiry = \"0s\"\n"),
            vec![
                "`credentials[0].rotation.before_expiry`",
                "between 1s and 10 years",
            ],
        ),
        (
            "before_expiry negative",
            with("[credentials.rotation]\nevery = \"1h\"\nbefore_expiry = \"-1d\"\n"),
            vec!["`credentials[0].rotation.before_expiry`", "invalid duration"],
        ),
        (
            "before_expiry without a unit",
            with("[credentials.rotation]\nevery = \"1h\"\nbefore_expiry = 86400\n"),
            vec!["`credentials[0].rotation.before_expiry`"],
        ),
        (
            "history_limit too small",
            with_table("[store]\nhistory_limit = 3"),
            vec!["`store.history_limit`", "between 10 and 100000"],
        ),
        (
            "history_limit not a number",
            with_table("[store]\nhistory_limit = \"many\""),
            vec!["history_limit"],
        ),
        (
            "history_limit a fraction",
            with_table("[store]\nhistory_limit = 50.7"),
            vec!["`store.history_limit`", "whole number", "floating-point"],
        ),
        (
            "max_connections a fraction",
            with_table("[api]\nmax_connections = 1.5"),
            vec!["`api.max_connections`", "whole number", "floating-point"],
        ),
        (
            "max_connections a boolean",
            with_table("[diag]\nlisten = \"0.0.0.0:9861\"\nmax_connections = true"),
            vec!["`diag.max_connections`", "whole number", "boolean"],
        ),
        (
            "a number for an opt-in boolean",
            with_table("[api]\nallow_non_loopback = 1"),
            vec![
                "`api.allow_non_loopback`",
                "expected a boolean, found an integer",
            ],
        ),
        (
            "yes for an opt-in boolean",
            with("[credentials.endpoints]\nallow_insecure_http = \"yes\"\n"),
            vec![
                "`credentials[0].endpoints.allow_insecure_http`",
                "expected a boolean, found a string",
            ],
        ),
        (
            "on for a boolean",
            with("[credentials.rotation]\non_login = \"on\"\n"),
            vec!["`credentials[0].rotation.on_login`", "expected a boolean"],
        ),
        (
            "listener timeout without a unit",
            with_table("[api]\nidle_timeout = 60"),
            vec!["`api.idle_timeout`", "text with a unit"],
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
            "unknown sink kind",
            with("[[credentials.sinks]]\nkind = \"vault\"\n"),
            vec![
                "`credentials[0].sinks[0].kind`",
                "kubernetes-secret",
                "vault",
            ],
        ),
        (
            "variable without format env",
            with("[[credentials.sinks]]\npath = \"/run/rekeyd/t\"\nvariable = \"TOKEN\"\n"),
            vec!["`credentials[0].sinks[0].variable`", "format = \"env\""],
        ),
        (
            "bad env variable",
            with(
                "[[credentials.sinks]]\npath = \"/run/rekeyd/t\"\nformat = \"env\"\nvariable = \"MY-TOKEN\"\n",
            ),
            vec!["`credentials[0].sinks[0].variable`", "MY-TOKEN"],
        ),
        (
            "template format without a template",
            with("[[credentials.sinks]]\npath = \"/run/rekeyd/t\"\nformat = \"template\"\n"),
            vec!["`credentials[0].sinks[0].template`", "required"],
        ),
        (
            "missing template file",
            with(
                "[[credentials.sinks]]\npath = \"/run/rekeyd/t\"\nformat = \"template\"\ntemplate = \"/nonexistent/app.tmpl\"\n",
            ),
            vec![
                "`credentials[0].sinks[0].template`",
                "/nonexistent/app.tmpl",
                "cannot read",
            ],
        ),
        (
            "template without format template",
            with("[[credentials.sinks]]\npath = \"/run/rekeyd/t\"\ntemplate = \"/etc/app.tmpl\"\n"),
            vec![
                "`credentials[0].sinks[0].template`",
                "format = \"template\"",
            ],
        ),
        (
            "secret sink without a secret",
            with("[[credentials.sinks]]\nkind = \"kubernetes-secret\"\n"),
            vec!["`credentials[0].sinks[0].secret`", "required"],
        ),
        (
            "secret sink with a path",
            with(
                "[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app\"\npath = \"/run/t\"\n",
            ),
            vec!["`credentials[0].sinks[0].path`", "kind = \"file\""],
        ),
        (
            "secret sink with a mode",
            with(
                "[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app\"\nmode = \"0600\"\n",
            ),
            vec!["`credentials[0].sinks[0].mode`", "kind = \"file\""],
        ),
        (
            "file sink with a secret",
            with("[[credentials.sinks]]\npath = \"/run/t\"\nsecret = \"app\"\n"),
            vec![
                "`credentials[0].sinks[0].secret`",
                "kind = \"kubernetes-secret\"",
            ],
        ),
        (
            "bad secret sink name",
            with("[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"App_Token\"\n"),
            vec!["`credentials[0].sinks[0].secret`", "App_Token"],
        ),
        (
            "bad secret sink key",
            with(
                "[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app\"\nkey = \"a/b\"\n",
            ),
            vec!["`credentials[0].sinks[0].key`", "a/b"],
        ),
        (
            "bad secret sink namespace",
            with(
                "[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app\"\nnamespace = \"Prod\"\n",
            ),
            vec!["`credentials[0].sinks[0].namespace`", "Prod"],
        ),
        (
            "relative secret sink kubeconfig",
            with(
                "[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app\"\nkubeconfig = \"kube.yaml\"\n",
            ),
            vec!["`credentials[0].sinks[0].kubeconfig`", "absolute"],
        ),
        (
            "two sinks on one secret key",
            with(
                "[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app\"\n[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app\"\nformat = \"env\"\n",
            ),
            vec![
                "`credentials[0].sinks[1].key`",
                "is taken by a token sink (`credentials[0].sinks[0].secret`)",
            ],
        ),
        (
            "a token sink in the store's Secret",
            with_table("[store]\nkind = \"kubernetes\"\nnamespace = \"apps\"")
                + "[[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"rekeyd-state\"\nkey = \"maps\"\n",
            vec![
                "`credentials[0].sinks[0].key`",
                "Secret \"rekeyd-state\" is taken by the record store (`store.secret`)",
            ],
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
            "etcd TLS setting on a kubernetes store",
            with_table("[store]\nkind = \"kubernetes\"\nca_file = \"/etc/rekeyd/etcd-ca.pem\""),
            vec!["`store.ca_file`", "\"etcd\"", "not \"kubernetes\""],
        ),
        (
            "etcd user on the file store",
            with_table("[store]\nusername = \"rekeyd\""),
            vec!["`store.username`", "\"etcd\"", "not \"file\""],
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
        (
            "token profile without a name",
            with("[[credentials.tokens]]\nscope = \"read\"\n"),
            vec!["`credentials[0].tokens[0].name`", "required"],
        ),
        (
            "bad token profile name",
            with("[[credentials.tokens]]\nname = \"Maps_Read\"\n"),
            vec!["`credentials[0].tokens[0].name`", "a-z"],
        ),
        (
            "token profile named like its credential",
            with("[[credentials.tokens]]\nname = \"maps\"\n"),
            vec![
                "`credentials[0].tokens[0].name`",
                "duplicate",
                "`credentials[0].name`",
            ],
        ),
        (
            "token profile named like another credential",
            format!(
                "{BASE}[[credentials.tokens]]\nname = \"other\"\n{}",
                BASE.replace("state_dir = \"/var/lib/rekeyd\"", "")
                    .replace("\"maps\"", "\"other\"")
                    .replace("maps.secret", "other.secret")
            ),
            vec!["`credentials[1].name`", "duplicate", "tokens[0].name"],
        ),
        (
            "two token profiles with one name",
            with(
                "[[credentials.tokens]]\nname = \"read\"\n[[credentials.tokens]]\nname = \"read\"\n",
            ),
            vec!["`credentials[0].tokens[1].name`", "duplicate"],
        ),
        (
            "token profile overriding a parameter rekeyd sets",
            with("[[credentials.tokens]]\nname = \"read\"\nextra_params = { client_id = \"x\" }\n"),
            vec![
                "`credentials[0].tokens[0].extra_params.client_id`",
                "cannot be overridden",
            ],
        ),
        (
            "token profile audience for a provider without one",
            with("[[credentials.tokens]]\nname = \"read\"\naudience = \"api\"\n"),
            vec![
                "`credentials[0].tokens[0].audience`",
                "only supported by providers oauth2, okta, auth0, keycloak and entra",
            ],
        ),
        (
            "token profile sink on the credential's file",
            with(
                "[[credentials.sinks]]\npath = \"/run/maps.token\"\n\
                 [[credentials.tokens]]\nname = \"read\"\n\
                 [[credentials.tokens.sinks]]\npath = \"/run/maps.token\"\n",
            ),
            vec!["`credentials[0].tokens[0].sinks[0].path`", "is taken by a token sink (`credentials[0].sinks[0].path`)"],
        ),
        (
            "token profile sink on the credential's file, spelt otherwise",
            with(
                "[[credentials.sinks]]\npath = \"/run/maps.token\"\n\
                 [[credentials.tokens]]\nname = \"read\"\n\
                 [[credentials.tokens.sinks]]\npath = \"/run/./x/../maps.token\"\n",
            ),
            vec![
                "`credentials[0].tokens[0].sinks[0].path`",
                "is taken by a token sink (`credentials[0].sinks[0].path`)",
            ],
        ),
        (
            "token sink in the record store's directory",
            with("[[credentials.sinks]]\npath = \"/var/lib/rekeyd/tokens/../credentials/maps.json\"\n"),
            vec![
                "`credentials[0].sinks[0].path`",
                "is taken by the record store (/var/lib/rekeyd/credentials)",
            ],
        ),
        (
            "token sink on the API key file",
            with("[[credentials.sinks]]\npath = \"/var/lib/rekeyd/api.key\"\n")
                .replace("state_dir = \"/var/lib/rekeyd\"\n", "state_dir = \"/var/lib/rekeyd\"\n[api]\n"),
            vec!["`credentials[0].sinks[0].path`", "is taken by the API key (`api.key_file`)"],
        ),
        (
            "token profile with a bad sink",
            with(
                "[[credentials.tokens]]\nname = \"read\"\n[[credentials.tokens.sinks]]\npath = \"rel.token\"\n",
            ),
            vec!["`credentials[0].tokens[0].sinks[0].path`"],
        ),
        (
            "a client id written as a number",
            BASE.replace("client_id = \"c\"", "client_id = 0x10"),
            vec!["credentials[0].client_id", "expected a string, found an integer"],
        ),
        (
            "an extra parameter written as a number",
            with("extra_params = { resource = 42 }\n"),
            vec!["extra_params", "expected a string, found an integer"],
        ),
        (
            "unknown token profile key",
            with("[[credentials.tokens]]\nname = \"read\"\nrotation = {}\n"),
            vec!["unknown field `rotation`"],
        ),
        (
            "okta without its org",
            OKTA.replace("org_url = \"https://example.okta.com\"\n", ""),
            vec!["`credentials[0].org_url`", "required for provider okta"],
        ),
        (
            "okta org_url with a path",
            OKTA.replace("okta.com\"", "okta.com/oauth2/default\""),
            vec!["`credentials[0].org_url`", "no path"],
        ),
        (
            "okta app_id that would change the URL",
            OKTA.replace("app_id = \"0oa1\"", "app_id = \"0oa1/../x\""),
            vec!["`credentials[0].app_id`", "letters, digits"],
        ),
        (
            "okta rotation without an administrative credential",
            OKTA.replace("secret_api_credential = \"admin\"\n", ""),
            vec![
                "`credentials[0].secret_api_credential`",
                "required to rotate with provider okta",
            ],
        ),
        (
            "secret_api_credential naming nothing",
            OKTA.replace(
                "secret_api_credential = \"admin\"",
                "secret_api_credential = \"nobody\"",
            ),
            vec![
                "`credentials[0].secret_api_credential`",
                "neither a credential nor a token profile",
            ],
        ),
        (
            "secret_api_credential without a rotation",
            with("secret_api_credential = \"maps\"\n"),
            vec!["`credentials[0].secret_api_credential`", "only to rotate"],
        ),
        (
            "okta private_key_jwt rotation through the secrets URL",
            okta_keys().replace(
                "[credentials.rotation]",
                "[credentials.endpoints]\nsecrets_url = \"https://example.okta.com/api/v1/apps/0oa1/credentials/secrets\"\n[credentials.rotation]",
            ),
            vec![
                "`credentials[0].endpoints.secrets_url`",
                "/credentials/jwks",
            ],
        ),
        (
            "okta private_key_jwt rotation without an administrative credential",
            okta_keys().replace("secret_api_credential = \"admin\"\n", ""),
            vec![
                "`credentials[0].secret_api_credential`",
                "required to rotate with provider okta",
            ],
        ),
        (
            "okta with client_assertion_file",
            okta_keys().replace("private_key_jwt", "client_assertion_file"),
            vec!["`credentials[0].auth_method`", "provider oauth2 only"],
        ),
        (
            "okta rotation without the bootstrap secret's id",
            OKTA.replace("initial_secret_id = \"ocs1\"\n", ""),
            vec!["`credentials[0].initial_secret_id`", "at most two secrets"],
        ),
        (
            "auth0 without its domain",
            BASE.replace("provider = \"mapsindoors\"", "provider = \"auth0\"")
                .replace("customer_id = \"cust\"\n", ""),
            vec!["`credentials[0].domain`", "required for provider auth0"],
        ),
        (
            "keycloak without its realm",
            BASE.replace(
                "provider = \"mapsindoors\"",
                "provider = \"keycloak\"\nbase_url = \"https://sso.example.com\"\nclient_uuid = \"0f1e\"",
            )
            .replace("customer_id = \"cust\"\n", ""),
            vec!["`credentials[0].realm`", "required for provider keycloak"],
        ),
        (
            "keycloak base_url with a query",
            BASE.replace(
                "provider = \"mapsindoors\"",
                "provider = \"keycloak\"\nbase_url = \"https://sso.example.com/?x=1\"\nrealm = \"r\"\nclient_uuid = \"0f1e\"",
            )
            .replace("customer_id = \"cust\"\n", ""),
            vec!["`credentials[0].base_url`", "a query is not"],
        ),
        (
            "entra without its application object id",
            BASE.replace("provider = \"mapsindoors\"", "provider = \"entra\"\ntenant = \"contoso.onmicrosoft.com\"")
                .replace("customer_id = \"cust\"\n", ""),
            vec!["`credentials[0].application_object_id`", "required for provider entra"],
        ),
        (
            "an Okta id on another provider",
            with("app_id = \"0oa1\"\n"),
            vec![
                "`credentials[0].app_id`",
                "not used by provider mapsindoors",
            ],
        ),
        (
            "a domain that is not a host name",
            BASE.replace(
                "provider = \"mapsindoors\"",
                "provider = \"auth0\"\ndomain = \"x.auth0.com/evil\"",
            )
            .replace("customer_id = \"cust\"\n", ""),
            vec!["`credentials[0].domain`", "letters, digits"],
        ),
        (
            "oauth2 rotation without registration management",
            oauth2("", "[credentials.rotation]\nevery = \"30d\"\n"),
            vec!["`credentials[0].rotation`", "RFC 7592", "[credentials.registration]"],
        ),
        (
            "registration for a provider with its own secret API",
            with(&registration("https://idp.example/reg/c")),
            vec!["`credentials[0].registration`", "only to provider oauth2"],
        ),
        (
            "registration without client_uri",
            oauth2("", "[credentials.registration]\naccess_token_file = \"/etc/rekeyd/rat\"\n"),
            vec!["`credentials[0].registration.client_uri`", "is required"],
        ),
        (
            "registration without access_token_file",
            oauth2("", "[credentials.registration]\nclient_uri = \"https://idp.example/reg/c\"\n"),
            vec!["`credentials[0].registration.access_token_file`", "is required"],
        ),
        (
            "registration client_uri over plain http",
            oauth2("", &registration("http://idp.example/reg/c")),
            vec!["`credentials[0].registration.client_uri`", "plain http"],
        ),
        (
            "unknown registration key",
            oauth2("", &format!("{}token = \"x\"\n", registration("https://idp.example/reg/c"))),
            vec!["unknown field `token`", "credentials[0].registration"],
        ),
        (
            "registration with secret_api_credential",
            oauth2(
                "secret_api_credential = \"idp\"\n",
                &format!("{}[credentials.rotation]\nevery = \"30d\"\n", registration("https://idp.example/reg/c")),
            ),
            vec!["`credentials[0].secret_api_credential`", "registration access token"],
        ),
    ];
    // An oauth2 credential authenticating with a key or an assertion file
    // (no initial_secret_file): `keys`, then `tables` after its endpoints.
    let keyed = |keys: &str, tables: &str| {
        format!(
            "state_dir = \"/var/lib/rekeyd\"\n[[credentials]]\nname = \"idp\"\nprovider = \"oauth2\"\n\
             client_id = \"c\"\n{keys}\
             [credentials.endpoints]\ntoken_url = \"https://idp.example/token\"\n{tables}"
        )
    };
    let jwt = "auth_method = \"private_key_jwt\"\n";
    let key_file = "initial_key_file = \"/etc/rekeyd/idp.key\"\n";
    let file_method = "auth_method = \"client_assertion_file\"\n";
    let assertion_file = "client_assertion_file = \"/var/run/secrets/tokens/idp\"\n";
    cases.extend([
        (
            "private_key_jwt without initial_key_file",
            keyed(jwt, ""),
            vec!["`credentials[0].initial_key_file`", "is required with auth_method = \"private_key_jwt\""],
        ),
        (
            "private_key_jwt with initial_secret_file too",
            keyed(&format!("{jwt}{key_file}initial_secret_file = \"/etc/rekeyd/idp.secret\"\n"), ""),
            vec!["`credentials[0].initial_secret_file`", "give initial_key_file instead"],
        ),
        (
            "initial_key_file with a secret-based method",
            oauth2(key_file, ""),
            vec!["`credentials[0].initial_key_file`", "applies only with auth_method = \"private_key_jwt\""],
        ),
        (
            "relative initial_key_file",
            keyed(&format!("{jwt}initial_key_file = \"idp.key\"\n"), ""),
            vec!["`credentials[0].initial_key_file`", "absolute path"],
        ),
        (
            "private_key_jwt with another provider",
            "state_dir = \"/var/lib/rekeyd\"\n[[credentials]]\nname = \"kc\"\nprovider = \"keycloak\"\n\
             base_url = \"https://sso.example.com\"\nrealm = \"r\"\nclient_uuid = \"u\"\nclient_id = \"c\"\n\
             auth_method = \"private_key_jwt\"\ninitial_key_file = \"/etc/rekeyd/kc.key\"\n"
                .to_string(),
            vec!["`credentials[0].auth_method`", "provider oauth2 only"],
        ),
        (
            "a verify_window of zero",
            keyed(&format!("{jwt}{key_file}"), &format!("{}[credentials.rotation]\nevery = \"30d\"\nverify_window = \"0s\"\n", registration("https://idp.example/reg/c"))),
            vec!["`credentials[0].rotation.verify_window`", "between 1s and 1h"],
        ),
        (
            "private_key_jwt rotation with nowhere to publish the key",
            keyed(&format!("{jwt}{key_file}"), "[credentials.rotation]\nevery = \"30d\"\n"),
            vec!["`credentials[0].rotation`", "[credentials.registration]"],
        ),
        (
            "jwks with a secret-based method",
            oauth2("", "[credentials.jwks]\nfile = \"/srv/jwks/idp.json\"\n"),
            vec!["`credentials[0].jwks`", "auth_method = \"private_key_jwt\""],
        ),
        (
            "jwks with registration",
            keyed(
                &format!("{jwt}{key_file}"),
                &format!("{}[credentials.jwks]\nfile = \"/srv/jwks/idp.json\"\n", registration("https://idp.example/reg/c")),
            ),
            vec!["`credentials[0].jwks`", "does not apply with [credentials.registration]"],
        ),
        (
            "jwks with nowhere to publish",
            keyed(&format!("{jwt}{key_file}"), "[credentials.jwks]\n"),
            vec!["`credentials[0].jwks`", "needs file, serve_path or kubernetes_secret"],
        ),
        (
            "jwks with a relative file",
            keyed(&format!("{jwt}{key_file}"), "[credentials.jwks]\nfile = \"jwks.json\"\n"),
            vec!["`credentials[0].jwks.file`", "absolute path"],
        ),
        (
            "jwks unknown key",
            keyed(&format!("{jwt}{key_file}"), "[credentials.jwks]\nurl = \"https://x\"\n"),
            vec!["unknown field `url`", "credentials[0]"],
        ),
        (
            "jwks serve_path without a diagnostics listener",
            keyed(&format!("{jwt}{key_file}"), "[credentials.jwks]\nserve_path = \"/jwks/idp.json\"\n"),
            vec!["`credentials[0].jwks.serve_path`", "needs the diagnostics listener"],
        ),
        (
            "jwks serve_path that is not a path",
            keyed(&format!("{jwt}{key_file}"), "[credentials.jwks]\nserve_path = \"jwks/../x\"\n"),
            vec!["`credentials[0].jwks.serve_path`", "is not a path like"],
        ),
        (
            "jwks serve_path over a diagnostics path",
            keyed(&format!("{jwt}{key_file}"), "[credentials.jwks]\nserve_path = \"/metrics\"\n"),
            vec!["`credentials[0].jwks.serve_path`", "diagnostics path of rekeyd's own"],
        ),
        (
            "jwks kubernetes_secret that is not an object name",
            keyed(&format!("{jwt}{key_file}"), "[credentials.jwks]\nkubernetes_secret = \"Client_Keys\"\n"),
            vec!["`credentials[0].jwks.kubernetes_secret`", "not a Kubernetes object name"],
        ),
        (
            "jwks kubernetes_secret that is the store's Secret",
            keyed(&format!("{jwt}{key_file}"), "[credentials.jwks]\nkubernetes_secret = \"rekeyd-state\"\n")
                .replacen("\n[[credentials]]", "\n[store]\nkind = \"kubernetes\"\n[[credentials]]", 1),
            vec!["`credentials[0].jwks.kubernetes_secret`", "is taken by the record store"],
        ),
        (
            "jwks file that a token sink writes",
            keyed(
                &format!("{jwt}{key_file}"),
                "[[credentials.sinks]]\npath = \"/run/app/token\"\n[credentials.jwks]\nfile = \"/run/app/token\"\n",
            ),
            vec!["`credentials[0].jwks.file`", "is taken by a token sink (`credentials[0].sinks[0].path`)"],
        ),
        (
            "jwks file that a token sink writes, spelt otherwise",
            keyed(
                &format!("{jwt}{key_file}"),
                "[[credentials.sinks]]\npath = \"/run/app/token\"\n[credentials.jwks]\nfile = \"/run/app/sub/../token\"\n",
            ),
            vec!["`credentials[0].jwks.file`", "is taken by a token sink"],
        ),
        (
            "jwks serve_path twice",
            {
                let one = keyed(&format!("{jwt}{key_file}"), "[credentials.jwks]\nserve_path = \"/jwks/idp.json\"\n");
                let credential = &one[one.find("[[credentials]]").unwrap()..];
                format!(
                    "{}\n[diag]\nlisten = \"127.0.0.1:9861\"\n{credential}{}",
                    one[..one.find("[[credentials]]").unwrap()].trim_end(),
                    credential.replace("name = \"idp\"", "name = \"idp2\"")
                )
            },
            vec!["`credentials[1].jwks.serve_path`", "is served for credentials[0] already"],
        ),
        (
            "an empty assertion_audience",
            keyed(&format!("{jwt}{key_file}assertion_audience = \"\"\n"), ""),
            vec!["`credentials[0].assertion_audience`", "must not be empty"],
        ),
        (
            "client_assertion in extra_params with private_key_jwt",
            keyed(&format!("{jwt}{key_file}extra_params = {{ client_assertion = \"x\" }}\n"), ""),
            vec!["`credentials[0].extra_params.client_assertion`", "set by rekeyd itself"],
        ),
        (
            "client_assertion_file method without the file",
            keyed(file_method, ""),
            vec!["`credentials[0].client_assertion_file`", "is required with auth_method = \"client_assertion_file\""],
        ),
        (
            "client_assertion_file with an initial secret",
            keyed(&format!("{file_method}{assertion_file}initial_secret_file = \"/etc/rekeyd/idp.secret\"\n"), ""),
            vec!["`credentials[0].initial_secret_file`", "nothing is stored"],
        ),
        (
            "client_assertion_file with initial_key_file",
            keyed(&format!("{file_method}{assertion_file}{key_file}"), ""),
            vec!["`credentials[0].initial_key_file`", "applies only with auth_method = \"private_key_jwt\""],
        ),
        (
            "client_assertion_file with rotation",
            keyed(
                &format!("{file_method}{assertion_file}"),
                &format!("{}[credentials.rotation]\nevery = \"30d\"\n", registration("https://idp.example/reg/c")),
            ),
            vec!["`credentials[0].rotation`", "stores nothing to rotate"],
        ),
        (
            "client_assertion_file with a secret-based method",
            oauth2(assertion_file, ""),
            vec!["`credentials[0].client_assertion_file`", "applies only with auth_method = \"client_assertion_file\""],
        ),
        (
            "unknown auth_method",
            oauth2("auth_method = \"tls_client_auth\"\n", ""),
            vec!["`credentials[0].auth_method`", "private_key_jwt or client_assertion_file"],
        ),
    ]);
    if cfg!(feature = "etcd") {
        let etcd = |keys: &str| with_table(&format!("[store]\nkind = \"etcd\"\n{keys}"));
        cases.extend([
            (
                "https etcd without a CA",
                etcd("endpoints = [\"https://10.0.0.1:2379\"]"),
                vec!["`store.ca_file`", "required with https endpoints"],
            ),
            (
                "a CA for http etcd endpoints",
                etcd("endpoints = [\"http://10.0.0.1:2379\"]\nca_file = \"/etc/rekeyd/ca.pem\""),
                vec!["`store.ca_file`", "https endpoints only"],
            ),
            (
                "http and https etcd endpoints mixed",
                etcd(
                    "endpoints = [\"https://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\n\
                     ca_file = \"/etc/rekeyd/ca.pem\"",
                ),
                vec!["`store.endpoints[1]`", "like store.endpoints[0]"],
            ),
            (
                "an etcd client certificate without its key",
                etcd(
                    "endpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"/etc/rekeyd/ca.pem\"\n\
                     cert_file = \"/etc/rekeyd/client.pem\"",
                ),
                vec!["`store.key_file`", "required with store.cert_file"],
            ),
            (
                "an etcd client key without its certificate",
                etcd(
                    "endpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"/etc/rekeyd/ca.pem\"\n\
                     key_file = \"/etc/rekeyd/client.key\"",
                ),
                vec!["`store.cert_file`", "required with store.key_file"],
            ),
            (
                "an etcd CA file that is not there",
                etcd("endpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"/nonexistent/ca.pem\""),
                vec!["`store.ca_file`", "cannot read /nonexistent/ca.pem"],
            ),
            (
                "an etcd user without a password",
                etcd("endpoints = [\"http://127.0.0.1:2379\"]\nusername = \"rekeyd\""),
                vec!["`store.password_file`", "required with store.username"],
            ),
            (
                "an etcd password without a user",
                etcd(
                    "endpoints = [\"http://127.0.0.1:2379\"]\n\
                     password_file = \"/etc/rekeyd/etcd.password\"",
                ),
                vec!["`store.username`", "required with store.password_file"],
            ),
            (
                "an etcd password file that is not there",
                etcd(
                    "endpoints = [\"http://127.0.0.1:2379\"]\nusername = \"rekeyd\"\n\
                     password_file = \"/nonexistent/etcd.password\"",
                ),
                vec!["`store.password_file`", "cannot read"],
            ),
        ]);
    }
    cases
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
            .env_remove("CREDENTIALS_DIRECTORY")
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

/// `initial_secret_credential` resolves in `$CREDENTIALS_DIRECTORY` (where
/// systemd's LoadCredential= puts the file), and `rekeyd check` shows the
/// resolved path; a relative directory is refused.
#[test]
fn initial_secret_credential_resolves_in_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    let text = BASE.replace(
        "initial_secret_file = \"/etc/rekeyd/maps.secret\"",
        "initial_secret_credential = \"maps.secret\"",
    );
    let path = dir.path().join("rekeyd.toml");
    std::fs::write(&path, &text).unwrap();
    let creds = dir.path().join("credentials");
    let check_with = |directory: &Path| {
        Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("REKEYD_CONFIG")
            .env("CREDENTIALS_DIRECTORY", directory)
            .output()
            .unwrap()
    };
    let out = check_with(&creds);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let maps = &shown["credentials"][0];
    assert_eq!(
        maps["initial_secret_file"],
        creds.join("maps.secret").display().to_string(),
        "{shown}"
    );
    assert_eq!(maps["initial_secret_credential"], "maps.secret");

    let out = check_with(Path::new("relative/dir"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("`credentials[0].initial_secret_credential`")
            && stderr.contains("absolute"),
        "{stderr}"
    );

    let loaded = Config::load_with_env(
        &path,
        [(
            "CREDENTIALS_DIRECTORY".to_string(),
            "/run/credentials/x".to_string(),
        )],
    )
    .unwrap();
    let maps = loaded.credential("maps").unwrap();
    assert_eq!(
        maps.initial_secret_file.as_deref(),
        Some(Path::new("/run/credentials/x/maps.secret"))
    );
    assert_eq!(maps.initial_secret_key(), "initial_secret_credential");
    // Without the variable the file is unknown, and the daemon refuses it.
    let loaded = Config::from_toml(&text).unwrap();
    assert_eq!(loaded.credentials[0].initial_secret_file, None);
    let err = loaded.require_credentials().unwrap_err().to_string();
    assert!(
        err.contains("`credentials[0].initial_secret_credential`")
            && err.contains("$CREDENTIALS_DIRECTORY is not set"),
        "{err}"
    );
}

/// The packaged configuration names its bootstrap secret by credential
/// (`initial_secret_credential`), which only the service's environment
/// resolves. The operator's commands run from a shell, without
/// `$CREDENTIALS_DIRECTORY`: `rekeyd check` (README "Install") warns and
/// passes, `history` and `status` work, and only `rekeyd run` refuses to
/// start (exit 78, naming the key) before it touches anything.
#[test]
fn without_the_credentials_directory_only_the_daemon_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let text = BASE
        .replace(
            "initial_secret_file = \"/etc/rekeyd/maps.secret\"",
            "initial_secret_credential = \"maps.secret\"",
        )
        .replace(
            "state_dir = \"/var/lib/rekeyd\"",
            &format!("state_dir = \"{}/state\"", dir.path().display()),
        );
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    let path = dir.path().join("rekeyd.toml");
    std::fs::write(&path, &text).unwrap();
    let rekeyd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .args(args)
            .arg("--config")
            .arg(&path)
            .env_remove("REKEYD_CONFIG")
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap()
    };
    let key = "`credentials[0].initial_secret_credential`";

    let out = rekeyd(&["check", "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains(key) && stderr.contains("rekeyd run"),
        "{stderr}"
    );
    let out = rekeyd(&["check", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["valid"], true, "{shown}");
    assert!(
        shown["warnings"][0].as_str().unwrap().contains(key),
        "{shown}"
    );

    let out = rekeyd(&["history", "maps"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let out = rekeyd(&["run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(key) && stderr.contains("LoadCredential=maps.secret:"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "the daemon touched the state before refusing"
    );
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

// ---------------------------------------------------------------------------
// S8: one secret, one owner.
// ---------------------------------------------------------------------------

/// What `rekeyd check` said about a configuration.
struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Writes `text` to `<dir>/rekeyd.toml` and runs `rekeyd check` on it.
fn check(dir: &Path, text: &str) -> Checked {
    let path = dir.join("rekeyd.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rekeyd"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("REKEYD_CONFIG")
        .output()
        .unwrap();
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A MapsIndoors credential of client "c"; `extra` goes at the end of its
/// table (e.g. a `[credentials.rotation]` section).
fn maps_credential(name: &str, secret_file: &str, secret_id: Option<&str>, extra: &str) -> String {
    let id = secret_id.map_or(String::new(), |id| {
        format!("initial_secret_id = \"{id}\"\n")
    });
    format!(
        "[[credentials]]\nname = \"{name}\"\nprovider = \"mapsindoors\"\nclient_id = \"c\"\n\
         customer_id = \"cust\"\ninitial_secret_file = \"{secret_file}\"\n{id}{extra}"
    )
}

const ROTATION: &str = "[credentials.rotation]\nevery = \"24h\"\n";

fn config_of(dir: &Path, credentials: &[String]) -> String {
    format!(
        "state_dir = \"{}/state\"\n{}",
        dir.display(),
        credentials.concat()
    )
}

/// Asserts a refusal under S8 naming `credentials[1].FIELD` and
/// `credentials[0].FIELD` and saying why.
fn assert_refused(what: &str, checked: &Checked, field: &str) {
    let stderr = &checked.stderr;
    assert_eq!(
        checked.code,
        Some(78),
        "{what}: exit status; stderr: {stderr}"
    );
    for fragment in [
        format!("`credentials[1].{field}`"),
        format!("`credentials[0].{field}`"),
        "would delete the secret".to_string(),
        "S8".to_string(),
    ] {
        assert!(
            stderr.contains(&fragment),
            "{what}: {fragment:?} not in {stderr:?}"
        );
    }
    assert!(checked.stdout.is_empty(), "{what}: nothing on stdout");
}

#[test]
fn a_shared_bootstrap_secret_is_refused_when_either_credential_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("{}/maps.secret", dir.path().display());
    let cases = [
        ("the first rotates", ROTATION, "", "\"a\" rotates"),
        ("the second rotates", "", ROTATION, "\"b\" rotates"),
        ("both rotate", ROTATION, ROTATION, "both rotate"),
    ];
    for (what, a_extra, b_extra, who) in cases {
        let text = config_of(
            dir.path(),
            &[
                maps_credential("a", &secret, Some("id-1"), a_extra),
                maps_credential("b", &secret, Some("id-1"), b_extra),
            ],
        );
        let checked = check(dir.path(), &text);
        assert_refused(what, &checked, "initial_secret_file");
        assert!(checked.stderr.contains(who), "{what}: {:?}", checked.stderr);
    }
}

#[test]
fn a_shared_secret_id_is_refused_when_either_credential_rotates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let text = config_of(
        dir.path(),
        &[
            maps_credential("a", &format!("{d}/a.secret"), Some("id-1"), ROTATION),
            maps_credential("b", &format!("{d}/b.secret"), Some("id-1"), ""),
        ],
    );
    assert_refused("shared id", &check(dir.path(), &text), "initial_secret_id");

    // Different ids (and files): each credential has its own secret.
    let text = config_of(
        dir.path(),
        &[
            maps_credential("a", &format!("{d}/a.secret"), Some("id-1"), ROTATION),
            maps_credential("b", &format!("{d}/b.secret"), Some("id-2"), ""),
        ],
    );
    let checked = check(dir.path(), &text);
    assert_eq!(checked.code, Some(0), "{}", checked.stderr);
}

#[test]
fn two_spellings_of_one_secret_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let refused = |what: &str, a_file: &str, b_file: &str| {
        let text = config_of(
            dir.path(),
            &[
                maps_credential("a", a_file, None, ROTATION),
                maps_credential("b", b_file, None, ""),
            ],
        );
        assert_refused(what, &check(dir.path(), &text), "initial_secret_file");
    };

    // Neither file exists: only the spelling can tell, and the missing
    // file itself is no reason to refuse.
    refused(
        "dot and dot-dot",
        &format!("{d}/./x/../secret"),
        &format!("{d}/secret"),
    );
    refused(
        "doubled slash",
        &format!("{d}//secret"),
        &format!("{d}/secret"),
    );

    // Existing files reached through symlinks: only the file system can tell.
    std::fs::write(dir.path().join("real.secret"), "s3cr3t\n").unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("real.secret"),
        dir.path().join("link.secret"),
    )
    .unwrap();
    refused(
        "symlink to the file",
        &format!("{d}/real.secret"),
        &format!("{d}/link.secret"),
    );
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::fs::write(dir.path().join("real/maps.secret"), "s3cr3t\n").unwrap();
    std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("linked")).unwrap();
    refused(
        "symlinked directory",
        &format!("{d}/linked/maps.secret"),
        &format!("{d}/real/maps.secret"),
    );

    // Two different files, existing or not, are fine.
    let text = config_of(
        dir.path(),
        &[
            maps_credential("a", &format!("{d}/real.secret"), None, ROTATION),
            maps_credential("b", &format!("{d}/real/maps.secret"), None, ""),
            maps_credential("m", &format!("{d}/missing.secret"), None, ROTATION),
        ],
    );
    let checked = check(dir.path(), &text);
    assert_eq!(checked.code, Some(0), "{}", checked.stderr);
    assert!(!checked.stderr.contains("s3cr3t"), "{}", checked.stderr);
}

/// A token sink reached through links to rekeyd's own files: a link to
/// the record store's directory, a link to a credential's record, or
/// another sink's file by a second name. Each is refused (exit 78, the
/// sink's key named) before anything is written: a token written over a
/// record would lose the credential's secret.
#[test]
fn a_sink_reached_through_a_link_to_the_store_or_another_sink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let store = dir.path().join("state/credentials");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("maps.json"), "{}").unwrap();
    std::os::unix::fs::symlink(&store, dir.path().join("tokens")).unwrap();
    std::os::unix::fs::symlink(store.join("maps.json"), dir.path().join("maps.token")).unwrap();
    std::fs::write(dir.path().join("real.token"), "").unwrap();
    std::fs::hard_link(
        dir.path().join("real.token"),
        dir.path().join("other.token"),
    )
    .unwrap();
    let sink = |path: &str| format!("[[credentials.sinks]]\npath = \"{path}\"\n");
    let cases = [
        (
            "a linked store directory",
            sink(&format!("{d}/tokens/maps.token")),
            "sinks[0]",
            "the record store",
        ),
        (
            "a link to a record",
            sink(&format!("{d}/maps.token")),
            "sinks[0]",
            "the record store",
        ),
        (
            "another sink's file by a second name",
            sink(&format!("{d}/real.token")) + &sink(&format!("{d}/other.token")),
            "sinks[1]",
            "a token sink (`credentials[0].sinks[0].path`)",
        ),
    ];
    for (what, sinks, key, taken_by) in cases {
        let text = config_of(
            dir.path(),
            &[maps_credential(
                "maps",
                &format!("{d}/maps.secret"),
                None,
                &sinks,
            )],
        );
        let checked = check(dir.path(), &text);
        assert_eq!(checked.code, Some(78), "{what}: {}", checked.stderr);
        for fragment in [
            format!("`credentials[0].{key}.path`"),
            format!("is taken by {taken_by}"),
        ] {
            assert!(
                checked.stderr.contains(&fragment),
                "{what}: {fragment:?} not in {}",
                checked.stderr
            );
        }
    }
    assert_eq!(
        std::fs::read_to_string(store.join("maps.json")).unwrap(),
        "{}"
    );
}

#[test]
fn a_shared_secret_without_rotation_is_accepted_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("{}/maps.secret", dir.path().display());
    let text = config_of(
        dir.path(),
        &[
            maps_credential("a", &secret, Some("id-1"), ""),
            maps_credential("b", &secret, Some("id-1"), "scope = \"other\"\n"),
        ],
    );
    let checked = check(dir.path(), &text);
    assert_eq!(checked.code, Some(0), "{}", checked.stderr);
    assert!(
        checked.stdout.contains("\"name\": \"b\""),
        "{}",
        checked.stdout
    );
    // Accepted with a warning that names the key and the supported way.
    for fragment in [
        "credentials[1].initial_secret_file",
        "[[credentials.tokens]]",
        "S8",
    ] {
        assert!(
            checked.stderr.contains(fragment),
            "{fragment}: {}",
            checked.stderr
        );
    }
}

#[test]
fn one_client_at_one_token_endpoint_twice_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // `b` spells out the token URL `a` gets by default: the same endpoint.
    let explicit_default =
        "[credentials.endpoints]\ntoken_url = \"https://auth.mapsindoors.com/connect/token\"\n";
    let text = config_of(
        dir.path(),
        &[
            maps_credential("a", &format!("{d}/a.secret"), None, ROTATION),
            maps_credential("b", &format!("{d}/b.secret"), None, explicit_default),
        ],
    );
    let checked = check(dir.path(), &text);
    let stderr = &checked.stderr;
    assert_eq!(checked.code, Some(0), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.starts_with("rekeyd: warning: "))
        .unwrap_or_else(|| panic!("no warning in {stderr:?}"));
    for fragment in [
        "`credentials[1].client_id`",
        "`credentials[0].client_id`",
        "\"c\"",
        "https://auth.mapsindoors.com/connect/token",
    ] {
        assert!(
            warning.contains(fragment),
            "{fragment:?} not in {warning:?}"
        );
    }
    assert_eq!(stderr.matches("rekeyd: warning: ").count(), 1, "{stderr}");
    assert!(stderr.contains("is valid"), "{stderr}");
    assert!(
        checked.stdout.contains("\"name\": \"b\""),
        "{}",
        checked.stdout
    );

    // Another token endpoint, or another client: no warning.
    let elsewhere =
        "[credentials.endpoints]\ntoken_url = \"https://auth.example.com/connect/token\"\n";
    let text = config_of(
        dir.path(),
        &[
            maps_credential("a", &format!("{d}/a.secret"), None, ROTATION),
            maps_credential("b", &format!("{d}/b.secret"), None, elsewhere),
            maps_credential("e", &format!("{d}/e.secret"), None, "")
                .replace("client_id = \"c\"", "client_id = \"e\""),
        ],
    );
    let checked = check(dir.path(), &text);
    assert_eq!(checked.code, Some(0), "{}", checked.stderr);
    assert!(!checked.stderr.contains("warning"), "{}", checked.stderr);
}

#[test]
fn run_logs_configuration_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // The bootstrap files are missing, so the daemon stops right after
    // start-up; the warning is logged before that.
    let path = dir.path().join("rekeyd.toml");
    let text = config_of(
        dir.path(),
        &[
            maps_credential("a", &format!("{d}/a.secret"), None, ""),
            maps_credential("b", &format!("{d}/b.secret"), None, ""),
        ],
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rekeyd"))
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("REKEYD_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("`credentials[1].client_id`"))
        .unwrap_or_else(|| panic!("no warning in {stderr:?}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("`credentials[0].client_id`"), "{line}");
}

#[test]
fn extra_params_values_never_show_in_debug() {
    let assertion = "eyJhbGciOiJSUzI1NiJ9.assertion-value.c2lnbmF0dXJl";
    let config = Config::from_toml(&format!(
        r#"
state_dir = "/var/lib/rekeyd"
[[credentials]]
name = "idp"
provider = "oauth2"
client_id = "c"
initial_secret_file = "/etc/rekeyd/idp.secret"
extra_params = {{ client_assertion = "{assertion}" }}
[credentials.endpoints]
token_url = "https://idp.example/token"
"#
    ))
    .unwrap();
    let cred = &config.credentials[0];
    assert_eq!(cred.extra_params["client_assertion"].expose(), assertion);
    let shown = format!("{config:?}");
    assert!(shown.contains("client_assertion"), "{shown}");
    assert!(!shown.contains(assertion), "{shown}");
}

// ---------------------------------------------------------------------------
// Numbers: modes, ids and durations written as TOML integers or as text

/// `[[credentials.sinks]]` with `extra` after its path, parsed.
fn sink_with(extra: &str) -> Result<Config, String> {
    Config::from_toml(&format!(
        "{BASE}[[credentials.sinks]]\npath = \"/run/rekeyd/t\"\n{extra}\n"
    ))
    .map_err(|e| e.to_string())
}

#[test]
fn a_mode_is_the_integer_it_is_or_octal_text() {
    for (written, mode) in [
        ("mode = 0o640", 0o640),
        ("mode = 0o600", 0o600),
        ("mode = 0o440", 0o440),
        ("mode = 0o400", 0o400),
        // The same numbers in another base are the same modes.
        ("mode = 416", 0o640),
        ("mode = 0x180", 0o600),
        ("mode = \"0640\"", 0o640),
        ("mode = \"640\"", 0o640),
        ("mode = \"0o640\"", 0o640),
        ("mode = \"0600\"", 0o600),
        ("", 0o600),
    ] {
        let config = sink_with(written).unwrap_or_else(|e| panic!("{written}: {e}"));
        assert_eq!(
            config.credentials[0].sinks[0].file().unwrap().mode,
            mode,
            "{written}"
        );
    }
}

#[test]
fn a_refused_mode_is_explained_without_numbers_the_operator_did_not_write() {
    // (written, what the error says, numbers it must not print)
    for (written, reason, foreign) in [
        // 0o644 is 420: neither it nor a reading of its digits may appear.
        ("mode = 0o644", "all users", &["420", "644"][..]),
        ("mode = 0o604", "all users", &["388", "604"][..]),
        ("mode = 0o200", "owner read", &["128", "200"][..]),
        ("mode = 0o700", "executable", &["448", "700"][..]),
        ("mode = 0o660", "group write", &["432", "660"][..]),
        // Decimal by mistake: 640 is 0o1200, 600 is 0o1130, 400 is 0o620
        // (group write), 440 is 0o670 (executable).
        ("mode = 640", "not a file mode", &["1200", "416"][..]),
        ("mode = 600", "not a file mode", &["1130", "384"][..]),
        ("mode = 400", "group write", &["620", "256"][..]),
        ("mode = 440", "executable", &["670", "288"][..]),
        ("mode = -1", "not a file mode", &["4294967295"][..]),
        ("mode = 1.5", "floating-point", &[][..]),
        ("mode = true", "boolean", &[][..]),
        ("mode = \"0644\"", "all users", &["420"][..]),
        ("mode = \"0888\"", "not an octal file mode", &[][..]),
        ("mode = \"rw-r-----\"", "not an octal file mode", &[][..]),
    ] {
        let err = sink_with(written).expect_err(written);
        assert!(
            err.contains("`credentials[0].sinks[0].mode`"),
            "{written}: {err}"
        );
        let reason_words: Vec<&str> = reason.split(' ').collect();
        assert!(
            reason_words.iter().all(|w| err.contains(w)),
            "{written}: {reason:?} not in {err}"
        );
        for number in foreign {
            assert!(!err.contains(number), "{written}: {err} prints {number}");
        }
        assert!(
            err.contains("0o640"),
            "{written}: shows the right form: {err}"
        );
    }
    // Text is quoted as written.
    let err = sink_with("mode = \"0644\"").unwrap_err();
    assert!(err.contains("\"0644\""), "{err}");
}

/// Counts and listener durations are read as the TOML value they are:
/// integers in any base (or decimal digits in quotes) for counts, text with
/// a unit for durations. A fraction or a boolean is refused instead of
/// rounded, and no error prints a number the operator did not write.
#[test]
fn counts_and_listener_durations_are_read_as_written() {
    let parse = |table: &str| {
        Config::from_toml(&BASE.replacen(
            "\n[[credentials]]",
            &format!("\n{table}\n[[credentials]]"),
            1,
        ))
        .map_err(|e| e.to_string())
    };
    for (written, connections) in [
        ("max_connections = 0x40", 64),
        ("max_connections = 0o100", 64),
        ("max_connections = \"64\"", 64),
    ] {
        let config = parse(&format!("[api]\n{written}")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.api.unwrap().limits.max_connections, connections);
    }
    let config = parse("[store]\nhistory_limit = 0x40").unwrap();
    assert_eq!(config.history_limit, 64);
    // (table, key, what the error says, numbers it must not print)
    for (table, key, reason, foreign) in [
        (
            "[api]\nmax_connections = 1.5",
            "api.max_connections",
            "floating-point",
            &["2"][..],
        ),
        (
            "[api]\nmax_connections = 0.4",
            "api.max_connections",
            "floating-point",
            &[][..],
        ),
        (
            "[api]\nmax_connections = true",
            "api.max_connections",
            "boolean",
            &[][..],
        ),
        (
            "[api]\nmax_connections = \"0x10\"",
            "api.max_connections",
            "\"0x10\"",
            &["16"][..],
        ),
        (
            "[api]\nmax_connections = 0x7FFFFFFF",
            "api.max_connections",
            "between 1",
            &["2147483647"][..],
        ),
        (
            "[api]\nmax_connections = 0o7777777",
            "api.max_connections",
            "between 1",
            &["2097151"][..],
        ),
        (
            "[store]\nhistory_limit = 50.7",
            "store.history_limit",
            "floating-point",
            &["51"][..],
        ),
        (
            "[store]\nhistory_limit = 0x3",
            "store.history_limit",
            "between 10",
            &[][..],
        ),
        (
            "[api]\nheader_timeout = 0x1E",
            "api.header_timeout",
            "without a unit",
            &["30"][..],
        ),
        (
            "[api]\nrequest_timeout = 2.5",
            "api.request_timeout",
            "floating-point",
            &[][..],
        ),
        (
            "[api]\nidle_timeout = 60",
            "api.idle_timeout",
            "without a unit",
            &[][..],
        ),
    ] {
        let err = parse(table).expect_err(table);
        assert!(err.contains(&format!("`{key}`")), "{table}: {err}");
        assert!(err.contains(reason), "{table}: {reason:?} not in {err}");
        for number in foreign {
            let digits: Vec<&str> = err
                .split(|c: char| !c.is_ascii_digit())
                .filter(|w| !w.is_empty())
                .collect();
            assert!(!digits.contains(number), "{table}: {err} prints {number}");
        }
    }
}

#[test]
fn owner_and_group_take_names_or_numeric_ids() {
    let config = sink_with("owner = \"root\"\ngroup = \"root\"").unwrap();
    let sink = config.credentials[0].sinks[0].file().unwrap();
    assert_eq!(sink.owner.as_ref().map(|o| o.id), Some(0));
    assert_eq!(sink.group.as_ref().map(|g| g.id), Some(0));
    let config = sink_with("owner = 65532\ngroup = \"65533\"").unwrap();
    let sink = config.credentials[0].sinks[0].file().unwrap();
    assert_eq!(sink.owner.as_ref().map(|o| o.id), Some(65532));
    assert_eq!(sink.group.as_ref().map(|g| g.id), Some(65533));
    let config = sink_with("").unwrap();
    assert_eq!(config.credentials[0].sinks[0].file().unwrap().owner, None);
    assert_eq!(config.credentials[0].sinks[0].file().unwrap().group, None);

    for (written, key, reason) in [
        (
            "owner = \"no-such-user-rekeyd\"",
            "owner",
            "no user named \"no-such-user-rekeyd\"",
        ),
        (
            "group = \"no-such-group-rekeyd\"",
            "group",
            "no group named \"no-such-group-rekeyd\"",
        ),
        ("owner = -1", "owner", "not a user id"),
        ("group = 4294967295", "group", "not a group id"),
        ("group = \"4294967295\"", "group", "not a group id"),
        ("owner = 1.0", "owner", "floating-point"),
    ] {
        let err = sink_with(written).expect_err(written);
        assert!(
            err.contains(&format!("`credentials[0].sinks[0].{key}`")) && err.contains(reason),
            "{written}: {err}"
        );
    }
}

#[test]
fn durations_are_text_with_a_unit() {
    // Every duration key, given a bare number: refused, naming the key and
    // the right form, without repeating the number (0x1E would print as 30).
    let cases = [
        (
            BASE.replacen(
                "\n[[credentials]]",
                "\n[store]\nkind = \"kubernetes\"\nclaim_ttl = 0x1E\n[[credentials]]",
                1,
            ),
            "store.claim_ttl",
        ),
        (
            format!("{BASE}[credentials.refresh]\nbefore_expiry = 0x1E\n"),
            "credentials[0].refresh.before_expiry",
        ),
        (
            format!("{BASE}[credentials.rotation]\nevery = 0x1E\n"),
            "credentials[0].rotation.every",
        ),
        (
            format!("{BASE}[credentials.rotation]\nevery = \"1h\"\ngrace = 0x1E\n"),
            "credentials[0].rotation.grace",
        ),
        (
            format!("{BASE}[credentials.endpoints]\nconnect_timeout = 0x1E\n"),
            "credentials[0].endpoints.connect_timeout",
        ),
        (
            format!("{BASE}[credentials.endpoints]\nrequest_timeout = 0x1E\n"),
            "credentials[0].endpoints.request_timeout",
        ),
        (
            format!(
                "{BASE}[[credentials.hooks]]\non = [\"token\"]\ncommand = [\"/bin/true\"]\ntimeout = 0x1E\n"
            ),
            "credentials[0].hooks[0].timeout",
        ),
    ];
    for (text, key) in cases {
        let err = Config::from_toml(&text).expect_err(key).to_string();
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        assert!(
            err.contains("unit") && err.contains("\"5m\""),
            "{key}: {err}"
        );
        assert!(
            !err.contains("30"),
            "{key}: {err} prints a number not written"
        );
        let text = text.replace("0x1E", "\"30s\"");
        Config::from_toml(&text).unwrap_or_else(|e| panic!("{key} = \"30s\": {e}"));
    }
    let err = Config::from_toml(&format!("{BASE}[credentials.rotation]\nevery = 1.5\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("floating-point"), "{err}");
}

#[test]
fn a_hook_signal_is_a_name_not_a_number() {
    let hook = |signal: &str| {
        format!(
            "{BASE}[[credentials.hooks]]\non = [\"token\"]\nsignal = {signal}\npid_file = \"/run/app.pid\"\n"
        )
    };
    let err = Config::from_toml(&hook("0xA")).unwrap_err().to_string();
    assert!(
        err.contains("`credentials[0].hooks[0].signal`") && err.contains("name"),
        "{err}"
    );
    assert!(!err.contains("10"), "{err}");
    Config::from_toml(&hook("\"USR1\"")).unwrap();
}

/// `refresh.default_lifetime`: the lifetime of a token whose reply says
/// nothing about it; one hour unless set, at least a second, shown by
/// `rekeyd check`.
#[tokio::test]
async fn default_lifetime_is_configured_validated_and_shown() {
    let config = Config::from_toml(BASE).unwrap();
    assert_eq!(
        config.credentials[0].refresh.default_lifetime,
        Duration::from_secs(3600)
    );
    let shown: serde_json::Value =
        serde_json::from_str(&rekeyd::commands::effective_config(&config).await).unwrap();
    assert_eq!(shown["credentials"][0]["refresh"]["default_lifetime"], "1h");

    let set = format!("{BASE}[credentials.refresh]\ndefault_lifetime = \"90s\"\n");
    let config = Config::from_toml(&set).unwrap();
    assert_eq!(
        config.credentials[0].refresh.default_lifetime,
        Duration::from_secs(90)
    );
    let shown: serde_json::Value =
        serde_json::from_str(&rekeyd::commands::effective_config(&config).await).unwrap();
    assert_eq!(
        shown["credentials"][0]["refresh"]["default_lifetime"],
        "1m 30s"
    );

    for (value, needle) in [
        ("0s", "at least 1s"),
        ("500ms", "at least 1s"),
        ("soon", "invalid duration"),
    ] {
        let text = format!("{BASE}[credentials.refresh]\ndefault_lifetime = \"{value}\"\n");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.contains("`credentials[0].refresh.default_lifetime`") && err.contains(needle),
            "{value}: {err}"
        );
    }
}

/// `refresh.min_forced_interval`: forced logins (`POST
/// /v1/token/{name}/refresh`) at most once per 5s unless set; zero allowed
/// (one at a time only), at most an hour; shown by `rekeyd check`.
#[tokio::test]
async fn min_forced_interval_is_configured_validated_and_shown() {
    let config = Config::from_toml(BASE).unwrap();
    assert_eq!(
        config.credentials[0].refresh.min_forced_interval,
        Duration::from_secs(5)
    );
    let shown: serde_json::Value =
        serde_json::from_str(&rekeyd::commands::effective_config(&config).await).unwrap();
    assert_eq!(
        shown["credentials"][0]["refresh"]["min_forced_interval"],
        "5s"
    );

    for (value, expected, display) in [
        ("0s", Duration::ZERO, "0s"),
        ("30s", Duration::from_secs(30), "30s"),
        ("1h", Duration::from_secs(3600), "1h"),
    ] {
        let text = format!("{BASE}[credentials.refresh]\nmin_forced_interval = \"{value}\"\n");
        let config = Config::from_toml(&text).unwrap();
        assert_eq!(config.credentials[0].refresh.min_forced_interval, expected);
        let shown: serde_json::Value =
            serde_json::from_str(&rekeyd::commands::effective_config(&config).await).unwrap();
        assert_eq!(
            shown["credentials"][0]["refresh"]["min_forced_interval"],
            display
        );
    }
    for (value, needle) in [("1h 1s", "at most 1h"), ("soon", "invalid duration")] {
        let text = format!("{BASE}[credentials.refresh]\nmin_forced_interval = \"{value}\"\n");
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(
            err.contains("`credentials[0].refresh.min_forced_interval`") && err.contains(needle),
            "{value}: {err}"
        );
    }
}

/// A typo on the line of an assertion: `rekeyd check` names the position
/// and exits 78, and never prints the line.
#[test]
fn a_parse_error_next_to_an_assertion_does_not_print_it() {
    const ASSERTION: &str = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rekeyd.toml");
    for (text, position) in [
        (
            format!("{BASE}extra_params = {{ client_assertion = \"{ASSERTION}\" oops }}\n"),
            "line 9, column",
        ),
        (
            format!("{BASE}extra_params = {{ client_assertion = \"{ASSERTION}\n"),
            "line 9, column",
        ),
        (
            format!("{BASE}scope = [\"{ASSERTION}\"]\n"),
            "key `credentials[0].scope`",
        ),
    ] {
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_rekeyd"))
            .args(["check", "--config"])
            .arg(&path)
            .env_remove("REKEYD_CONFIG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stderr.contains(position), "{stderr}");
        for half in [&ASSERTION[..20], &ASSERTION[20..]] {
            assert!(
                !stderr.contains(half) && !stdout.contains(half),
                "the assertion was printed: {stderr}"
            );
        }
    }
}

#[test]
fn sink_kinds_and_formats_parse_with_defaults() {
    use rekeyd::config::{SecretSink, SinkTarget};
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("app.conf.tmpl");
    std::fs::write(&template, "token = {{ token }}\n").unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let sinks = format!(
        "[[credentials.sinks]]\npath = \"/run/rekeyd/a.env\"\nformat = \"env\"\n\
         [[credentials.sinks]]\npath = \"/run/rekeyd/b.env\"\nformat = \"env\"\nvariable = \"APP_TOKEN\"\n\
         [[credentials.sinks]]\npath = \"/run/rekeyd/kube.json\"\nformat = \"exec-credential\"\n\
         [[credentials.sinks]]\npath = \"/run/rekeyd/app.conf\"\nformat = \"template\"\ntemplate = \"{}\"\n\
         [[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app-token\"\n\
         [[credentials.sinks]]\nkind = \"kubernetes-secret\"\nsecret = \"app-token\"\nkey = \"token.env\"\nformat = \"env\"\nnamespace = \"payments\"\nkubeconfig = \"/etc/kube.yaml\"\n",
        template.display()
    );
    let text = format!("{BASE}{sinks}");
    let config = Config::from_toml(&text).unwrap();
    let sinks = &config.credentials[0].sinks;
    assert_eq!(
        sinks[0].format,
        SinkFormat::Env {
            variable: "REKEYD_MAPS_TOKEN".into()
        }
    );
    assert_eq!(
        sinks[1].format,
        SinkFormat::Env {
            variable: "APP_TOKEN".into()
        }
    );
    assert_eq!(sinks[2].format, SinkFormat::ExecCredential);
    let SinkFormat::Template(t) = &sinks[3].format else {
        panic!("template: {:?}", sinks[3].format)
    };
    assert_eq!(t.path(), template);
    assert_eq!(sinks[3].file().unwrap().mode, 0o600);
    assert_eq!(
        sinks[4].target,
        SinkTarget::KubernetesSecret(SecretSink {
            namespace: None,
            secret: "app-token".into(),
            key: "token".into(),
            kubeconfig: None,
        })
    );
    assert_eq!(sinks[4].format, SinkFormat::Raw);
    assert_eq!(sinks[4].label(), "kubernetes-secret:app-token[token]");
    assert_eq!(
        sinks[5].label(),
        "kubernetes-secret:payments/app-token[token.env]"
    );
    // Without a kubeconfig of its own, a Secret sink uses the store's.
    let with_store = text.replacen(
        "\n[[credentials]]",
        &format!(
            "\n[store]\nkind = \"kubernetes\"\nkubeconfig = \"{}\"\n[[credentials]]",
            kubeconfig.display()
        ),
        1,
    );
    let config = Config::from_toml(&with_store).unwrap();
    let kubeconfigs: Vec<_> = config.credentials[0]
        .sinks
        .iter()
        .filter_map(|s| match &s.target {
            SinkTarget::KubernetesSecret(k) => Some(k.kubeconfig.clone().unwrap()),
            SinkTarget::File(_) => None,
        })
        .collect();
    assert_eq!(
        kubeconfigs,
        [kubeconfig, std::path::PathBuf::from("/etc/kube.yaml")]
    );
}

/// `env` sinks of a token profile default to the profile's own variable:
/// the profile is a token of its own, which its readers tell apart from the
/// credential's (and `rekeyd token PROFILE --format env` prints the same).
#[test]
fn a_profiles_env_sink_is_named_after_the_profile() {
    let text = format!(
        "{BASE}[[credentials.sinks]]\npath = \"/run/rekeyd/maps.env\"\nformat = \"env\"\n\
         [[credentials.tokens]]\nname = \"maps-read-2\"\nscope = \"read\"\n\
         [[credentials.tokens.sinks]]\npath = \"/run/rekeyd/read.env\"\nformat = \"env\"\n"
    );
    let config = Config::from_toml(&text).unwrap();
    assert_eq!(
        config.credentials[0].sinks[0].format,
        SinkFormat::Env {
            variable: "REKEYD_MAPS_TOKEN".into()
        }
    );
    let (_, profile) = config.token_profile("maps-read-2").unwrap();
    assert_eq!(
        profile.sinks[0].format,
        SinkFormat::Env {
            variable: "REKEYD_MAPS_READ_2_TOKEN".into()
        }
    );
}

#[test]
fn before_expiry_alone_rotates_only_ahead_of_the_providers_expiry() {
    let text = format!("{BASE}[credentials.rotation]\nbefore_expiry = \"14d\"\n");
    let config = Config::from_toml(&text).unwrap();
    let rotation = config.credentials[0].rotation.as_ref().unwrap();
    assert_eq!(rotation.trigger, RotationTrigger::Manual);
    assert_eq!(
        rotation.before_expiry,
        Some(Duration::from_secs(14 * 86400))
    );
    // Unset: the default lead, which `rekeyd check` describes.
    let text = format!("{BASE}[credentials.rotation]\nevery = \"30d\"\n");
    let config = Config::from_toml(&text).unwrap();
    assert_eq!(
        config.credentials[0]
            .rotation
            .as_ref()
            .unwrap()
            .before_expiry,
        None
    );
}
