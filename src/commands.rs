//! What each subcommand does. `main` only parses arguments and calls
//! [`execute`]; everything here is testable in-process.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::config::{
    Config, CredentialConfig, HookAction, ListenerLimits, RotationTrigger, StoreConfig,
};
use crate::proxy::ProxyEnv;

use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::rotation::driver::{Outcome, RotationError, Rotator, system_clock};
use crate::rotation::operator;
use crate::store;
use crate::{client, daemon, demo, logging, once, provider};

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILURE: u8 = 1;
/// EX_UNAVAILABLE: the daemon is not running or has no valid token.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// A command line clap accepted but rekeyd cannot use (clap's own
/// usage errors exit 2 as well).
pub const EXIT_USAGE: u8 = 2;
/// EX_CONFIG.
pub const EXIT_CONFIG: u8 = 78;

/// Runs a parsed command line and returns the process exit status.
pub async fn execute(cli: Cli) -> u8 {
    match cli.command {
        Command::Run(args) => {
            let path = &args.config.config;
            let Some(config) = load(path) else {
                return EXIT_CONFIG;
            };
            logging::init(config.log.format);
            warn_if_test_build();
            for warning in all_warnings(&config) {
                tracing::warn!(step = "config", "{warning}");
            }
            if args.once {
                return run_once(&config).await;
            }
            match daemon::run(path, config).await {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    tracing::error!(error = %e, "rekeyd cannot start");
                    eprintln!("rekeyd: {e}");
                    write_termination_log(&e.to_string());
                    e.exit_code()
                }
            }
        }
        Command::Check(args) if args.json => check_json(&args.config.config).await,
        Command::Check(args) => match load(&args.config.config) {
            Some(config) => {
                if !args.quiet {
                    println!("{}", effective_config(&config).await);
                }
                for warning in all_warnings(&config) {
                    eprintln!("rekeyd: warning: {warning}");
                }
                if !args.quiet {
                    eprintln!("rekeyd: {} is valid", args.config.config.display());
                }
                EXIT_OK
            }
            None => EXIT_CONFIG,
        },
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "rekeyd", &mut out);
            print_bytes(&out)
        }
        Command::Man { subcommand, dir } => man(subcommand.as_deref(), dir.as_deref()),
        Command::Token {
            name,
            format,
            template,
            fresh,
            rejected_sha256,
            config,
        } => {
            let Some(config) = load(&config.config) else {
                return EXIT_CONFIG;
            };
            if !config.serves_token(&name) {
                eprintln!(
                    "rekeyd: no credential named {name:?} in the configuration, nor a token \
                     profile ([[credentials.tokens]])"
                );
                return EXIT_CONFIG;
            }
            let format = match token_format(&name, format, template) {
                Ok(format) => format,
                Err(e) => {
                    eprintln!("rekeyd: {e}");
                    return EXIT_USAGE;
                }
            };
            // Checked here rather than by clap, whose message would quote
            // the value: a token pasted where its digest belongs (I7).
            if rejected_sha256
                .as_deref()
                .is_some_and(|hex| hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                eprintln!(
                    "rekeyd: --rejected-sha256 takes 64 hex digits, the SHA-256 of the refused token \
                     (e.g. the first field of `printf %s \"$TOKEN\" | sha256sum`)"
                );
                return EXIT_USAGE;
            }
            let api = config.api.as_ref();
            let reply = if fresh {
                let body = match rejected_sha256 {
                    Some(hex) => json!({ "rejected_sha256": hex }),
                    None => json!({}),
                };
                client::post_json(api, &format!("/v1/token/{name}/refresh"), &body).await
            } else {
                client::get_json(api, &format!("/v1/token/{name}")).await
            };
            match reply {
                Ok(body) => print_token(&body, format.as_ref()),
                Err(e) => {
                    eprintln!("rekeyd: {e}");
                    match e {
                        client::ClientError::NoApi => EXIT_CONFIG,
                        _ => EXIT_UNAVAILABLE,
                    }
                }
            }
        }
        Command::Status { json, config } => {
            let Some(config) = load(&config.config) else {
                return EXIT_CONFIG;
            };
            status(&config, json).await
        }
        Command::Rotate { name, config } => {
            let Some(config) = load(&config.config) else {
                return EXIT_CONFIG;
            };
            logging::init(config.log.format);
            rotate(&config, &name).await
        }
        Command::SetSecret {
            name,
            id,
            no_verify,
            force,
            config,
        } => {
            let Some(config) = load(&config.config) else {
                return EXIT_CONFIG;
            };
            logging::init(config.log.format);
            set_secret(&config, &name, id, !no_verify, force).await
        }
        Command::History {
            name,
            json,
            verify,
            config,
        } => {
            let Some(config) = load(&config.config) else {
                return EXIT_CONFIG;
            };
            history(&config, name.as_deref(), json, verify).await
        }
        Command::Demo { duration, provider } => {
            logging::init(Default::default());
            warn_if_test_build();
            let duration = (!duration.is_zero()).then_some(duration);
            match demo::run(duration, provider).await {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("rekeyd demo: {e}");
                    EXIT_FAILURE
                }
            }
        }
    }
}

