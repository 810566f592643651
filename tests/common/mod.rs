//! Helpers shared by the integration tests that drive real processes: the `sheaf-relay`
//! binary and the Node scripts in `tests/js/`. Every wait is bounded.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

/// Upper bound for one wait in these tests.
pub const WAIT: Duration = Duration::from_secs(15);

/// A running `sheaf-relay` binary (killed with SIGKILL on drop).
pub struct RelayProc {
    pub child: Child,
    pub addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
}

impl RelayProc {
    /// Start the binary on `127.0.0.1:port` (0 = any free port: the binary prints the port it
    /// chose) with `data_dir` and extra flags, and wait until it listens.
    pub async fn start(data_dir: &Path, port: u16, extra: &[&str]) -> RelayProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sheaf-relay"));
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // A port just released by a killed relay can take a moment to be free again.
        let deadline = Instant::now() + WAIT;
        loop {
            let mut child = cmd.spawn().expect("spawn sheaf-relay");
            let stdout = child.stdout.take().unwrap();
            let mut lines = BufReader::new(stdout).lines();
            let first = timeout(WAIT, lines.next_line()).await;
            match first {
                Ok(Ok(Some(line))) if line.starts_with("sheaf-relay listening on ws://") => {
                    let addr = line
                        .trim_start_matches("sheaf-relay listening on ws://")
                        .trim()
                        .parse()
                        .expect("relay prints its address");
                    // Keep draining stdout so the relay never blocks on a full pipe.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return RelayProc {
                        child,
                        addr,
                        data_dir: data_dir.to_path_buf(),
                    };
                }
                other => {
                    let _ = child.kill().await;
                    let status = child.wait().await;
                    assert!(
                        Instant::now() < deadline,
                        "sheaf-relay did not start: {other:?}, {status:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("kill -9 sheaf-relay");
    }

    /// SIGTERM (graceful: closes sockets, flushes storage) and wait for a clean exit.
    pub async fn terminate(mut self) {
        let pid = self.child.id().expect("relay pid");
        let st = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(st.success());
        let status = timeout(WAIT, self.child.wait())
            .await
            .expect("relay exits after SIGTERM")
            .unwrap();
        assert!(
            status.success(),
            "relay exit status after SIGTERM: {status}"
        );
    }
}

/// The Node project directory, checked: `node` must be on PATH and `tests/js/node_modules`
/// installed. Fails the test (never skips) with what to do otherwise.
pub fn js_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let node = std::process::Command::new("node").arg("--version").output();
    match node {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "`node` is needed for the JS interop tests but was not found or failed ({other:?}). \
             Install Node.js 20+ (e.g. `apt-get install -y nodejs npm`), then run \
             `npm ci --prefix tests/js`."
        ),
    }
    let marker = dir.join("node_modules/@automerge/automerge-repo/package.json");
    assert!(
        marker.exists(),
        "tests/js/node_modules is missing ({} not found): run `npm ci --prefix tests/js` \
         first (CI does this before `cargo test`).",
        marker.display()
    );
    dir
}

/// A Node script from `tests/js/` speaking JSON lines (see `client.mjs`).
pub struct JsProc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<Value>,
    /// Events and answers read while waiting for something else.
    backlog: Vec<Value>,
    next_id: u64,
}

impl JsProc {
    pub async fn spawn(script: &str, args: &[&str]) -> JsProc {
        let dir = js_dir();
        let mut child = Command::new("node")
            .arg(script)
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn node {script}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let name = script.to_string();
        let n = name.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        let _ = tx.send(v);
                    }
                    Err(_) => eprintln!("[{n}] {line}"),
                }
            }
        });
        JsProc {
            name,
            stdin: child.stdin.take(),
            child,
            lines: rx,
            backlog: Vec::new(),
            next_id: 1,
        }
    }

    /// The next line matching `pred` (from the backlog first), within `within`.
    pub async fn expect(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(v)) if pred(&v) => return v,
                Ok(Some(v)) => self.backlog.push(v),
                Ok(None) => panic!(
                    "{} exited while we waited; status {:?}; seen {:?}",
                    self.name,
                    self.child.try_wait(),
                    self.backlog
                ),
                Err(_) => panic!(
                    "{}: nothing matching within {within:?}; seen {:?}",
                    self.name, self.backlog
                ),
            }
        }
    }

    /// Remove and return a line already read that matches `pred` (never waits).
    pub fn take(&mut self, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        while let Ok(v) = self.lines.try_recv() {
            self.backlog.push(v);
        }
        let i = self.backlog.iter().position(pred)?;
        Some(self.backlog.remove(i))
    }

    /// Send one command and wait for its answer; panics on `ok: false`.
    pub async fn call(&mut self, mut cmd: Value) -> Value {
        let v = self.try_call(&mut cmd).await;
        assert_eq!(v["ok"], json!(true), "{} answered {v} to {cmd}", self.name);
        v
    }

    /// Send one command and return its answer, successful or not.
    pub async fn try_call(&mut self, cmd: &mut Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        let mut line = serde_json::to_string(&cmd).unwrap();
        line.push('\n');
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
        self.expect(WAIT + Duration::from_secs(5), |v| v["id"] == json!(id))
            .await
    }

    /// Close stdin and wait for the script to exit (bounded); returns its exit code.
    pub async fn finish(mut self) -> Option<i32> {
        drop(self.stdin.take());
        match timeout(WAIT, self.child.wait()).await {
            Ok(Ok(st)) => st.code(),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        }
    }

    /// Wait for the script to exit by itself (bounded); returns its exit code and every
    /// JSON line it printed.
    pub async fn wait_output(mut self, within: Duration) -> (Option<i32>, Vec<Value>) {
        let status = match timeout(within, self.child.wait()).await {
            Ok(Ok(st)) => st.code(),
            _ => {
                let _ = self.child.kill().await;
                None
            }
        };
        let mut all = std::mem::take(&mut self.backlog);
        // The reader task ends with the pipe; give it a moment to hand over the last lines.
        while let Ok(Some(v)) = timeout(Duration::from_secs(2), self.lines.recv()).await {
            all.push(v);
        }
        (status, all)
    }
}
