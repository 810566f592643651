//! `sheaf-relay`: the sync server. Peers (sheaf or automerge-repo JS clients) connect over
//! WebSocket; it stores everything it relays in sled, serves any document asked for by id,
//! and never announces documents.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args as ClapArgs, Parser, Subcommand};
use sheafdb::auth::{Claims, DocScope, Key, Keyring, KEYS_ENV};
use sheafdb::engine::{ApplyPacing, EngineConfig};
use sheafdb::relay::{MetricType, Metrics, RateLimit, ServerConfig};
use sheafdb::{AutomergeUrl, EngineStop, PeerId, Repo, RepoConfig};

#[derive(Parser, Debug)]
#[command(
    name = "sheaf-relay",
    version,
    about = "Relay for sheaf and automerge-repo peers",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: serve.
    #[command(flatten)]
    serve: Args,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve (the default when no subcommand is given).
    Serve(Args),
    /// Mint a capability token with a key from the keys file or $SHEAF_RELAY_KEYS.
    Token(TokenArgs),
    /// Print a new random key as a `kid hexkey` line for a keys file.
    Keygen {
        /// The key id (defaults to one based on the current time).
        #[arg(long)]
        kid: Option<String>,
    },
}

#[derive(ClapArgs, Debug, Clone)]
struct KeyArgs {
    /// File of `kid hexkey` lines (tokens may be signed by any of them; the last one mints).
    /// Or set SHEAF_RELAY_KEYS to the same lines. Secrets never go in flags.
    #[arg(long, env = "SHEAF_RELAY_KEYS_FILE")]
    keys_file: Option<PathBuf>,
}

impl KeyArgs {
    fn load(&self) -> anyhow::Result<Option<Keyring>> {
        let ring = match &self.keys_file {
            Some(path) => Some(Keyring::from_file(path)?),
            None => Keyring::from_env().with_context(|| format!("parsing ${KEYS_ENV}"))?,
        };
        match ring {
            Some(r) if r.is_empty() => bail!("no keys in the keys file or ${KEYS_ENV}"),
            r => Ok(r),
        }
    }
}

#[derive(ClapArgs, Debug)]
struct TokenArgs {
    #[command(flatten)]
    keys: KeyArgs,
    /// A document it covers (`automerge:...` URL or bare id); repeat for several; `*` = all.
    #[arg(long = "doc", required = true)]
    docs: Vec<String>,
    /// Allow writing (default: read-only).
    #[arg(long)]
    write: bool,
    /// Lifetime: e.g. 90s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = sheafdb::auth::parse_ttl)]
    ttl: u64,
    /// Who the token is for (shown in relay logs).
    #[arg(long, default_value = "")]
    sub: String,
    /// Key to sign with (default: the last one listed).
    #[arg(long)]
    kid: Option<String>,
}

#[derive(ClapArgs, Debug, Clone)]
struct Args {
    /// Address to listen on (WebSocket, plus GET /health and /metrics).
    #[arg(long, env = "SHEAF_LISTEN", default_value = "127.0.0.1:3030")]
    listen: SocketAddr,
    /// Data directory (sled).
    #[arg(long, env = "SHEAF_DATA_DIR", default_value = sheafdb::repo::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Maximum concurrent WebSocket connections.
    #[arg(long, env = "SHEAF_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Maximum WebSocket frame/message size in bytes.
    #[arg(long, env = "SHEAF_MAX_FRAME_BYTES", default_value_t = 64 * 1024 * 1024)]
    max_frame_bytes: usize,
    /// Seconds between keepalive pings.
    #[arg(long, env = "SHEAF_PING_INTERVAL", default_value_t = 20)]
    ping_interval_secs: u64,
    /// Drop a peer silent for this many seconds.
    #[arg(long, env = "SHEAF_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout_secs: u64,
    /// Cache size for sled, in MiB.
    #[arg(long, env = "SHEAF_CACHE_MIB", default_value_t = 64)]
    cache_mib: u64,
    /// After applying remote changes to a document took T (when T is over 20 ms: a long
    /// text), apply nothing more to it for FACTOR x T, so what arrives meanwhile is applied
    /// in one call (it is passed on to the other peers at once all the same). 0 turns
    /// pacing off.
    #[arg(long, env = "SHEAF_APPLY_PACING", default_value_t = ApplyPacing::default().factor)]
    apply_pacing: u64,
    /// The longest pause apply pacing makes, in milliseconds.
    #[arg(long, env = "SHEAF_APPLY_PACING_MAX_MS", default_value_t = ApplyPacing::default().max_ms)]
    apply_pacing_max_ms: u64,
    /// A peer that has not answered the last message that carried changes gets nothing new
    /// for up to this many milliseconds, then one message with everything new.
    #[arg(long, env = "SHEAF_MAX_HOLD_MS", default_value_t = EngineConfig::relay(PeerId::new("-"), None).max_hold_ms)]
    max_hold_ms: u64,
    #[command(flatten)]
    keys: KeyArgs,
    /// Serve a non-loopback address without tokens: anyone who knows a document id can
    /// read and write it.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Maximum concurrent WebSocket connections per client IP address.
    #[arg(long, env = "SHEAF_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    max_connections_per_ip: usize,
    /// Maximum distinct documents synced over one connection (0 = unlimited).
    #[arg(long, env = "SHEAF_MAX_DOCS_PER_CONNECTION", default_value_t = 10_000)]
    max_docs_per_connection: usize,
    /// Frames per second one connection may send (reads pause above it).
    #[arg(long, env = "SHEAF_RATE_MESSAGES", default_value_t = 200.0)]
    rate_messages_per_sec: f64,
    /// Bytes per second one connection may send (reads pause above it).
    #[arg(long, env = "SHEAF_RATE_BYTES", default_value_t = 8.0 * 1024.0 * 1024.0)]
    rate_bytes_per_sec: f64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Token(t)) => token(t),
        Some(Command::Keygen { kid }) => {
            let kid = kid.unwrap_or_else(|| format!("k{}", sheafdb::auth::unix_now()));
            println!("{kid} {}", Key::generate().to_hex());
            Ok(())
        }
    }
}