/// A `failpoints` build aborts wherever FAILPOINTS says (the crash tests):
/// said loudly at every start of the daemon, so that such a binary is never
/// mistaken for a release in a log.
fn warn_if_test_build() {
    if crate::build::FEATURES.contains(&"failpoints") {
        tracing::warn!(
            step = "start",
            version = crate::build::VERSION,
            features = %crate::build::features_text(),
            "TEST BUILD: compiled with the `failpoints` feature, this rekeyd aborts on purpose \
             at the crash points named in FAILPOINTS; never run it in production"
        );
    }
}

/// `rekeyd man`: the pages clap_mangen renders from the clap definition,
/// rekeyd(1) and one per subcommand, named rekeyd-SUBCOMMAND(1) as the
/// main page's SUBCOMMANDS section refers to them. `subcommand` picks the
/// page printed; `dir` writes them all there as `<name>.1`.
fn man(subcommand: Option<&str>, dir: Option<&std::path::Path>) -> u8 {
    // Built as clap_mangen::generate_to builds it: the subcommands then
    // carry their full names (rekeyd-run) and the propagated --help.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    // The footer names the program and version on every page (a
    // subcommand has no version of its own).
    let source = format!("rekeyd {}", crate::build::VERSION);
    let mut pages = vec![cmd.clone()];
    pages.extend(cmd.get_subcommands().filter(|c| !c.is_hide_set()).cloned());
    if let Some(dir) = dir {
        for page in pages {
            let man = clap_mangen::Man::new(page).source(source.clone());
            if let Err(e) = man.generate_to(dir) {
                eprintln!(
                    "rekeyd: cannot write the manual pages to {}: {e}",
                    dir.display()
                );
                return EXIT_FAILURE;
            }
        }
        return EXIT_OK;
    }
    let page = match subcommand {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub.clone(),
            None => {
                eprintln!("rekeyd: no subcommand {name:?} (see rekeyd --help)");
                return EXIT_USAGE;
            }
        },
    };
    let mut out = Vec::new();
    match clap_mangen::Man::new(page).source(source).render(&mut out) {
        Ok(()) => print_bytes(&out),
        Err(e) => {
            eprintln!("rekeyd: cannot render the manual page: {e}");
            EXIT_FAILURE
        }
    }
}

/// Writes generated text (completions, the man page) to stdout; a closed
/// pipe (`rekeyd man | head`) is a failure, not a panic.
fn print_bytes(bytes: &[u8]) -> u8 {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => EXIT_OK,
        Err(_) => EXIT_FAILURE,
    }
}

/// `rekeyd check --json`: one JSON object on stdout whatever the outcome,
/// for CI gates; exit 0 valid, 78 not. The error text is the one `rekeyd
/// check` prints (it names the key, never a secret value).
async fn check_json(path: &std::path::Path) -> u8 {
    let file = path.display().to_string();
    let (doc, code) = match Config::load(path) {
        Ok(config) => {
            let effective: Value =
                serde_json::from_str(&effective_config(&config).await).expect("our own JSON");
            let warnings: Vec<String> = all_warnings(&config)
                .iter()
                .map(|w| w.to_string())
                .collect();
            (
                json!({"valid": true, "file": file, "warnings": warnings, "config": effective}),
                EXIT_OK,
            )
        }
        Err(e) => (
            json!({"valid": false, "file": file, "error": format!("configuration error: {e}")}),
            EXIT_CONFIG,
        ),
    };
    match print_bytes(format!("{}\n", serde_json::to_string_pretty(&doc).expect("json")).as_bytes())
    {
        EXIT_OK => code,
        failed => failed,
    }
}

/// `rekeyd run --once`: one line per credential on stdout (the logs go to
/// stderr), 0 when every credential has a valid token written, 69 when
/// one has not, 78 for a configuration error found before anything was
/// touched.
async fn run_once(config: &Config) -> u8 {
    let stop = CancellationToken::new();
    daemon::spawn_signal_listener(stop.clone());
    match once::run(config, stop).await {
        Ok(reports) => {
            for report in &reports {
                println!("{}", report.line());
            }
            if reports.iter().all(|r| r.ok) {
                EXIT_OK
            } else {
                EXIT_UNAVAILABLE
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "rekeyd run --once cannot start");
            eprintln!("rekeyd: {e}");
            write_termination_log(&e.to_string());
            match e.exit_code() {
                EXIT_CONFIG => EXIT_CONFIG,
                _ => EXIT_UNAVAILABLE,
            }
        }
    }
}

