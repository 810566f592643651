//! `sheaf-relay`: the sync server. Peers (sheaf or automerge-repo JS clients) connect over
//! WebSocket; it stores everything it relays in sled, serves any document asked for by id,
//! and never announces documents.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use sheafdb::relay::{MetricType, Metrics, ServerConfig};
use sheafdb::{Repo, RepoConfig};

#[derive(Parser, Debug)]
#[command(
    name = "sheaf-relay",
    version,
    about = "Relay for sheaf and automerge-repo peers"
)]
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();

    let mut config = RepoConfig::relay();
    config.store.cache_capacity_bytes = args.cache_mib * 1024 * 1024;
    let repo = Repo::open_with(&args.data_dir, config)
        .with_context(|| format!("opening data directory {}", args.data_dir.display()))?;

    let metrics = Arc::new(Metrics::new());
    register_metrics(&metrics, &repo);
    let mut server = ServerConfig {
        metrics,
        max_connections: args.max_connections,
        ..ServerConfig::default()
    };
    server.socket.max_frame_bytes = args.max_frame_bytes;
    server.socket.ping_interval = Duration::from_secs(args.ping_interval_secs.max(1));
    server.socket.idle_timeout = Duration::from_secs(args.idle_timeout_secs.max(1));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %args.data_dir.display(), peer = %repo.peer_id(), "sheaf-relay serving");
    println!("sheaf-relay listening on ws://{addr}");

    sheafdb::relay::run(listener, repo.hub(), server, shutdown_signal()).await?;
    tracing::info!("shutting down: flushing storage");
    let r =
        tokio::task::spawn_blocking(move || repo.shutdown().map_err(anyhow::Error::from)).await?;
    r.context("flushing storage at shutdown")?;
    tracing::info!("bye");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn register_metrics(m: &Metrics, repo: &Repo) {
    let st = repo.stats();
    let s = st.clone();
    m.register(
        "sheaf_documents_loaded",
        "Documents held in memory",
        MetricType::Gauge,
        move || s.loaded_docs.load(Ordering::Relaxed) as f64,
    );
    let s = st.clone();
    m.register(
        "sheaf_engine_batches_total",
        "Engine batches handled",
        MetricType::Counter,
        move || s.batches.load(Ordering::Relaxed) as f64,
    );
    let s = st.clone();
    m.register(
        "sheaf_engine_inputs_total",
        "Inputs handled by the engine",
        MetricType::Counter,
        move || s.inputs.load(Ordering::Relaxed) as f64,
    );
    let s = st;
    m.register(
        "sheaf_engine_seconds_total",
        "Time spent handling sync messages and other engine inputs",
        MetricType::Counter,
        move || s.engine_nanos.load(Ordering::Relaxed) as f64 / 1e9,
    );
    let store = repo.store().clone();
    m.register(
        "sheaf_storage_flushes_total",
        "Group commits (flush + fdatasync)",
        MetricType::Counter,
        move || store.stats().fsyncs as f64,
    );
    let store = repo.store().clone();
    m.register(
        "sheaf_storage_bytes_written_total",
        "Bytes written to storage",
        MetricType::Counter,
        move || store.stats().bytes_written as f64,
    );
    let store = repo.store().clone();
    m.register(
        "sheaf_storage_corrupt_chunks_total",
        "Corrupt chunks found and quarantined",
        MetricType::Counter,
        move || store.stats().corrupt_chunks as f64,
    );
}
