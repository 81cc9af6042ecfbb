//! rekeyd's entry point: parse the command line, run it, exit with its status.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = rekeyd::cli::Cli::parse();
    // SAFETY: no other thread runs yet (the runtime starts below); taking
    // the sockets systemd passed unsets LISTEN_* for every child.
    unsafe { rekeyd::serve::activation::take_from_env() };
    // Test builds only: crash points named in FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // One worker thread (besides the main thread, which runs the daemon's
    // signal and reload loop): rekeyd mostly sleeps, a worker per core
    // costs memory and cross-thread wake-ups, and on a small host the
    // local API answers faster from one thread than from several competing
    // with its clients for the cores (BENCHMARKS.md). TOKIO_WORKER_THREADS
    // overrides this.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rekeyd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    ExitCode::from(runtime.block_on(rekeyd::commands::execute(cli)))
}