/// The format `rekeyd token` prints in; `None`: the bare token and a
/// newline, as always.
fn token_format(
    name: &str,
    format: Option<crate::cli::TokenFormat>,
    template: Option<std::path::PathBuf>,
) -> Result<Option<crate::config::SinkFormat>, String> {
    use crate::cli::TokenFormat;
    use crate::config::SinkFormat;
    let format = match (format, template) {
        (None | Some(TokenFormat::Template), Some(path)) => {
            let template = crate::format::TokenTemplate::load(&path)
                .map_err(|e| format!("--template {}: {e}", path.display()))?;
            return Ok(Some(SinkFormat::Template(template)));
        }
        (Some(TokenFormat::Template), None) => {
            return Err("--format template needs --template FILE".into());
        }
        (Some(_), Some(_)) => return Err("--template goes with --format template only".into()),
        (None, None) => return Ok(None),
        (Some(format), None) => format,
    };
    Ok(Some(match format {
        TokenFormat::Raw => SinkFormat::Raw,
        TokenFormat::Json => SinkFormat::Json,
        TokenFormat::Header => SinkFormat::Header,
        TokenFormat::Env => SinkFormat::Env {
            variable: crate::format::default_env_variable(name),
        },
        TokenFormat::ExecCredential => SinkFormat::ExecCredential,
        TokenFormat::Template => unreachable!("handled above"),
    }))
}

/// Prints the token of a `GET /v1/token/{name}` reply in `format`.
fn print_token(body: &Value, format: Option<&crate::config::SinkFormat>) -> u8 {
    use std::io::Write;
    let Some(token) = body["access_token"].as_str() else {
        eprintln!("rekeyd: the daemon's reply has no access_token");
        return EXIT_FAILURE;
    };
    let Some(format) = format else {
        println!("{token}");
        return EXIT_OK;
    };
    let expires_at = body["expires_at"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok());
    let Some(expires_at) = expires_at else {
        eprintln!("rekeyd: the daemon's reply has no valid expires_at");
        return EXIT_FAILURE;
    };
    let view = crate::format::TokenView {
        access_token: token,
        token_type: body["token_type"].as_str().unwrap_or("Bearer"),
        expires_at,
    };
    let mut bytes = match crate::format::render(view, format) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("rekeyd: {e}");
            return EXIT_FAILURE;
        }
    };
    // The raw file has no newline; a terminal and `$(...)` want one.
    if matches!(format, crate::config::SinkFormat::Raw) {
        bytes.push(b'\n');
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(&bytes).and_then(|()| out.flush()) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("rekeyd: cannot write the token: {e}");
            EXIT_FAILURE
        }
    }
}

async fn rotate(config: &Config, name: &str) -> u8 {
    let Some(cred) = config.credential(name) else {
        eprintln!("rekeyd: no credential named {name:?} in the configuration");
        return EXIT_CONFIG;
    };
    let (provider, secret_api) = match provider::build_all(cred, &Default::default()) {
        Ok(provider::Built {
            token,
            secrets: Some(api),
        }) => (token, api),
        Err(e) => {
            eprintln!("rekeyd: {e}");
            return EXIT_FAILURE;
        }
        Ok(provider::Built { secrets: None, .. }) => {
            eprintln!("rekeyd: credential {name:?} has no secret API configured");
            return EXIT_CONFIG;
        }
    };
    let store = match store::open(config).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("rekeyd: {e}");
            return EXIT_UNAVAILABLE;
        }
    };
    // Without a rotation section, an unfinished journal is still finished
    // (it must always be); only a new rotation needs the section.
    let begin = cred.rotation.is_some();
    if !begin {
        match store.load(name).await {
            Ok(Some(r)) if r.value.is_unfinished() => {}
            Ok(_) => {
                eprintln!("rekeyd: credential {name:?} has no [credentials.rotation] section");
                return EXIT_CONFIG;
            }
            Err(e) => {
                eprintln!("rekeyd: {e}");
                return EXIT_UNAVAILABLE;
            }
        }
    }
    // A first rotation may come before the daemon ever ran.
    let index = config
        .credentials
        .iter()
        .position(|c| c.name == name)
        .expect("credential found above");
    if let Err(e) = daemon::ensure_bootstrapped(config, index, store.as_ref()).await {
        eprintln!("rekeyd: {e}");
        return e.exit_code();
    }
    let secret_api_bearer = match daemon::secret_api_bearer(cred, &Default::default(), &store) {
        Ok(bearer) => bearer,
        Err(e) => {
            eprintln!("rekeyd: {e}");
            return EXIT_FAILURE;
        }
    };
    let rotator = Rotator {
        name: cred.name.clone(),
        client_id: cred.client_id.clone(),
        provider,
        secret_api,
        secret_api_bearer,
        store,
        grace: cred
            .rotation
            .as_ref()
            .map_or(crate::config::DEFAULT_ROTATION_GRACE, |r| r.grace),
        verify_window: cred.verify_window(),
        status: None,
        refresh_now: None,
        clock: system_clock(),
    };
    let shutdown = CancellationToken::new();
    daemon::spawn_signal_listener(shutdown.clone());
    // Waits for a rotation the daemon may be running, then does its own.
    // Ctrl-C stops it between steps, never inside a journal write (S4).
    let span = tracing::info_span!("credential", name = %name);
    let result =
        tracing::Instrument::instrument(rotator.rotate(begin, true, &shutdown), span).await;
    match result {
        Ok(Outcome::Rotated) => {
            eprintln!("rekeyd: {name}: secret rotated");
            EXIT_OK
        }
        Ok(Outcome::Aborted) => {
            eprintln!("rekeyd: {name}: the provider refused the new secret; the old one is kept");
            EXIT_FAILURE
        }
        Ok(Outcome::Idle) if !begin => {
            eprintln!("rekeyd: {name}: the unfinished rotation is finished");
            EXIT_OK
        }
        Ok(Outcome::Idle) => EXIT_OK,
        Err(e) => {
            // Shutdown and ClaimLost say so themselves.
            let resumable = matches!(e, RotationError::Provider(_));
            let hint = if resumable {
                " (the journal resumes it next time)"
            } else {
                ""
            };
            eprintln!("rekeyd: {name}: rotation stopped: {e}{hint}");
            EXIT_FAILURE
        }
    }
}

