//! Helpers shared by the integration tests: a gateway on 127.0.0.1:0 over
//! any mesh, tokens, the broker URL, and the real nuropb Python service and
//! client of the interop tests.
#![allow(dead_code, unreachable_pub, unused_imports)]

pub mod otlp;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use nuropb_bff::testing::{TestClient, eventually, http_get, readyz_becomes};

use nuropb_bff::{AuthHook, Gateway, MemoryMesh, RouteTable, Serving, Settings, WsHandler};
use serde_json::Value;

pub const SECRET: &str = "a-test-secret-of-at-least-thirty-two-bytes";

/// The auth hook of most tests: HS256 with [`SECRET`].
pub fn hs256() -> Arc<dyn AuthHook> {
    Arc::new(nuropb_bff::JwtVerifier::hs256(
        SECRET.as_bytes(),
        None,
        None,
    ))
}

/// An HS256 token signed with [`SECRET`] (the runtime's own test helper).
pub fn token(sub: &str, roles: &[&str], ttl_secs: u64) -> String {
    nuropb_bff::testing::hs256_token(SECRET, sub, roles, ttl_secs)
}

pub struct Running {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    serving: Option<Serving>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(serving) = self.serving.take() {
            tokio::time::timeout(Duration::from_secs(15), serving.stop())
                .await
                .expect("gateway did not stop in time")
                .unwrap();
        }
    }
}

/// Where a test gateway finds its services.
pub enum MeshSetup {
    /// This in-process mesh (the gateway registers itself in it).
    Memory(MemoryMesh),
    /// The test broker.
    Broker,
}

/// Start a gateway named `test-bff` (unless `configure` renames it) on an
/// ephemeral port, with `routes`, the hooks and `mesh`.
pub async fn start(
    routes: &str,
    auth: Arc<dyn AuthHook>,
    handler: Arc<dyn WsHandler>,
    configure: impl FnOnce(&mut Settings),
    mesh: MeshSetup,
) -> Running {
    let routes = RouteTable::parse("routes.toml", routes).unwrap();
    let mut settings = Settings::new("test-bff");
    settings.shutdown_grace_ms = 5_000;
    if let MeshSetup::Broker = mesh {
        settings.amqp_url = amqp_url().into();
        // A BFF of its own on the shared broker: its own event log and
        // bindings (a test that wants instances of one BFF names it).
        settings.mesh_service_name = unique("test-bff");
    }
    configure(&mut settings);
    let mut builder = Gateway::builder(settings)
        .routes(routes)
        .auth(auth)
        .handler(handler);
    if let MeshSetup::Memory(m) = mesh {
        builder = builder.memory_mesh(m);
    }
    let gateway = builder.start().await.expect("the gateway starts");
    let serving = gateway.clone().spawn().await.expect("the gateway serves");
    Running {
        addr: serving.addr(),
        gateway,
        serving: Some(serving),
    }
}

/// A service token that may push through the BFF's mesh API.
pub fn push_token() -> String {
    token("svc-orders", &["bff:push"], 300)
}

/// A NuroPb context carrying [`push_token`].
pub fn push_context() -> serde_json::Map<String, Value> {
    let mut ctx = serde_json::Map::new();
    ctx.insert("Authorization".into(), Value::String(push_token()));
    ctx
}

/// Connect with a bearer token and read the hello event.
pub async fn connect(url: &str, token: &str) -> (TestClient, Value) {
    let mut c = TestClient::connect(url, Some(token))
        .await
        .expect("handshake");
    let hello = c.recv().await.expect("hello");
    assert_eq!(hello["type"], "event", "{hello}");
    assert_eq!(hello["payload"]["topic"], "hello", "{hello}");
    (c, hello)
}

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker URL of the tests: `BFF_TEST_AMQP_URL` or the local RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("BFF_TEST_AMQP_URL").unwrap_or_else(|_| AMQP_URL.to_owned())
}

/// A name no other test run uses, for queues and services.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The Python with nuropb 0.1.8: `NUROPB_PYTHON` or the repo's `.venv`.
pub fn nuropb_python() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("NUROPB_PYTHON") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python with nuropb: run `bash scripts/setup-python.sh` (creates .venv) or set NUROPB_PYTHON"
    );
    p
}

pub fn script(name: &str) -> String {
    format!("{}/tests/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A real nuropb Python service (tests/python/service.py), killed when
/// dropped.
pub struct PyService(Child);

impl Drop for PyService {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_python_service(name: &str) -> PyService {
    let mut cmd = Command::new(nuropb_python());
    cmd.arg(script("service.py")).arg(amqp_url()).arg(name);
    let (child, line) = spawn_until_line(cmd, "the Python service", |line| Some(line.to_owned()));
    assert_eq!(line.trim(), "READY", "Python service said {line:?}");
    PyService(child)
}

/// Start `cmd` with its stdin held open (it runs until that closes) and
/// wait, up to 60 s, for the first line of its stdout that `wanted` takes;
/// the child and what `wanted` made of that line. The rest of its stdout
/// is read and let go, so it never blocks on a full pipe.
pub fn spawn_until_line<T: Send + 'static>(
    mut cmd: Command,
    what: &str,
    wanted: impl Fn(&str) -> Option<T> + Send + 'static,
) -> (Child, T) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start {what}: {e}"));
    let stdout = child.stdout.take().expect("a piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(found) = tx.as_ref().and_then(|_| wanted(&line)) {
                let _ = tx.take().map(|tx| tx.send(found));
            }
        }
    });
    let found = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{what} did not get ready within 60 s"));
    (child, found)
}

