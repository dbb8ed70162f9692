//! The command line. Every flag can also be set through a `HEARTH_…` environment variable.
//! Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::catalogue;
use crate::config::{self, AuthOverrides, Config, LogFormat, ModelSource, Overrides, Secret};
use crate::store::Store;

#[derive(Debug, Parser)]
#[command(
    name = "hearth",
    version,
    long_version = long_version(),
    about = "One binary serving OpenAI-compatible AI APIs from local models"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the configured models and serve the HTTP API.
    Serve(ServeArgs),
    /// Validate a config file and print the models it would serve.
    Check(ConfigArgs),
    /// Manage the model store.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Put files or folders into a vector store of a running Hearth (its `/v1/files` and
    /// `/v1/vector_stores` API), with progress bars; files the store holds under the same path
    /// are skipped.
    Ingest(IngestArgs),
    /// About the configuration file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print every config key with its default and meaning, as Markdown (docs/configuration.md).
    Reference,
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// TOML config file.
    #[arg(long, short, env = "HEARTH_CONFIG", default_value = "config/hearth.toml")]
    config: PathBuf,
    /// Where models are stored [default: $XDG_CACHE_HOME/hearth/models].
    #[arg(long, env = "HEARTH_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Where `[rag]` keeps files and vector stores [default: $XDG_DATA_HOME/hearth].
    #[arg(long, env = "HEARTH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// API keys file, one key per line (replaces `[auth] keys_file`); under systemd, a credential
    /// (`$CREDENTIALS_DIRECTORY/api-keys`).
    #[arg(long, env = "HEARTH_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// One more API key (named `env`), e.g. from a Kubernetes Secret. Environment only: a key on the
    /// command line would show in `ps`.
    #[arg(skip = std::env::var("HEARTH_API_KEY").ok().filter(|k| !k.is_empty()).map(Secret))]
    api_key: Option<Secret>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Address to listen on [default: from the config, else 127.0.0.1].
    #[arg(long, env = "HEARTH_HOST")]
    host: Option<String>,
    /// Port to listen on [default: from the config, else 8080].
    #[arg(long, short, env = "HEARTH_PORT")]
    port: Option<u16>,
    /// Log format [default: from the config, else text].
    #[arg(long, env = "HEARTH_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `hearth=debug,tower_http=debug` [default: from the config, else info].
    #[arg(long, env = "HEARTH_LOG")]
    log_level: Option<String>,
}

#[derive(Debug, Args)]
struct IngestArgs {
    /// Files and folders (walked recursively; hidden entries and unreadable types are skipped).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// The vector store: a name (created if no store has it) or an id (`vs_…`).
    #[arg(long, short)]
    store: String,
    /// The server's base URL.
    #[arg(long, env = "HEARTH_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Static chunking: tokens per chunk (100 to 4096) [default: the server's `auto`, 800 tokens
    /// with 400 overlap, capped at the embedding model's window].
    #[arg(long)]
    chunk_size: Option<usize>,
    /// Tokens shared by neighbouring chunks, at most half the chunk size [default: half of
    /// --chunk-size].
    #[arg(long, requires = "chunk_size")]
    chunk_overlap: Option<usize>,
    /// An attribute set on every file, for search filters (repeatable); `path` is each file's own.
    #[arg(long = "attribute", value_name = "KEY=VALUE", value_parser = crate::ingest::parse_attribute)]
    attributes: Vec<(String, serde_json::Value)>,
    /// Replace files the store already holds under the same path (a changed document).
    #[arg(long)]
    replace: bool,
    /// No progress bars (they are also off when stderr is not a terminal).
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// List the catalogue presets and what is in the model store.
    List {
        /// Where models are stored [default: $XDG_CACHE_HOME/hearth/models].
        #[arg(long, env = "HEARTH_MODELS_DIR")]
        models_dir: Option<PathBuf>,
    },
    /// Download a preset or `hf:org/name[@revision]` from the Hugging Face hub, or copy a local
    /// model directory into the store.
    Pull {
        /// A preset name, `hf:org/name[@revision]`, or a directory.
        name: String,
        /// Store name for a copied directory [default: the directory's name].
        #[arg(long = "as", env = "HEARTH_PULL_AS")]
        store_name: Option<String>,
        /// Replace an existing copy.
        #[arg(long, env = "HEARTH_PULL_FORCE")]
        force: bool,
        /// Where models are stored [default: $XDG_CACHE_HOME/hearth/models].
        #[arg(long, env = "HEARTH_MODELS_DIR")]
        models_dir: Option<PathBuf>,
    },
}