async fn set_secret(
    config: &Config,
    name: &str,
    mut id: Option<String>,
    verify: bool,
    force: bool,
) -> u8 {
    let Some(cred) = config.credential(name) else {
        eprintln!("rekeyd: no credential named {name:?} in the configuration");
        return EXIT_CONFIG;
    };
    let mut input = String::new();
    if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
        eprintln!("rekeyd: cannot read the secret from stdin: {e}");
        return EXIT_FAILURE;
    }
    let value = SecretString::from(input.trim().to_string());
    if value.expose_secret().is_empty() {
        eprintln!("rekeyd: no secret on stdin");
        return EXIT_FAILURE;
    }
    // A private_key_jwt credential stores its key as a private JWK
    // (provider::key): a PEM or JWK on stdin is converted, and checked.
    let value = match cred.auth_method {
        crate::config::AuthMethod::ClientAssertionFile => {
            eprintln!(
                "rekeyd: credential {name:?} authenticates with client_assertion_file: nothing is stored for it"
            );
            return EXIT_CONFIG;
        }
        crate::config::AuthMethod::PrivateKeyJwt => {
            match provider::key::ClientKey::from_file_text(value.expose_secret()) {
                // A key is listed (and withdrawn) by its RFC 7638
                // thumbprint, whatever id a server gives it.
                Ok(key) => {
                    let thumbprint = key.thumbprint();
                    if id.as_ref().is_some_and(|given| *given != thumbprint) {
                        eprintln!(
                            "rekeyd: --id does not apply to a key: rekeyd names a published key by its RFC 7638 thumbprint ({thumbprint}); leave --id out"
                        );
                        return EXIT_USAGE;
                    }
                    id = Some(thumbprint);
                    key.to_secret()
                }
                Err(e) => {
                    eprintln!("rekeyd: the private key on stdin {e}");
                    return EXIT_FAILURE;
                }
            }
        }
        _ => value,
    };
    let provider = match provider::build(cred) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rekeyd: {e}");
            return EXIT_FAILURE;
        }
    };
    let store = match store::open(config).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("rekeyd: {e}");
            return EXIT_UNAVAILABLE;
        }
    };
    let shutdown = CancellationToken::new();
    daemon::spawn_signal_listener(shutdown.clone());
    let request = operator::SetSecret {
        name,
        value,
        id,
        verify,
        force,
        // No sweep finds an untagged secret rekeyd replaced (Okta).
        retire_replaced: provider::capabilities_of(cred).is_some_and(|c| !c.tags),
    };
    match operator::set_secret(store.as_ref(), provider.as_ref(), request, &shutdown).await {
        Ok(installed) => {
            if let Some(phase) = installed.replaced_phase {
                eprintln!(
                    "rekeyd: {name}: replaced an unfinished rotation journal (phase {phase})"
                );
            }
            if !installed.retiring.is_empty() {
                eprintln!(
                    "rekeyd: {name}: secrets to be deleted by the daemon once a listing shows they are this client's: {}",
                    installed.retiring.join(", ")
                );
            }
            if let Some(id) = &installed.left_in_place {
                eprintln!(
                    "rekeyd: {name}: the replaced secret {id} is left in place at the provider (the new one was not verified): remove it there once the new one works"
                );
            }
            eprintln!("rekeyd: {name}: secret installed; the daemon uses it from its next login");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("rekeyd: {name}: {e}");
            match e {
                operator::SetSecretError::Store(_) => EXIT_UNAVAILABLE,
                _ => EXIT_FAILURE,
            }
        }
    }
}

