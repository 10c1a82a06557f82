//! `tokn-control`: the control plane's service and its operator commands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tokn-control", version, about = "tokn$ control plane")]
struct Args {
    /// Configuration file (TOML). Without it: SQLite in the working directory, tokens and key
    /// from TOKN_ADMIN_TOKEN, TOKN_PROXY_TOKEN and TOKN_KEK_1.
    #[arg(long, short, global = true)]
    config: Option<std::path::PathBuf>,
    /// The control plane the operator commands talk to (its admin token in TOKN_ADMIN_TOKEN).
    #[arg(long, global = true, default_value = "http://127.0.0.1:7070")]
    url: String,
    /// Operator commands: the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Re-encrypt every seller credential under the newest key-encryption key, then exit.
    Rewrap,
    /// Validate the configuration, list every problem, and exit.
    Check,
    #[command(flatten)]
    Ops(tokn_control::cli::Ops),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOKN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokn-control: runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(Command::Ops(ops)) = args.command {
        // Over the API: no configuration file, no store.
        let Ok(token) = std::env::var("TOKN_ADMIN_TOKEN") else {
            eprintln!("tokn-control: set TOKN_ADMIN_TOKEN to the admin token");
            return ExitCode::from(2);
        };
        return exit(runtime.block_on(tokn_control::cli::run(ops, &args.url, &token, args.json)));
    }
    let text = match &args.config {
        None => tokn_config::control_plane::DEFAULT_CONTROL_PLANE_TOML.to_owned(),
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tokn-control: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let valid = match tokn_config::control_plane::load_control_plane(&text, &|name| {
        std::env::var(name).ok()
    }) {
        Ok(v) => v,
        Err(problems) => {
            eprint!("tokn-control: {problems}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.unwrap_or(Command::Serve) {
        Command::Check => {
            eprintln!("tokn-control: configuration is valid");
            Ok(())
        }
        Command::Serve => runtime.block_on(tokn_control::serve(&valid)),
        Command::Ops(_) => Ok(()),
        Command::Rewrap => runtime
            .block_on(tokn_control::rewrap(&valid))
            .map(|(moved, kept)| {
                eprintln!("tokn-control: re-wrapped {moved} credential(s); {kept} already current");
            }),
    };
    exit(result)
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokn-control: {e}");
            ExitCode::from(1)
        }
    }
}