fn token(t: TokenArgs) -> anyhow::Result<()> {
    let Some(ring) = t.keys.load()? else {
        bail!("no keys: pass --keys-file or set ${KEYS_ENV}");
    };
    let kid = match t.kid {
        Some(k) => k,
        None => ring.newest_kid().unwrap_or_default().to_owned(),
    };
    let docs = if t.docs.iter().any(|d| d == "*") {
        DocScope::All
    } else {
        let mut set = std::collections::BTreeSet::new();
        for d in &t.docs {
            let url: AutomergeUrl = d
                .parse()
                .or_else(|_| format!("automerge:{d}").parse())
                .map_err(|e| anyhow::anyhow!("bad document {d:?}: {e}"))?;
            set.insert(url.id);
        }
        DocScope::Docs(set)
    };
    let mut claims = Claims::new(kid, docs, t.write, t.ttl);
    claims.sub = t.sub;
    println!("{}", ring.mint(&claims)?);
    Ok(())
}

#[tokio::main]
async fn serve(args: Args) -> anyhow::Result<()> {
    // Logs on stderr: stdout carries the one line a supervisor or script reads (the address).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let keys = args.keys.load()?;
    if keys.is_none() && !args.listen.ip().is_loopback() {
        if !args.insecure_no_auth {
            bail!(
                "refusing to serve {} without auth: configure keys (--keys-file or ${KEYS_ENV}; \
                 make one with `sheaf-relay keygen`) or pass --insecure-no-auth",
                args.listen
            );
        }
        tracing::warn!(
            listen = %args.listen,
            "serving a non-loopback address WITHOUT AUTH (--insecure-no-auth): anyone who knows a document id can read and write it"
        );
    }
    match &keys {
        Some(k) => tracing::info!(keys = k.len(), "auth on: every connection needs a token"),
        None => tracing::info!("auth off"),
    }

    let mut config = RepoConfig::relay();
    config.store.cache_capacity_bytes = args.cache_mib * 1024 * 1024;
    let mut engine = EngineConfig::relay(PeerId::random(), None);
    engine.apply_pacing = ApplyPacing {
        factor: args.apply_pacing,
        max_ms: args.apply_pacing_max_ms,
        ..ApplyPacing::default()
    };
    engine.max_hold_ms = args.max_hold_ms;
    config.engine = Some(engine);
    let repo = Repo::open_with(&args.data_dir, config)
        .with_context(|| format!("opening data directory {}", args.data_dir.display()))?;

    let metrics = Arc::new(Metrics::new());
    register_metrics(&metrics, &repo);
    let mut server = ServerConfig {
        metrics,
        max_connections: args.max_connections,
        auth: keys.map(Arc::new),
        max_connections_per_ip: args.max_connections_per_ip.max(1),
        max_docs_per_connection: (args.max_docs_per_connection > 0)
            .then_some(args.max_docs_per_connection),
        ..ServerConfig::default()
    };
    server.socket.rate_limit = Some(RateLimit {
        messages_per_sec: args.rate_messages_per_sec,
        bytes_per_sec: args.rate_bytes_per_sec,
        ..RateLimit::default()
    });
    server.socket.max_frame_bytes = args.max_frame_bytes;
    server.socket.ping_interval = Duration::from_secs(args.ping_interval_secs.max(1));
    server.socket.idle_timeout = Duration::from_secs(args.idle_timeout_secs.max(1));

    // Before the address is printed: whoever starts the relay may signal it right after.
    let signals = shutdown_signal().context("installing the SIGINT/SIGTERM handlers")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %args.data_dir.display(), peer = %repo.peer_id(), "sheaf-relay serving");
    println!("sheaf-relay listening on ws://{addr}");

    // Stop on SIGINT/SIGTERM, or when the engine stops on its own (a bug, or storage that can
    // no longer write): such a relay would accept sockets only to drop them, or acknowledge
    // nothing. Exiting with an error lets a supervisor restart it on the same data.
    let engine = repo.clone();
    let stop = async move {
        tokio::select! {
            _ = signals => {}
            _ = engine.engine_stopped() => {}
        }
    };
    sheafdb::relay::run(listener, repo.hub(), server, stop).await?;
    if let Some(stop @ (EngineStop::Panicked(_) | EngineStop::StorageFailed(_))) =
        repo.engine_stop()
    {
        tracing::error!(reason = %stop, "the sync engine stopped; flushing storage and exiting");
        let flushed =
            tokio::task::spawn_blocking(move || repo.shutdown().map_err(anyhow::Error::from)).await;
        if let Ok(Err(e)) = flushed {
            tracing::error!(error = %e, "flushing storage failed");
        }
        bail!("the sync engine {stop}");
    }
    tracing::info!("shutting down: flushing storage");
    let r =
        tokio::task::spawn_blocking(move || repo.shutdown().map_err(anyhow::Error::from)).await?;
    r.context("flushing storage at shutdown")?;
    tracing::info!("bye");
    Ok(())
}