/// `rekeyd history`: prints a credential's rotation history, or with
/// `verify` checks the chain of one or every configured credential.
async fn history(config: &Config, name: Option<&str>, as_json: bool, verify: bool) -> u8 {
    use crate::history::{self, chain};
    let names: Vec<&str> = match name {
        Some(name) if config.credential(name).is_none() => {
            eprintln!("rekeyd: no credential named {name:?} in the configuration");
            return EXIT_CONFIG;
        }
        Some(name) => vec![name],
        None => config.credentials.iter().map(|c| c.name.as_str()).collect(),
    };
    let store = match store::open(config).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("rekeyd: {e}");
            return EXIT_UNAVAILABLE;
        }
    };
    let mut status = EXIT_OK;
    for name in names {
        let doc = match history::load(store.as_ref(), name).await {
            Ok(doc) => doc,
            Err(e) => {
                eprintln!("rekeyd: {e}");
                status = EXIT_FAILURE;
                continue;
            }
        };
        if verify {
            match &doc {
                None => println!("{name}: no history yet"),
                Some(doc) => match chain::verify(doc, name) {
                    Ok(()) => println!("{name}: {} entries, chain intact", doc.entries.len()),
                    Err(e) => {
                        eprintln!("rekeyd: {name}: history does not verify: {e}");
                        status = EXIT_FAILURE;
                    }
                },
            }
            continue;
        }
        let doc = doc.unwrap_or_else(|| chain::Document::new(name));
        if as_json {
            let value = history::to_json(&doc, name);
            println!("{}", serde_json::to_string_pretty(&value).expect("json"));
            continue;
        }
        println!(
            "{:<6} {:<24} {:<15} {:<22} {:<24} DETAIL",
            "SEQ", "AT", "STEP", "ROTATION", "SECRET ID"
        );
        for e in &doc.entries {
            let detail = match (e.step, e.dropped) {
                (chain::Step::Truncated, Some(n)) => format!("{n} older entries dropped"),
                _ => e.detail.clone().unwrap_or_default(),
            };
            println!(
                "{:<6} {:<24} {:<15} {:<22} {:<24} {}",
                e.seq,
                printable(&e.at),
                e.step.as_str(),
                printable(e.rid.as_deref().unwrap_or("-")),
                printable(e.secret_id.as_deref().unwrap_or("-")),
                printable(&detail)
            );
        }
        if let Err(e) = chain::verify(&doc, name) {
            eprintln!("rekeyd: {name}: history does not verify: {e}");
            status = EXIT_FAILURE;
        }
    }
    status
}

/// `text` for a terminal: control characters escaped (`\u{1b}`, `\r`).
/// A history's fields come from the store and, for secret ids, from the
/// provider's replies; neither may move the cursor, rewrite earlier rows or
/// retitle the operator's terminal (escape sequences), nor forge a row with
/// a line break.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    crate::provider::redact::escape_controls(text)
}

fn load(path: &std::path::Path) -> Option<Config> {
    match Config::load(path) {
        Ok(config) => Some(config),
        Err(e) => {
            eprintln!("rekeyd: configuration error: {e}");
            write_termination_log(&format!("configuration error: {e}"));
            None
        }
    }
}

/// The configuration's warnings, and what this process could not do with
/// it (set a token file's owner or group).
fn all_warnings(config: &Config) -> Vec<crate::config::ConfigWarning> {
    let me = crate::serve::sink::Privileges::of_this_process();
    let mut warnings = config.warnings();
    warnings.extend(crate::serve::sink::ownership_warnings(config, &me));
    warnings
}

/// Kubernetes shows this file's content as the reason a container ended.
const TERMINATION_LOG: &str = "/dev/termination-log";

fn write_termination_log(reason: &str) {
    if std::path::Path::new(TERMINATION_LOG).exists() {
        let _ = std::fs::write(TERMINATION_LOG, reason);
    }
}