/// `hearth --version`: the version and the optional cargo features this binary was built with.
fn long_version() -> &'static str {
    let features: Vec<&str> = [
        ("cuda", cfg!(feature = "cuda")),
        ("metal", cfg!(feature = "metal")),
        ("otlp", cfg!(feature = "otlp")),
        ("onnx", cfg!(feature = "onnx")),
        ("tts", cfg!(feature = "tts")),
        ("whisper-cpp", cfg!(feature = "whisper-cpp")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let features = if features.is_empty() { "none".to_owned() } else { features.join(", ") };
    Box::leak(format!("{}\nfeatures: {features}", env!("CARGO_PKG_VERSION")).into_boxed_str())
}

/// Parses the command line, runs the command, and maps failures to exit codes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check(args),
        Command::Models { command } => run_async(models(command)),
        Command::Ingest(args) => run_async(ingest(args)),
        Command::Config { command: ConfigCommand::Reference } => {
            print!("{}", config::reference::markdown());
            ExitCode::SUCCESS
        }
    }
}

/// `overrides` with what the config arguments set (models directory, keys).
fn with_config_args(args: &ConfigArgs, overrides: Overrides) -> Overrides {
    let auth = AuthOverrides { keys_file: args.api_keys_file.clone(), api_key: args.api_key.clone() };
    Overrides { models_dir: args.models_dir.clone(), data_dir: args.data_dir.clone(), auth, ..overrides }
}

fn load_config(args: &ConfigArgs, overrides: Overrides) -> Result<Config, ExitCode> {
    let overrides = with_config_args(args, overrides);
    Config::load(&args.config, &overrides).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(2)
    })
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = Overrides {
        host: args.host.clone(),
        port: args.port,
        models_dir: None,
        data_dir: None,
        log_format: args.log_format,
        log_level: args.log_level.clone(),
        auth: AuthOverrides::default(),
    };
    let config = match load_config(&args.config, overrides.clone()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let overrides = with_config_args(&args.config, overrides);
    let telemetry = match crate::telemetry::init_logging(&config.logging) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(config = %args.config.config.display(), version = env!("CARGO_PKG_VERSION"), "starting hearth");
    let code = run_async(crate::server::serve(config, overrides));
    drop(telemetry); // flushes the last spans
    code
}

fn check(args: ConfigArgs) -> ExitCode {
    let config = match load_config(&args, Overrides::default()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    println!("{}: ok", args.config.display());
    println!(
        "listen {}:{}; models dir {}",
        config.server.host,
        config.server.port,
        config.models_dir.display()
    );
    for model in &config.models {
        println!("  {:<28} {:<10} {}", model.id, model.kind.as_str(), model.describe_source());
    }
    let auth = &config.auth;
    if auth.enabled() {
        // Names and classes only: keys are never printed (only their digests are kept at all).
        let keys: Vec<String> = auth.keys.iter().map(|k| format!("{} ({})", k.name, k.class)).collect();
        println!("api keys: {}", keys.join(", "));
    } else {
        println!("api keys: none (open to anyone who can reach the port)");
    }
    ExitCode::SUCCESS
}

fn run_async(future: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "exiting");
            ExitCode::FAILURE
        }
    }
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    // The key the server wants: Hearth's own variable, else the one OpenAI's tools read.
    let api_key = ["HEARTH_API_KEY", "OPENAI_API_KEY"]
        .into_iter()
        .find_map(|name| std::env::var(name).ok().filter(|k| !k.is_empty()));
    let options = crate::ingest::IngestOptions {
        paths: args.paths,
        store: args.store.clone(),
        url: args.url,
        api_key,
        chunking: args.chunk_size.map(|size| (size, args.chunk_overlap.unwrap_or(size / 2))),
        attributes: args.attributes.into_iter().collect(),
        replace: args.replace,
        progress: !args.quiet,
    };
    let summary = crate::ingest::ingest(options).await?;
    crate::ingest::report(&summary, &args.store)
}