pub fn python_client(service: &str, method: &str, params: Value) -> Value {
    python_client_as(service, method, params, &serde_json::json!({}))
}

/// A nuropb Python client call with this NuroPb `context` (a caller token
/// in `Authorization`, say).
pub fn python_client_as(service: &str, method: &str, params: Value, context: &Value) -> Value {
    let out = Command::new(nuropb_python())
        .arg(script("client.py"))
        .arg(amqp_url())
        .arg(service)
        .arg(method)
        .arg(params.to_string())
        .arg(context.to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("run the Python client");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("client printed {text:?}: {e}"))
}

/// Run `rabbitmqctl` (part of the RabbitMQ server package); its output.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl (part of the RabbitMQ server package)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A service on the test broker whose `wait` answers after `ms` milliseconds.
pub async fn slow_service(name: &str) -> nuropb_bff::AmqpMesh {
    let stub = nuropb_bff::StubService::new(name).method(
        "wait",
        |r: nuropb_bff::IncomingRequest| async move {
            let ms = r.params.get("ms").and_then(Value::as_u64).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(serde_json::json!(ms))
        },
    );
    nuropb_bff::AmqpMesh::connect(
        nuropb_bff::AmqpConfig::new(amqp_url(), name),
        Arc::new(stub),
    )
    .await
    .expect("RabbitMQ must be running")
}

/// During a drain: send a new `wait` call (trace id `new`) to `service`,
/// then read until `in_flight` calls are answered with `result` and the
/// new one is refused naming the shutdown, in whatever order they come.
pub async fn drain_answers(c: &mut TestClient, service: &str, in_flight: usize, result: u64) {
    c.send(serde_json::json!({"type":"request","payload":{"service":service,"method":"wait","params":{"ms":0},"trace_id":"new"}}))
        .await
        .unwrap();
    let mut answered = 0;
    let mut refused_new = false;
    while answered < in_flight || !refused_new {
        let frame = c.recv().await.unwrap();
        let p = &frame["payload"];
        if p["trace_id"] == "new" {
            assert_eq!(p["error"]["error"], "ShuttingDown", "{frame}");
            refused_new = true;
        } else {
            assert_eq!(p["result"], result, "{frame}");
            answered += 1;
        }
    }
}

/// The value of a series in `/metrics` text, named with its labels as
/// the text writes them (`bff_x_total{reason="y"}`); 0 when absent.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A BFF binary running as a child process; its log lines (stdout
/// and stderr) are collected. Killed when dropped.
pub struct BffProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
}

impl BffProcess {
    pub fn spawn(bin: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .current_dir(dir)
            .env("NO_COLOR", "1")
            .env("BFF_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the BFF process");
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Wait (up to `within`) for a log line containing `needle`.
    pub fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(_) => panic!(
                    "no log line with {needle:?} within {within:?}; log:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// The address from the `serving addr=...` line.
    pub fn serving_addr(&mut self) -> SocketAddr {
        let line = self.wait_for("serving", Duration::from_secs(60));
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Wait (up to `within`) for the process to exit; its status and log.
    pub fn exit(&mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the BFF did not exit within {within:?}; log:\n{}",
                self.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader threads end with the pipes.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.log.push(line);
        }
        (status, self.log.join("\n"))
    }

    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Kill the process (SIGKILL: no drain, no goodbye) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send the process a signal (`TERM`, `HUP`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// The log so far (lines read without waiting).
    pub fn log_now(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
        self.log.join("\n")
    }
}

impl Drop for BffProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real nuropb Python service listening to events (tests/python/
/// listener.py): every event it receives, in order. Killed when dropped.
pub struct PyListener {
    child: Child,
    events: std::sync::mpsc::Receiver<Value>,
    pub seen: Vec<Value>,
}

impl Drop for PyListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PyListener {
    /// Wait (up to `within`) until `done` holds for the events seen so
    /// far; they are kept in `seen`.
    pub fn until(&mut self, within: Duration, done: impl Fn(&[Value]) -> bool) -> &[Value] {
        match self.wait(within, done) {
            Ok(()) => &self.seen,
            Err(why) => panic!("{why}"),
        }
    }

    /// [`Self::until`], saying what was seen instead of panicking.
    pub fn wait(
        &mut self,
        within: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) => self.seen.push(e),
                Err(_) => {
                    return Err(format!(
                        "the listener did not see what was awaited within {within:?}; it saw:\n{}",
                        self.seen
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("\n")
                    ));
                }
            }
        }
        Ok(())
    }
}

pub fn start_python_listener(name: &str, patterns: &[&str]) -> PyListener {
    let mut child = Command::new(nuropb_python())
        .arg(script("listener.py"))
        .arg(amqp_url())
        .arg(name)
        .args(patterns)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the Python listener");
    let stdout = child.stdout.take().expect("a piped stdout");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (tx, events) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == "READY" {
                let _ = ready_tx.send(());
            } else if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the Python listener did not get ready within 60 s");
    PyListener {
        child,
        events,
        seen: Vec::new(),
    }
}