async fn status(config: &Config, as_json: bool) -> u8 {
    let (rows, daemon_error) = match client::get_json(config.api.as_ref(), "/v1/status").await {
        Ok(body) => (
            body["credentials"].as_array().cloned().unwrap_or_default(),
            None,
        ),
        // The daemon is down: the store still tells the rotation state.
        Err(e) => (stored_status(config).await, Some(e.to_string())),
    };
    if as_json {
        let out = json!({"daemon_reachable": daemon_error.is_none(), "daemon_error": daemon_error, "credentials": rows});
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        if let Some(e) = &daemon_error {
            println!("daemon: not reachable ({e}); showing stored state only");
        }
        println!(
            "{:<20} {:<12} {:<6} {:<22} {:<10} {:<22} LAST ERROR",
            "NAME", "PROVIDER", "READY", "TOKEN EXPIRES", "ROTATION", "LAST ROTATED"
        );
        for row in &rows {
            let s = |k: &str| s_of(row, k);
            println!(
                "{:<20} {:<12} {:<6} {:<22} {:<10} {:<22} {}",
                s("name"),
                s("provider"),
                row["ready"]
                    .as_bool()
                    .map_or("-", |r| if r { "yes" } else { "no" }),
                s("token_expires_at"),
                s("rotation_phase"),
                s("last_rotated_at"),
                s("last_error"),
            );
        }
        // Token files that do not hold the token being served, and why.
        for row in &rows {
            for sink in row["sinks"].as_array().into_iter().flatten() {
                let freshness = sink["freshness"].as_str().unwrap_or("-");
                let failures = sink["consecutive_failures"].as_u64().unwrap_or(0);
                if freshness == "current" && failures == 0 {
                    continue;
                }
                let mut line = format!(
                    "{}: token file {} holds {}",
                    s_of(row, "name"),
                    s_of(sink, "path"),
                    match freshness {
                        "old" => "an older token",
                        "expired" => "an expired token",
                        "missing" => "no token yet",
                        _ => "the current token",
                    }
                );
                if let Some(e) = sink["last_error"].as_str() {
                    line.push_str(&format!("; {failures} failed writes, last: {e}"));
                }
                println!("{line}");
            }
        }
        // Key-based clients: the key in use and its age, or the file.
        for row in &rows {
            if let Some(file) = row["assertion_file"].as_str() {
                println!(
                    "{}: client_assertion_file, assertion read from {file}",
                    s_of(row, "name")
                );
            }
            if let Some(kid) = row["key_id"].as_str() {
                let age = (row["key_created_at"].as_str())
                    .and_then(|t| humantime::parse_rfc3339(t).ok())
                    .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
                    .map_or("-".to_string(), |d| {
                        humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
                            .to_string()
                    });
                println!(
                    "{}: private_key_jwt, key {kid}, age {age}",
                    s_of(row, "name")
                );
            }
        }
        // Which tokens are profiles of which credential.
        for row in &rows {
            if let Some(credential) = row["profile_of"].as_str() {
                println!(
                    "{}: token profile of credential {credential} (its secret and rotation)",
                    s_of(row, "name")
                );
            }
        }
        // An unfinished journal: what it waits for and the way out.
        for row in &rows {
            if let Some(warning) = row["secret_expiry_warning"].as_str() {
                println!("{}: {warning}", s_of(row, "name"));
            }
            if let Some(reason) = row["rotation_needs_operator"].as_str() {
                println!(
                    "{name}: rotation needs operator: {reason} (fix it at the provider, then `rekeyd rotate {name}`)",
                    name = s_of(row, "name")
                );
            }
            if let Some(waiting) = row["rotation_waiting_for"].as_str() {
                println!("{}: rotation waiting for {waiting}", s_of(row, "name"));
                if let Some(e) = row["last_rotation_error"].as_str() {
                    println!("{}: last rotation error: {e}", s_of(row, "name"));
                }
            }
        }
    }
    if daemon_error.is_some() {
        EXIT_UNAVAILABLE
    } else {
        EXIT_OK
    }
}

fn s_of(row: &Value, key: &str) -> String {
    row[key].as_str().unwrap_or("-").to_string()
}

async fn stored_status(config: &Config) -> Vec<Value> {
    let store = match store::open(config).await {
        Ok(store) => store,
        Err(e) => {
            return config
                .credentials
                .iter()
                .map(|c| json!({"name": c.name, "provider": c.provider.as_str(), "last_error": e.to_string()}))
                .collect();
        }
    };
    let mut rows = Vec::new();
    for cred in &config.credentials {
        let mut row = json!({"name": cred.name, "provider": cred.provider.as_str()});
        match store.load(&cred.name).await {
            Ok(Some(record)) => {
                row["rotation_phase"] = json!(record.value.phase());
                row["rotation_waiting_for"] =
                    json!(crate::rotation::waiting_for(&record.value, &cred.name));
                row["last_rotated_at"] = json!(
                    record
                        .value
                        .last_rotated_at
                        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                );
                // The journal knows the expiry and can tell the warning
                // without the daemon (the same rule as the daemon's).
                let current = &record.value.current;
                row["secret_expires_at"] = json!(
                    current
                        .expires_at
                        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                );
                row["secret_expiry_warning"] = json!(crate::rotation::driver::expiry_warning_at(
                    &record.value,
                    cred.rotation.as_ref(),
                    SystemTime::now(),
                ));
            }
            Ok(None) if cred.stores_nothing() => {}
            Ok(None) => row["last_error"] = json!("no secret stored yet"),
            Err(e) => row["last_error"] = json!(e.to_string()),
        }
        // The method, key id and age (private_key_jwt) or file in use.
        let current = match store.load(&cred.name).await {
            Ok(Some(record)) => Some(record.value.current),
            _ => None,
        };
        if let Some(auth) = crate::credential::ClientAuthStatus::of(cred, current.as_ref())
            && let (Some(row), Ok(Value::Object(auth))) =
                (row.as_object_mut(), serde_json::to_value(auth))
        {
            row.extend(auth);
        }
        rows.push(row);
        // A profile's token lives only in the daemon; what the store tells
        // is its credential's.
        for profile in &cred.tokens {
            rows.push(json!({
                "name": profile.name,
                "provider": cred.provider.as_str(),
                "profile_of": cred.name,
            }));
        }
    }
    rows
}