/// Registers the SIGINT and SIGTERM handlers at once; the future completes at the first
/// signal. Registered lazily (when the future is first polled, inside the server), a SIGTERM
/// that came right after the "listening" line found the default action and killed the relay
/// without a graceful stop (seen as a flaky `tests/relay_faults` run).
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

fn register_metrics(m: &Metrics, repo: &Repo) {
    use sheafdb::repo::RepoStats;
    use sheafdb::store::StoreStats;
    use std::sync::atomic::AtomicU64;

    // One series per runtime counter (an atomic read when /metrics is scraped).
    let stats = repo.stats();
    type RuntimeSeries = (
        &'static str,
        &'static str,
        MetricType,
        fn(&RepoStats) -> &AtomicU64,
        f64,
    );
    let runtime: [RuntimeSeries; 6] = [
        (
            "sheaf_documents_loaded",
            "Documents held in memory",
            MetricType::Gauge,
            |s| &s.loaded_docs,
            1.0,
        ),
        (
            "sheaf_engine_batches_total",
            "Engine batches handled",
            MetricType::Counter,
            |s| &s.batches,
            1.0,
        ),
        (
            "sheaf_engine_inputs_total",
            "Inputs handled by the engine",
            MetricType::Counter,
            |s| &s.inputs,
            1.0,
        ),
        (
            "sheaf_docs_denied_total",
            "Document requests refused because the peer's token does not cover them",
            MetricType::Counter,
            |s| &s.docs_denied,
            1.0,
        ),
        (
            "sheaf_doc_limit_hits_total",
            "Document requests refused because the connection is at its document limit",
            MetricType::Counter,
            |s| &s.doc_limit_hits,
            1.0,
        ),
        (
            "sheaf_engine_seconds_total",
            "Time spent handling sync messages and other engine inputs",
            MetricType::Counter,
            |s| &s.engine_nanos,
            1e-9,
        ),
    ];
    for (name, help, ty, field, scale) in runtime {
        let s = stats.clone();
        m.register(name, help, ty, move || {
            field(&s).load(Ordering::Relaxed) as f64 * scale
        });
    }

    type StorageSeries = (&'static str, &'static str, fn(&StoreStats) -> u64);
    let storage: [StorageSeries; 5] = [
        (
            "sheaf_storage_flushes_total",
            "Group commits (one fdatasync each: of the commit log, or of sled at a checkpoint)",
            |s| s.fsyncs,
        ),
        (
            "sheaf_storage_checkpoints_total",
            "Checkpoints: sled flushed and synced, the commit log started over",
            |s| s.checkpoints,
        ),
        (
            "sheaf_storage_replayed_records_total",
            "Commit log records replayed at open (batches acknowledged before a crash)",
            |s| s.replayed_records,
        ),
        (
            "sheaf_storage_bytes_written_total",
            "Bytes written to storage",
            |s| s.bytes_written,
        ),
        (
            "sheaf_storage_corrupt_chunks_total",
            "Corrupt chunks found and quarantined",
            |s| s.corrupt_chunks,
        ),
    ];
    for (name, help, field) in storage {
        let store = repo.store().clone();
        m.register(name, help, MetricType::Counter, move || {
            field(&store.stats()) as f64
        });
    }
}
