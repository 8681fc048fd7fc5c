//! The frontend kit for real: the generated TypeScript client compiles with
//! `tsc --strict` (typescript pinned in frontend-tests/package-lock.json)
//! and drives a live BFF on RabbitMQ in Node, against the interop Python
//! service; the console page works in a headless chromium
//! (playwright-core). Needs Node 20+, `npm ci` in frontend-tests (done here
//! when node_modules is missing) and chromium (`apt-get install chromium`,
//! or `CHROMIUM=/path`); scripts/test.sh installs both.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use common::{MeshSetup, Running, start};
use nuropb_bff::testing::TestBff;
use nuropb_bff::{
    AmqpConfig, AmqpMesh, DefaultHandler, Mesh, OutgoingEvent, RouteTable, Settings, StubService,
};
use serde_json::{Map, json};

fn kit() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("frontend-tests")
}

/// `npm ci` once per test binary when frontend-tests/node_modules is missing.
fn npm_ready() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done || kit().join("node_modules/typescript").exists() {
        *done = true;
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(kit())
        .output()
        .expect("npm (Node 20+) is needed for the frontend tests");
    assert!(
        out.status.success(),
        "npm ci failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    *done = true;
}

/// A fresh directory under frontend-tests/work (so node_modules resolves).
fn workdir(case: &str) -> PathBuf {
    let d = kit().join("work").join(format!(
        "{case}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tsc(dir: &Path, config: serde_json::Value) {
    std::fs::write(dir.join("tsconfig.json"), config.to_string()).unwrap();
    let out = Command::new("node")
        .arg(kit().join("node_modules/typescript/bin/tsc"))
        .args(["-p", "tsconfig.json"])
        .current_dir(dir)
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "tsc failed in {}:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Node script that prints `READY x` when it needs this side to act and
/// reads `GO x` lines; `DONE` ends it well, `FAIL why` badly.
struct Script {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Script {
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let stdin = child.stdin.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    seen.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Self {
            child,
            stdin,
            lines,
            seen,
        }
    }

    /// The next line that asks for something (`READY ...`) or ends the run.
    fn next_request(&mut self, within: Duration) -> String {
        loop {
            match self.lines.recv_timeout(within) {
                Ok(l) if l.starts_with("READY ") || l == "DONE" => return l,
                Ok(l) if l.starts_with("FAIL") => self.fail(&l),
                Ok(_) => {}
                Err(_) => self.fail("no progress in time (or the script ended early)"),
            }
        }
    }

    fn go(&mut self, what: &str) {
        writeln!(self.stdin, "GO {what}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let output = self.seen.lock().unwrap().join("\n");
        panic!("{why}\n--- script output ---\n{output}");
    }

    fn finish(mut self) -> Vec<String> {
        let status = self.child.wait().unwrap();
        let seen = self.seen.lock().unwrap().clone();
        assert!(status.success(), "exit {status}:\n{}", seen.join("\n"));
        seen
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn routes(py: &str, topic: &str) -> String {
    format!(
        r#"
[[route]]
call = "{py}.hello"
expose_as = "greeter.hello"

[[route]]
call = "{py}.*"
expose_as = "calc.*"
roles = ["user"]

[[event]]
topic = "{topic}.#"
deliver = "subscribers"

[[event]]
topic = "news.#"
deliver = "subscribers"

[[event]]
topic = "alerts.*"
deliver = "all"
roles = ["ops"]

[[compose]]
name = "home.load"
[[compose.part]]
key = "greeting"
call = "greeter.hello"
params = {{ name = "$session.user_id" }}
"#
    )
}

async fn publish(mesh: &AmqpMesh, topic: &str, n: u32) {
    mesh.publish_event(OutgoingEvent {
        topic: topic.to_owned(),
        event: json!({"n": n}),
        context: Map::new(),
        target: None,
        trace_id: None,
    })
    .await
    .expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typescript_client_compiles_strict_and_drives_a_live_bff() {
    npm_ready();
    let py = common::unique("ts-svc");
    let topic = common::unique("ts-events").replace('-', "_");
    let _service = common::start_python_service(&py);
    let table = routes(&py, &topic);
    let route_table = RouteTable::parse("routes.toml", &table).unwrap();

    // The client, typed from the services' own descriptions (--live).
    let bff_name = common::unique("ts-bff");
    let mut settings = Settings::new(bff_name.clone());
    settings.amqp_url = common::amqp_url().into();
    let (described, notes) = nuropb_bff::describe_services(&settings, &route_table)
        .await
        .expect("the broker is reachable");
    assert!(notes.is_empty(), "{notes:?}");
    // The tool's own service queue went with its connection.
    let queues = tokio::task::block_in_place(|| common::rabbitmqctl(&["list_queues", "name"]));
    assert!(!queues.contains(&bff_name), "left behind:\n{queues}");
    let client = nuropb_bff::client_ts("ts-bff", "/ws", &route_table, &described);
    assert!(
        client.contains(r#""hello"<R = unknown>(params: { "name": string }"#),
        "the described parameter types are used:\n{client}"
    );

    // tsc --strict: the client, type-level checks, and the frames the
    // gateway really sends typed as the client's ServerFrame.
    let dir = workdir("client");
    std::fs::write(dir.join("client.ts"), &client).unwrap();
    std::fs::copy(kit().join("check.ts"), dir.join("check.ts")).unwrap();
    let samples = nuropb_bff::testing::server_frame_samples().join(",\n  ");
    std::fs::write(
        dir.join("samples.ts"),
        format!(
            "import type {{ ServerFrame }} from \"./client\";\nexport const frames: ServerFrame[] = [\n  {samples}\n];\n"
        ),
    )
    .unwrap();
    tsc(
        &dir,
        json!({
            "compilerOptions": {
                "strict": true, "noEmit": true, "target": "es2022", "module": "es2022",
                "moduleResolution": "bundler", "lib": ["es2022", "dom"], "types": [],
                "noUnusedLocals": true, "noImplicitOverride": true
            },
            "files": ["client.ts", "check.ts", "samples.ts"]
        }),
    );

    // The Node run against a live BFF.
    std::fs::copy(kit().join("live.ts"), dir.join("live.ts")).unwrap();
    tsc(
        &dir,
        json!({
            "compilerOptions": {
                "strict": true, "target": "es2022", "module": "nodenext",
                "moduleResolution": "nodenext", "lib": ["es2022", "dom"], "types": ["node"],
                "outDir": "out", "rootDir": "."
            },
            "files": ["client.ts", "live.ts"]
        }),
    );
    let auth = common::hs256();
    let bff: Running = start(
        &table,
        auth.clone(),
        Arc::new(DefaultHandler),
        |_| {},
        MeshSetup::Broker,
    )
    .await;
    let addr = bff.addr;
    let mut publisher = AmqpConfig::new(common::amqp_url(), common::unique("ts-pub"));
    publisher.transient = true;
    let publisher = AmqpMesh::connect(publisher, Arc::new(StubService::new("ts-pub")))
        .await
        .unwrap();
    let token = common::token("ts-user", &["user"], 600);
    let mut cmd = Command::new("node");
    cmd.arg("--experimental-websocket")
        .arg(dir.join("out/live.js"))
        .env("BFF_URL", format!("ws://{addr}/ws"))
        .env("BFF_TOKEN", &token)
        .env("BFF_TOPIC", &topic)
        .env("BFF_SECRET", common::SECRET)
        .current_dir(&dir);
    let mut script = Script::spawn(cmd);
    let mut bff = Some(bff);
    let mut published = 0;
    loop {
        let request = tokio::task::block_in_place(|| script.next_request(Duration::from_secs(30)));
        match request.as_str() {
            "READY publish" => {
                published += 1;
                publish(&publisher, &format!("{topic}.created"), published).await;
            }
            "READY restart" => {
                // Stop the BFF and, after a while with nobody on the port
                // (reconnect attempts fail meanwhile), start another on it.
                // Events raised meanwhile wait in the BFF's event log.
                let stopped = bff.take().unwrap();
                let name = stopped.gateway.settings().mesh_service_name.clone();
                stopped.stop().await;
                for n in 100..103 {
                    publish(&publisher, &format!("{topic}.created"), n).await;
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let listen = addr.to_string();
                bff = Some(
                    start(
                        &table,
                        auth.clone(),
                        Arc::new(DefaultHandler),
                        move |s| {
                            s.listen = listen;
                            s.mesh_service_name = name;
                        },
                        MeshSetup::Broker,
                    )
                    .await,
                );
                script.go("restarted");
            }
            "DONE" => break,
            other => panic!("unexpected {other}"),
        }
    }
    let seen = tokio::task::block_in_place(|| script.finish());
    for step in [
        "STEP a refused handshake fails",
        "STEP typed calls resolve",
        "STEP errors are typed",
        "STEP event arrived",
        "STEP tokens renewed before expiry",
        "STEP reconnected",
        "STEP missed events recovered",
        "STEP subscription resumed",
    ] {
        assert!(seen.iter().any(|l| l == step), "{step} missing: {seen:?}");
    }
    publisher.close(Duration::from_secs(2)).await;
    if let Some(b) = bff {
        b.stop().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_works_in_a_headless_browser() {
    npm_ready();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no chromium at {chromium}: `apt-get install chromium` or set CHROMIUM"
    );
    let dir = workdir("console");
    let routes = dir.join("routes.toml");
    std::fs::write(
        &routes,
        "[[route]]\ncall = \"echo.greet\"\n\n[[event]]\ntopic = \"news.#\"\ndeliver = \"subscribers\"\n",
    )
    .unwrap();
    // Development mode, as `--dev` runs it: the in-process mesh, HS256.
    let secret = "a-console-secret-of-at-least-32-bytes";
    let mut settings = Settings::new("console-bff");
    settings.routes = routes;
    settings.auth = nuropb_bff::AuthMode::JwtHs256;
    settings.jwt_secret = Some(secret.into());
    let auth = nuropb_bff::auth_from_settings(&settings).unwrap();
    let bff = TestBff::start(settings, auth, Arc::new(DefaultHandler))
        .await
        .unwrap();

    // The page itself: escaped, prefilled with a dev token that works.
    let (status, page) = common::http_get(bff.addr, "/console").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        page.contains("echo.greet") && page.contains("news.#"),
        "{page}"
    );
    let (status, ts) = common::http_get(bff.addr, "/client.ts").await.unwrap();
    assert_eq!(status, 200);
    assert!(ts.contains("export class BffClient"), "{ts}");
    // The typed client as a browser runs it: compiled to a module.
    std::fs::write(dir.join("client.ts"), &ts).unwrap();
    tsc(
        &dir,
        json!({
            "compilerOptions": {
                "strict": true, "target": "es2022", "module": "es2022",
                "moduleResolution": "bundler", "lib": ["es2022", "dom"], "types": [],
                "outDir": "out", "rootDir": "."
            },
            "files": ["client.ts"]
        }),
    );

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/frontend-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("console.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut cmd = Command::new("node");
    cmd.arg(kit().join("console.mjs"))
        .env("BFF_CONSOLE_URL", format!("http://{}/console", bff.addr))
        .env("BFF_SCREENSHOT", &screenshot)
        .env("BFF_CLIENT_JS", dir.join("out/client.js"))
        .env("BFF_WS_URL", format!("ws://{}/ws", bff.addr))
        .env("CHROMIUM", &chromium)
        .current_dir(kit());
    let mut script = Script::spawn(cmd);
    let news = |n: u32| OutgoingEvent {
        topic: "news.client".into(),
        event: json!({"n": n}),
        context: Map::new(),
        target: None,
        trace_id: None,
    };
    let mut next_news = 1;
    loop {
        let request = tokio::task::block_in_place(|| script.next_request(Duration::from_secs(60)));
        match request.as_str() {
            "READY publish" => {
                bff.mesh
                    .publish_event(OutgoingEvent {
                        topic: "news.today".into(),
                        event: json!({"headline": "the console works"}),
                        context: Map::new(),
                        target: None,
                        trace_id: None,
                    })
                    .await
                    .unwrap();
                script.go("published");
            }
            "READY news" => {
                let n = next_news;
                next_news += 1;
                bff.mesh.publish_event(news(n)).await.unwrap();
                script.go("published");
            }
            "READY drop" => {
                // Every socket drops (a phone in a tunnel); three events
                // come while the client is away.
                bff.gateway.sessions().close_all(1011, "dropped");
                for _ in 0..3 {
                    let n = next_news;
                    next_news += 1;
                    bff.mesh.publish_event(news(n)).await.unwrap();
                }
                script.go("dropped");
            }
            "DONE" => break,
            other => panic!("unexpected {other}"),
        }
    }
    let seen = tokio::task::block_in_place(|| script.finish());
    for step in [
        "STEP connected",
        "STEP response",
        "STEP event",
        "STEP the client resumed in the browser",
    ] {
        assert!(seen.iter().any(|l| l == step), "{step} missing: {seen:?}");
    }
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn outside_development_mode_the_console_is_off_unless_asked_for() {
    let routes = "[[route]]\ncall = \"echo.greet\"\n";
    for (console, expected) in [(false, 404), (true, 200)] {
        let bff = start(
            routes,
            common::hs256(),
            Arc::new(DefaultHandler),
            move |s| {
                // Not memory://, but the test's own in-process mesh.
                s.amqp_url = "amqp://unused".into();
                s.console = console;
            },
            MeshSetup::Memory(nuropb_bff::MemoryMesh::new()),
        )
        .await;
        for path in ["/console", "/client.ts"] {
            let (status, _) = common::http_get(bff.addr, path).await.unwrap();
            assert_eq!(status, expected, "{path} with console = {console}");
        }
        let (_, page) = common::http_get(bff.addr, "/console").await.unwrap();
        if console {
            assert!(
                page.contains("value=\"\""),
                "no development token outside development mode"
            );
        }
        bff.stop().await;
    }
}