/// The configuration as rekeyd understood it, defaults filled in. Holds no
/// secret values (those live in files); operator-supplied extra form fields
/// are redacted because they may carry assertions. Each endpoint's
/// `*_proxy` says how requests to it travel ([`crate::proxy`]), with any
/// proxy credentials redacted.
pub async fn effective_config(config: &Config) -> String {
    let dur = |d: Duration| humantime::format_duration(d).to_string();
    let proxies = ProxyEnv::from_env();
    // The API server (and its route) of every Kubernetes Secret sink, by
    // the kubeconfig it names: sinks share few of them.
    let mut api_servers = ApiServers::new();
    for cred in &config.credentials {
        let sinks = cred
            .sinks
            .iter()
            .chain(cred.tokens.iter().flat_map(|t| &t.sinks));
        for sink in sinks {
            if let crate::config::SinkTarget::KubernetesSecret(k) = &sink.target
                && !api_servers.contains_key(&k.kubeconfig)
            {
                let shown = api_server_json(k.kubeconfig.as_deref()).await;
                api_servers.insert(k.kubeconfig.clone(), shown);
            }
        }
    }
    let credentials: Vec<Value> = config
        .credentials
        .iter()
        .map(|c| credential_json(c, &dur, &proxies, &api_servers))
        .collect();
    let mut store = store_json(&config.store, &dur).await;
    store["history_limit"] = json!(config.history_limit);
    let doc = json!({
        "state_dir": config.state_dir.display().to_string(),
        "api": config.api.as_ref().map(|a| {
            let mut api = limits_json(&a.limits, &dur);
            api["listen"] = json!(a.listen.to_string());
            api["key_file"] = json!(a.key_file.display().to_string());
            api
        }),
        "diag": config.diag.as_ref().map(|d| {
            let mut diag = limits_json(&d.limits, &dur);
            diag["listen"] = json!(d.listen.to_string());
            diag
        }),
        "log": {"format": format!("{:?}", config.log.format).to_lowercase()},
        "store": store,
        "credentials": credentials,
        // Set but unused (HTTP_PROXY, a SOCKS proxy): said, not silently
        // dropped.
        "proxy_variables_ignored": (!proxies.ignored().is_empty()).then(|| proxies.ignored()),
    });
    serde_json::to_string_pretty(&strip_nulls(doc)).expect("json")
}

fn limits_json(limits: &ListenerLimits, dur: &dyn Fn(Duration) -> String) -> Value {
    json!({
        "max_connections": limits.max_connections,
        "header_timeout": dur(limits.header_timeout),
        "request_timeout": dur(limits.request_timeout),
        "idle_timeout": dur(limits.idle_timeout),
    })
}

/// Kubernetes API servers by the kubeconfig that names them (`None`: in
/// the cluster, else `KUBECONFIG`), as [`api_server_json`] shows them.
type ApiServers = std::collections::BTreeMap<Option<std::path::PathBuf>, (Option<String>, String)>;

/// The API server a Kubernetes client of rekeyd talks to and how its
/// requests travel ([`crate::proxy`]). The address comes from the
/// kubeconfig or the pod's environment: read them (nothing is contacted).
async fn api_server_json(kubeconfig: Option<&std::path::Path>) -> (Option<String>, String) {
    match store::kubernetes::cluster_config(kubeconfig).await {
        Ok((client, route)) => (Some(client.cluster_url.to_string()), route.describe()),
        Err(e) => (None, format!("unknown ({e})")),
    }
}

async fn store_json(store: &StoreConfig, dur: &dyn Fn(Duration) -> String) -> Value {
    match store {
        StoreConfig::File => json!({"kind": "file"}),
        StoreConfig::Kubernetes(k) => {
            let (api_server, proxy) = api_server_json(k.kubeconfig.as_deref()).await;
            json!({
                "kind": "kubernetes",
                "namespace": k.namespace,
                "secret": k.secret,
                "lease": k.lease,
                "kubeconfig": k.kubeconfig.as_ref().map(|p| p.display().to_string()),
                "claim_ttl": dur(k.claim_ttl),
                "api_server": api_server,
                "api_server_proxy": proxy,
            })
        }
        StoreConfig::Etcd(e) => json!({
            "kind": "etcd",
            "endpoints": e.endpoints,
            "endpoints_proxy": "direct (the etcd client never uses a proxy)",
            "prefix": e.prefix,
            "claim_ttl": dur(e.claim_ttl),
            "ca_file": e.tls.as_ref().map(|t| t.ca_file.display().to_string()),
            "cert_file": e.tls.as_ref().and_then(|t| t.client.as_ref()).map(|c| c.cert_file.display().to_string()),
            "key_file": e.tls.as_ref().and_then(|t| t.client.as_ref()).map(|c| c.key_file.display().to_string()),
            "username": e.auth.as_ref().map(|a| a.username.clone()),
            "password_file": e.auth.as_ref().map(|a| a.password_file.display().to_string()),
        }),
    }
}

