//! Programs and machine features some tests need beyond the Rust toolchain.
//!
//! The README's test command must pass on a fresh machine that has only
//! the Rust toolchain and the package registries. A test that needs more
//! (promtool, systemd-analyze, kubectl, Node.js, etcd, a private mount
//! namespace) asks here first. When it is missing the test prints, on the
//! terminal and past the test harness's output capture, that it was skipped
//! and why, and passes. With `REKEYD_REQUIRE_TOOLS=1` (set by `.ci/run`) a
//! missing tool fails the test instead, so CI never skips.
//!
//! Include with `#[path = "support/tools.rs"] mod tools;`.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// Set to `1` to turn every skip for a missing tool into a failure.
pub const REQUIRE_VAR: &str = "REKEYD_REQUIRE_TOOLS";

/// Whether missing tools fail the tests (`REKEYD_REQUIRE_TOOLS=1`).
pub fn required() -> bool {
    std::env::var(REQUIRE_VAR).as_deref() == Ok("1")
}

/// The path of `program` on `PATH`. When it is not there the calling test
/// is skipped (see [`skip`]): `install` says how to get it, e.g.
/// `"apt-get install prometheus"`.
pub fn find(program: &str, install: &str) -> Option<PathBuf> {
    let found = on_path(program);
    if found.is_none() {
        skip(&format!("{program} is not on PATH ({install})"));
    }
    found
}

/// The path of `program` on `PATH`, without reporting anything.
pub fn on_path(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Reports that the calling test does not run its checks because `why`
/// (a tool or feature of the machine is missing). Returns, so the caller
/// can `return` and pass; under `REKEYD_REQUIRE_TOOLS=1` fails the test.
pub fn skip(why: &str) {
    if required() {
        panic!("{why}; {REQUIRE_VAR}=1 requires it");
    }
    announce(&format!(
        "SKIPPED {}: {why} (set {REQUIRE_VAR}=1 to fail instead)",
        test_name()
    ));
}

/// Reports that the calling test was not asked to run (an opt-in test,
/// e.g. one that boots a container). Never fails, whatever
/// `REKEYD_REQUIRE_TOOLS` says: such tests are left to a manual run.
pub fn not_requested(how: &str) {
    announce(&format!("SKIPPED {} (opt-in): {how}", test_name()));
}

/// The running test's name: the test harness names each test's thread
/// after it.
fn test_name() -> String {
    let binary = std::env::args()
        .next()
        .and_then(|a| {
            let name = PathBuf::from(a).file_name()?.to_string_lossy().into_owned();
            // Cargo appends `-<hash>` to test binaries.
            Some(
                name.rsplit_once('-')
                    .map_or(name.clone(), |(n, _)| n.to_string()),
            )
        })
        .unwrap_or_default();
    let thread = std::thread::current();
    match thread.name() {
        Some(test) if test != "main" => format!("{binary}::{test}"),
        _ => binary,
    }
}

/// Writes a line straight to stderr: `eprintln!` inside a passing test is
/// captured by the harness and never shown, and a skip must be seen. The
/// leading newline keeps it off a `test NAME ... ` line the harness may
/// have begun.
fn announce(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "\n{line}\n");
}

/// Whether `kubectl` is version 1.`minor` or later; when it is older the
/// calling test reports itself skipped because it lacks `feature`.
/// Debian's kubernetes-client is 1.20, before exec plugins'
/// `client.authentication.k8s.io/v1` (1.22) and kustomize components
/// (1.21), and no package registry a CI machine reaches has a newer one:
/// an old kubectl is not a missing tool, so this skip never fails, even
/// under `REKEYD_REQUIRE_TOOLS=1` (the exact bytes of what kubectl would
/// read are checked without it).
pub fn kubectl_at_least(kubectl: &std::path::Path, minor: u32, feature: &str) -> bool {
    let out = std::process::Command::new(kubectl)
        .args(["version", "--client", "-o", "json"])
        .output()
        .expect("kubectl runs");
    let found = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            let m = v["clientVersion"]["minor"].as_str()?;
            // "32", or "20+" on some builds.
            m.trim_end_matches('+').parse::<u32>().ok()
        });
    match found {
        Some(m) if m >= minor => true,
        found => {
            announce(&format!(
                "SKIPPED {}: kubectl 1.{} predates {feature} (1.{minor}); install a newer kubectl",
                test_name(),
                found.map_or("?".to_string(), |m| m.to_string())
            ));
            false
        }
    }
}
