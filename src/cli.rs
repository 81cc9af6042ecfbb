//! Command-line interface.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "rekeyd",
    version = version_text(),
    about = "Keeps OAuth2 machine credentials alive: refreshes tokens, rotates client secrets, serves tokens locally.",
    after_help = "Exit status: 0 success, 1 runtime failure, 69 daemon or token unavailable, 78 configuration error.\n\
                  Logging: RUST_LOG (default \"info\"), e.g. RUST_LOG=rekeyd=debug."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// `rekeyd --version`'s text after the name: the version and the compiled
/// cargo features, e.g. `0.1.0 (features: none)` or `0.1.0 (features:
/// etcd,failpoints)`, so that a test build is recognizable.
pub fn version_text() -> &'static str {
    static TEXT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{} (features: {})",
            crate::build::VERSION,
            crate::build::features_text()
        )
    })
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Configuration file (TOML). REKEYD__* environment variables override its keys.
    #[arg(long, short, env = "REKEYD_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Do every credential's work once, then exit, for init containers,
    /// cron jobs and CI: finish any unfinished rotation, rotate where a
    /// rotation is due or `on_login = true`, log in, write the token files,
    /// run the hooks, print one line per credential. Exit 0 when every
    /// credential has a valid token in all of its files, 69 otherwise.
    /// Takes the rotation claim the daemon takes, waiting while another
    /// process (a running daemon, `rekeyd rotate`) rotates the same
    /// credential; serves no API.
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Print one JSON object (the verdict, the warnings and the effective
    /// configuration, or the error) on stdout and nothing on stderr: for CI
    /// gates.
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,
    /// Print only warnings and errors (on stderr), not the effective
    /// configuration: the unit's ExecStartPre=.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground until SIGTERM or SIGINT (or, with
    /// --once, every credential once, then exit).
    #[command(
        after_help = "One-shot use (--once): an init container before the application starts, \
a cron job or a CI step (`rekeyd run --once -c ci.toml && ./deploy.sh`). With \
`on_login = true` and `grace = \"0s\"` each run creates the next secret and deletes the old one. \
A grace period longer than a minute is left to the next run or the daemon.\n\
Exit status: 0 every credential has a valid token written, 69 one has not, 78 configuration error."
    )]
    Run(RunArgs),
    /// Validate the configuration and print the effective settings.
    #[command(after_help = "Exit status: 0 valid, 78 configuration error.\n\
--json prints one JSON object on stdout, also for an error: {\"valid\": true, \"file\": ..., \
\"warnings\": [...], \"config\": {...}} or {\"valid\": false, \"file\": ..., \"error\": \"...\"}. \
Secret values (extra_params) are shown as \"[redacted]\"; secret files by their path.")]
    Check(CheckArgs),
    /// Print a currently valid token of credential NAME (asks the running daemon).
    Token {
        /// Credential name, as in `[[credentials]] name`.
        name: String,
        /// Print it as a sink of this format writes it (default: the bare token
        /// and a newline); `exec-credential` makes this a kubectl exec plugin.
        #[arg(long, value_enum)]
        format: Option<TokenFormat>,
        /// The template file of `--format template` (placeholders as in README "Getting tokens").
        #[arg(long, value_name = "FILE")]
        template: Option<PathBuf>,
        /// Log in again now and print the new token (POST
        /// /v1/token/NAME/refresh), e.g. after the token was refused.
        /// Limited to one login per `refresh.min_forced_interval`.
        #[arg(long)]
        fresh: bool,
        /// With --fresh: the SHA-256 (64 hex digits) of the token that was
        /// refused. If the daemon already serves another token, that one
        /// is printed without a login.
        #[arg(long, value_name = "HEX", requires = "fresh")]
        rejected_sha256: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show each credential's token expiry, rotation phase and last error.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Rotate the client secret of NAME now (or finish an interrupted rotation);
    /// returns once the credential is stable. Safe while the daemon runs.
    Rotate {
        /// Credential name, as in `[[credentials]] name`.
        name: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Install a client secret by hand (value read from stdin), e.g. after
    /// someone else replaced the secret at the provider.
    SetSecret {
        /// Credential name, as in `[[credentials]] name`.
        name: String,
        /// The provider's id of the secret, so that a later rotation may delete it
        /// (not for a key: rekeyd names a key by its RFC 7638 thumbprint).
        #[arg(long)]
        id: Option<String>,
        /// Install it even if the provider does not accept it right now.
        #[arg(long)]
        no_verify: bool,
        /// Replace an unfinished rotation journal (after proving the secret
        /// logs in); the rotation's own secrets are deleted by the daemon.
        #[arg(long, conflicts_with = "no_verify")]
        force: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show the rotation history of credential NAME (read from the store),
    /// or check that the histories are intact (--verify).
    #[command(
        after_help = "The history is hash-chained: each entry carries the SHA-256 of the one before, so an edited, inserted or removed entry is found by --verify, which names the first bad entry.
Exit status: 0 shown or intact, 1 a history does not verify or cannot be read, 78 configuration error."
    )]
    History {
        /// Credential name, as in `[[credentials]] name` (with --verify:
        /// every configured credential when omitted).
        #[arg(required_unless_present = "verify")]
        name: Option<String>,
        /// Print JSON (the entries with their digests, and whether the
        /// chain verifies).
        #[arg(long, conflicts_with = "verify")]
        json: bool,
        /// Check the hash chain instead of printing the entries.
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print a shell completion script for SHELL on stdout, e.g.
    /// `rekeyd completions bash > /etc/bash_completion.d/rekeyd`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout: `rekeyd man | man -l -`;
    /// `rekeyd man run` prints rekeyd-run(1).
    Man {
        /// A subcommand whose page to print (rekeyd-SUBCOMMAND(1)).
        subcommand: Option<String>,
        /// Write every page (rekeyd.1, rekeyd-run.1, ...) into DIR instead.
        #[arg(long, value_name = "DIR", conflicts_with = "subcommand")]
        dir: Option<PathBuf>,
    },
    /// Run rekeyd against a built-in simulated provider, with short token lifetimes.
    Demo {
        /// Stop after this long (e.g. "90s"); "0s" runs until Ctrl-C.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Whose secret API the rotating credential uses (simulated).
        #[arg(long, value_enum, default_value_t = DemoProvider::Mapsindoors)]
        provider: DemoProvider,
    },
}

/// `rekeyd demo --provider`: the simulated profile the rotating credential
/// talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoProvider {
    /// Server-generated secrets, tagged, deleted after the grace period.
    Mapsindoors,
    /// A second secret with rekeyd's own value; the old one deactivated,
    /// then deleted.
    Okta,
    /// The one secret replaced atomically with rekeyd's own value, through
    /// an administrative client's token.
    Auth0,
    /// As Auth0, through Keycloak's admin API and the client's own token.
    Keycloak,
    /// Server-generated secrets tagged in their display name (Microsoft
    /// Graph), through a token profile for Graph.
    Entra,
}

/// `rekeyd token --format`: the sink formats ([`crate::format`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenFormat {
    Raw,
    Json,
    Header,
    /// `REKEYD_<NAME>_TOKEN=<token>`.
    Env,
    /// A client-go ExecCredential (client.authentication.k8s.io/v1).
    ExecCredential,
    /// `--template FILE` rendered.
    Template,
}