async fn models(command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::List { models_dir } => {
            let store = Store::new(models_dir.unwrap_or_else(config::default_models_dir));
            list_models(&store)
        }
        ModelsCommand::Pull { name, store_name, force, models_dir } => {
            let store = Store::new(models_dir.unwrap_or_else(config::default_models_dir));
            let dir = pull(&store, &name, store_name, force).await?;
            println!("{name} -> {}", dir.display());
            Ok(())
        }
    }
}

fn list_models(store: &Store) -> anyhow::Result<()> {
    println!("model store: {}", store.root().display());
    println!("{:<24} {:<10} {:>8}  {:<10} SOURCE", "PRESET", "KIND", "SIZE", "STATE");
    for preset in catalogue::all() {
        let state = match config::parse_source(&preset.source, Some(preset.files.clone()), &[], store.root())
        {
            Ok(ModelSource::Hub { repo, revision, .. }) if store.pulled(&repo, &revision).is_some() => {
                "pulled"
            }
            _ if store.root().join(&preset.name).is_dir() => "local",
            _ => "-",
        };
        println!(
            "{:<24} {:<10} {:>6}MB  {:<10} {}",
            preset.name,
            preset.kind.as_str(),
            preset.size_mb,
            state,
            preset.source
        );
    }
    let mut others: Vec<String> = match std::fs::read_dir(store.root()) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name != "hub" && !name.starts_with('.') && catalogue::find(name).is_none())
            .collect(),
        Err(_) => Vec::new(),
    };
    others.sort();
    if !others.is_empty() {
        println!("\nother directories in the store (use `source = \"NAME\"`):");
        for name in others {
            println!("  {name}");
        }
    }
    Ok(())
}

async fn pull(store: &Store, name: &str, store_name: Option<String>, force: bool) -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(name);
    if path.is_dir() {
        let store_name = match store_name {
            Some(n) => n,
            None => path
                .canonicalize()?
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .context("cannot name the directory; pass --as NAME")?,
        };
        let inspected = hearth_backends::ModelsRoot::new(&path)
            .and_then(|root| hearth_backends::ModelDir::inspect(&path, &root));
        if let Ok(dir) = inspected {
            println!("{}: {} model ({:?})", path.display(), dir.architecture, dir.head);
        }
        return store.import_dir(&path, &store_name, force);
    }
    let (source_text, files) = match catalogue::find(name) {
        Some(preset) => (preset.source.clone(), Some(preset.files.clone())),
        None if name.starts_with("hf:") => (name.to_string(), None),
        None => anyhow::bail!(
            "`{name}` is not a preset, an `hf:org/name` source or a directory; presets: {}",
            catalogue::names().join(", ")
        ),
    };
    match config::parse_source(&source_text, files, config::DEFAULT_ENCODER_FILES, store.root())
        .map_err(|e| anyhow::anyhow!(e))?
    {
        ModelSource::Hub { repo, revision, .. } if !crate::store::downloads_allowed() => {
            anyhow::bail!("cannot pull hf:{repo}@{revision}: downloads are off (HF_HUB_OFFLINE is set)")
        }
        ModelSource::Hub { repo, revision, files } => store.pull_hub(&repo, &revision, &files).await,
        ModelSource::Local(dir) => Ok(dir),
    }
}