fn credential_json(
    c: &CredentialConfig,
    dur: &dyn Fn(Duration) -> String,
    proxies: &ProxyEnv,
    api_servers: &ApiServers,
) -> Value {
    let sink_json = |s| sink_json(s, api_servers);
    json!({
        "name": c.name,
        "provider": c.provider.as_str(),
        "client_id": c.client_id,
        "customer_id": c.customer_id,
        "ids": c.ids.as_deref().map(|ids| ids.fields().into_iter().collect::<serde_json::Map<_, _>>()),
        // private_key_jwt keeps its initial_key_file there.
        (if c.auth_method == crate::config::AuthMethod::PrivateKeyJwt {
            "initial_key_file"
        } else {
            "initial_secret_file"
        }): c.initial_secret_file.as_ref().map(|p| p.display().to_string()),
        "initial_secret_credential": c.initial_secret_credential,
        "initial_secret_id": c.initial_secret_id,
        "scope": c.scope,
        "audience": c.audience,
        "auth_method": c.auth_method.as_str(),
        "assertion_audience": c.assertion.as_ref().and_then(|a| a.audience.clone()),
        "client_assertion_file": c.assertion.as_ref().and_then(|a| a.file.as_ref()).map(|p| p.display().to_string()),
        "extra_params": c.extra_params.keys().map(|k| (k.clone(), json!("[redacted]"))).collect::<serde_json::Map<_, _>>(),
        "endpoints": {
            "token_url": c.endpoints.token_url.as_str(),
            "token_url_proxy": proxies.route(&c.endpoints.token_url).describe(),
            "secrets_url": c.endpoints.secrets_url.as_ref().map(|u| u.as_str()),
            "secrets_url_proxy": c.endpoints.secrets_url.as_ref().map(|u| proxies.route(u).describe()),
            "connect_timeout": dur(c.endpoints.connect_timeout),
            "request_timeout": dur(c.endpoints.request_timeout),
        },
        "registration": c.registration.as_deref().map(|r| json!({
            "client_uri": r.client_uri.as_str(),
            "client_uri_proxy": proxies.route(&r.client_uri).describe(),
            "access_token_file": r.access_token_file.display().to_string(),
        })),
        "jwks": c.jwks.as_deref().map(|j| json!({
            "file": j.file.as_ref().map(|f| f.display().to_string()),
            "serve_path": j.serve_path,
            "kubernetes_secret": j.kubernetes_secret.as_ref().map(|s| s.secret.clone()),
        })),
        "refresh": {
            "before_expiry": c.refresh.before_expiry.map(dur).unwrap_or_else(|| "70-80% of lifetime".into()),
            "default_lifetime": dur(c.refresh.default_lifetime),
            "min_forced_interval": dur(c.refresh.min_forced_interval),
        },
        "rotation": c.rotation.as_ref().map(|r| json!({
            "every": match &r.trigger { RotationTrigger::Every(d) => Some(dur(*d)), _ => None },
            "schedule": match &r.trigger { RotationTrigger::Schedule(s) => Some(s.clone()), _ => None },
            "grace": dur(r.grace),
            "on_login": r.on_login,
            "max_secret_age": r.max_secret_age.map(dur),
            "verify_window": dur(c.verify_window()),
            // Where the provider says when the secret expires (Entra).
            "before_expiry": r.before_expiry.map(dur).unwrap_or_else(|| crate::rotation::schedule::DEFAULT_EXPIRY_LEAD_TEXT.into()),
            "secret_api_credential": c.secret_api_credential.as_ref().map(|a| a.name.clone()),
            // The path the rotation takes with this provider's secret API.
            "path": crate::provider::capabilities_of(c).map(|caps| caps.path()),
        })),
        "hooks": c.hooks.iter().map(|h| {
            let on: Vec<&str> = h.on.iter().map(|e| e.as_str()).collect();
            match &h.action {
                HookAction::Command { argv, timeout } => json!({"on": on, "command": argv, "timeout": dur(*timeout)}),
                HookAction::Signal { name, pid_file, .. } => json!({"on": on, "signal": name, "pid_file": pid_file.display().to_string()}),
            }
        }).collect::<Vec<_>>(),
        "sinks": c.sinks.iter().map(sink_json).collect::<Vec<_>>(),
        "tokens": (!c.tokens.is_empty()).then(|| c.tokens.iter().map(|t| json!({
            "name": t.name,
            "scope": t.scope,
            "audience": t.audience,
            "extra_params": t.extra_params.keys().map(|k| (k.clone(), json!("[redacted]"))).collect::<serde_json::Map<_, _>>(),
            "sinks": t.sinks.iter().map(sink_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()),
    })
}

fn sink_json(s: &crate::config::SinkConfig, api_servers: &ApiServers) -> Value {
    use crate::config::{SinkFormat, SinkTarget};
    let mut out = match &s.target {
        SinkTarget::File(f) => json!({
            "kind": "file",
            "path": f.path.display().to_string(),
            "mode": format!("{:04o}", f.mode),
            "owner": f.owner.as_ref().map(|o| &o.shown),
            "group": f.group.as_ref().map(|g| &g.shown),
        }),
        SinkTarget::KubernetesSecret(k) => json!({
            "kind": "kubernetes-secret",
            "namespace": k.namespace,
            "secret": k.secret,
            "key": k.key,
            "kubeconfig": k.kubeconfig.as_ref().map(|p| p.display().to_string()),
            "api_server": api_servers.get(&k.kubeconfig).and_then(|(server, _)| server.clone()),
            "api_server_proxy": api_servers.get(&k.kubeconfig).map(|(_, proxy)| proxy),
        }),
    };
    out["format"] = json!(s.format.as_str());
    match &s.format {
        SinkFormat::Env { variable } => out["variable"] = json!(variable),
        SinkFormat::Template(t) => out["template"] = json!(t.path().display().to_string()),
        _ => {}
    }
    out
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}
