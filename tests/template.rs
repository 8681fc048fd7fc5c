//! The template never ships broken: generate BFFs with the real
//! `cargo generate` CLI for several answer sets, then build each, run its own
//! tests, `cargo fmt --check` and `cargo clippy -D warnings` on it, sharing
//! one target directory. Invalid answers must be refused with a message that
//! names the key. And one generated BFF runs as a process against the local
//! RabbitMQ and a real nuropb Python service.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::BffProcess;
use nuropb_bff::testing::{TestClient, hs256_token, http_get};
use serde_json::{Value, json};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn shared_target() -> PathBuf {
    std::env::var_os("BFF_GEN_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target").join("bff-gen"))
}

/// A copy of what `cargo generate` needs (not `target/`, which it would
/// otherwise copy whole), made once per test process.
fn template_checkout() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempdir();
        copy_dir(&repo().join("template"), &d.join("template"));
        copy_dir(&repo().join("hooks"), &d.join("hooks"));
        d
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn generate(dest: &Path, name: &str, answers: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("cargo");
    cmd.arg("generate")
        .arg("--path")
        .arg(template_checkout())
        .arg("--name")
        .arg(name)
        .arg("--silent")
        .arg("--vcs")
        .arg("none")
        .current_dir(dest)
        .env(
            "USER",
            std::env::var("USER").unwrap_or_else(|_| "bff-tests".into()),
        );
    for (k, v) in answers {
        cmd.arg("-d").arg(format!("{k}={v}"));
    }
    cmd.output().expect(
        "run `cargo generate` (install: cargo install cargo-generate --version 0.23.14 --locked)",
    )
}

fn cargo(dir: &Path, args: &[&str]) -> Output {
    Command::new("cargo")
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", shared_target())
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo")
}

fn ok(what: &str, out: &Output) -> String {
    let text = printed(out);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        readable(&text)
    );
    text
}

/// A failed command's output, shaped to be read in a CI report that keeps
/// only its beginning: every line that names an error first, then the last
/// lines, each cut to a few hundred characters (a linker's command line
/// alone is tens of kilobytes, and the reason it failed comes after it).
fn readable(text: &str) -> String {
    const WIDTH: usize = 400;
    let cut = |line: &str| -> String {
        if line.len() <= WIDTH {
            return line.to_string();
        }
        let mut end = WIDTH;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        format!("{} [... {} more bytes]", &line[..end], line.len() - end)
    };
    let lines: Vec<&str> = text.lines().collect();
    let errors: Vec<String> = lines
        .iter()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("error") || l.contains("no space") || l.contains("killed")
        })
        .take(40)
        .map(|l| cut(l))
        .collect();
    let last: Vec<String> = lines[lines.len().saturating_sub(60)..]
        .iter()
        .map(|l| cut(l))
        .collect();
    format!(
        "--- lines naming an error ---\n{}\n--- last {} lines ---\n{}",
        errors.join("\n"),
        last.len(),
        last.join("\n")
    )
}

/// Generate `name` with the local runtime and `answers`; the crate folder.
fn generate_crate(name: &str, answers: &[(&str, &str)]) -> PathBuf {
    let root = tempdir();
    let runtime = repo().display().to_string();
    let mut all: Vec<(&str, &str)> = vec![("runtime_path", runtime.as_str())];
    all.extend_from_slice(answers);
    ok("cargo generate", &generate(&root, name, &all));
    // cargo-generate may rename (`mobile_BFF-2` becomes kebab case): take
    // the one folder it made.
    let made: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let crate_dir = made[0].clone();
    // The repo's lock file pins the same dependency versions, so the shared
    // target directory is reused across generated crates.
    std::fs::copy(repo().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
    crate_dir
}

fn generate_build_and_test(name: &str, answers: &[(&str, &str)]) -> PathBuf {
    let crate_dir = generate_crate(name, answers);
    let tests = ok("cargo test", &cargo(&crate_dir, &["test"]));
    // Six tests, and one more for a composed route.
    let expected = if answers
        .iter()
        .any(|(k, v)| *k == "compose" && !v.is_empty())
    {
        "test result: ok. 7 passed"
    } else {
        "test result: ok. 6 passed"
    };
    assert!(tests.contains(expected), "{tests}");
    // The generated broker test, as its CI's second job runs it.
    let broker = Command::new("cargo")
        .args(["test", "--test", "broker", "--", "--ignored"])
        .current_dir(&crate_dir)
        .env("CARGO_TARGET_DIR", shared_target())
        .env("BFF_TEST_AMQP_URL", common::amqp_url())
        .env_remove("RUSTFLAGS")
        .output()
        .expect("run cargo");
    let broker = ok("cargo test --test broker -- --ignored", &broker);
    assert!(broker.contains("test result: ok. 1 passed"), "{broker}");
    ok("cargo fmt --check", &cargo(&crate_dir, &["fmt", "--check"]));
    ok(
        "cargo clippy",
        &cargo(
            &crate_dir,
            &["clippy", "--all-targets", "--", "-D", "warnings"],
        ),
    );
    crate_dir
}

/// The repository as it is now (tracked files, with their current
/// contents) as a fresh git repository tagged with this release: what a
/// generated crate's default git dependency names.
fn release_clone() -> PathBuf {
    let d = tempdir().join("nuropb-bff");
    let files = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(repo())
        .output()
        .expect("git ls-files");
    for name in String::from_utf8_lossy(&files.stdout).split('\0') {
        let from = repo().join(name);
        if name.is_empty() || !from.is_file() {
            continue;
        }
        let to = d.join(name);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
    }
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "commit.gpgsign=false",
            ])
            .args(args)
            .current_dir(&d)
            .output()
            .expect("git");
        ok(&format!("git {args:?}"), &out);
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "release"]);
    git(&["tag", &format!("v{}", env!("CARGO_PKG_VERSION"))]);
    d
}

/// The runtime's `repository` from its Cargo.toml.
fn repository_url() -> String {
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap()).unwrap();
    manifest["package"]["repository"]
        .as_str()
        .expect("Cargo.toml names its repository")
        .to_owned()
}

#[test]
fn the_template_names_this_release_of_the_runtime() {
    let hook = std::fs::read_to_string(repo().join("hooks/pre.rhai")).unwrap();
    let url = repository_url();
    assert!(
        hook.contains(&format!("const RUNTIME_REPOSITORY = \"{url}\";")),
        "hooks/pre.rhai must name the repository of Cargo.toml ({url})"
    );
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        hook.contains(&format!("const RUNTIME_VERSION = \"{version}\";")),
        "hooks/pre.rhai must name the version of Cargo.toml ({version})"
    );
}

#[test]
fn the_runtime_package_holds_the_runtime_only() {
    let out = Command::new("cargo")
        .args(["package", "--list", "--allow-dirty"])
        .current_dir(repo())
        .output()
        .expect("cargo package --list");
    let list = ok("cargo package --list", &out);
    let files: Vec<&str> = list.lines().filter(|l| !l.starts_with("warning")).collect();
    for needed in [
        "Cargo.toml",
        "src/lib.rs",
        "src/gateway.rs",
        "src/mesh/amqp/mod.rs",
        "src/mesh/lane/assemble.rs",
        "PROTOCOL.md",
        "README.md",
    ] {
        assert!(files.contains(&needed), "{needed} missing from:\n{list}");
    }
    for f in &files {
        let outside = [
            "template/",
            "tests/",
            "hooks/",
            "benches/",
            "scripts/",
            ".ci/",
            ".venv",
        ]
        .iter()
        .any(|p| f.starts_with(p));
        assert!(!outside, "{f} should not be in the package:\n{list}");
    }
}

/// The `run` steps of a job of a GitHub workflow, checked to be YAML of the
/// expected shape.
fn workflow_steps(workflow: &Path, job: &str) -> (Vec<String>, Vec<(String, String)>) {
    let text = std::fs::read_to_string(workflow).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("the workflow is YAML");
    let job = &doc["jobs"][job];
    assert!(job["runs-on"].is_string(), "{job:?}");
    let steps = job["steps"].as_sequence().expect("steps");
    assert!(
        steps.iter().any(|s| s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("dtolnay/rust-toolchain@1.95"))),
        "the job pins the toolchain"
    );
    let runs = steps
        .iter()
        .filter_map(|s| s["run"].as_str().map(str::to_owned))
        .collect();
    let env = job["env"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_owned(),
                        v.as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (runs, env)
}

#[test]
fn default_answers_from_a_git_clone_build_and_pass_their_ci() {
    let clone = release_clone();
    let root = tempdir();
    let out = Command::new("cargo")
        .args(["generate", "--git"])
        .arg(format!("file://{}", clone.display()))
        .args(["--name", "plain-bff", "--silent", "--vcs", "none"])
        .current_dir(&root)
        .env(
            "USER",
            std::env::var("USER").unwrap_or_else(|_| "bff-tests".into()),
        )
        .output()
        .expect("cargo generate --git");
    ok("cargo generate --git (default answers)", &out);
    let crate_dir = root.join("plain-bff");
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    let url = repository_url();
    let tag = format!("v{}", env!("CARGO_PKG_VERSION"));
    assert!(
        manifest.contains(&format!(
            "nuropb-bff = {{ git = \"{url}\", tag = \"{tag}\" }}"
        )),
        "{manifest}"
    );
    assert!(!crate_dir.join("Cargo.lock").exists());
    assert_eq!(
        std::fs::read_to_string(crate_dir.join(".gitignore"))
            .unwrap()
            .trim(),
        "/target"
    );
    assert!(!crate_dir.join("cargo-generate.toml").exists());

    // The repository URL leads to the clone (as if it were public); the
    // generated Cargo.toml is built as it is.
    let git_config = root.join("gitconfig");
    std::fs::write(
        &git_config,
        format!(
            "[url \"file://{}\"]\n\tinsteadOf = {url}\n",
            clone.display()
        ),
    )
    .unwrap();
    let workflow = crate_dir.join(".github/workflows/ci.yml");
    for job in ["test", "broker"] {
        let (runs, env) = workflow_steps(&workflow, job);
        assert!(!runs.is_empty(), "{job} runs nothing");
        for run in runs {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(&run)
                .current_dir(&crate_dir)
                .env("GIT_CONFIG_GLOBAL", &git_config)
                .env("CARGO_NET_GIT_FETCH_WITH_CLI", "true")
                .env("CARGO_TARGET_DIR", shared_target())
                .env_remove("RUSTFLAGS");
            for (k, v) in &env {
                let v = if k == "BFF_TEST_AMQP_URL" {
                    common::amqp_url()
                } else {
                    v.clone()
                };
                cmd.env(k, v);
            }
            let out = cmd.output().expect("run a CI step");
            let text = ok(&format!("CI job {job}: `{run}`"), &out);
            if run.contains("--ignored") {
                assert!(text.contains("1 passed"), "{text}");
            }
        }
    }
}

/// What a command printed, its standard output then its errors.
fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("bff-gen-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn answer_sets_generate_crates_that_build_and_pass_their_own_tests() {
    // Defaults: jwt-hs256, one wildcard route, no events.
    let d = generate_build_and_test("web-bff", &[]);
    let routes = std::fs::read_to_string(d.join("routes.toml")).unwrap();
    assert!(routes.contains("call = \"echo.*\""), "{routes}");
    assert_no_private_key(&d);

    // RS256, event topics, several routes, an unusual but valid name.
    let d = generate_build_and_test(
        "mobile_BFF-2",
        &[
            ("auth", "jwt-rs256"),
            ("routes", "orders.get_order, users.*,billing-v2.charge"),
            ("event_topics", "orders.#,users.*.updated"),
            (
                "compose",
                "home.load=orders.get_order+users.get_profile;me.all=users.a+users.b",
            ),
            ("hello_call", "users.get_profile"),
            ("mesh_service_name", "mobile-edge"),
            ("port", "9443"),
            ("ws_path", "/api/ws"),
            (
                "allowed_origins",
                "https://app.example.com,http://localhost:5173",
            ),
        ],
    );
    let routes = std::fs::read_to_string(d.join("routes.toml")).unwrap();
    for expected in [
        "call = \"orders.get_order\"",
        "call = \"users.*\"",
        "call = \"billing-v2.charge\"",
        "topic = \"orders.#\"",
        "topic = \"users.*.updated\"",
        "name = \"home.load\"",
        "call = \"users.get_profile\"",
    ] {
        assert!(
            routes.contains(expected),
            "{expected} missing from\n{routes}"
        );
    }
    let config = std::fs::read_to_string(d.join("config/default.toml")).unwrap();
    assert!(config.contains("listen = \"127.0.0.1:9443\""), "{config}");
    assert!(
        config.contains("hello_call = \"users.get_profile\""),
        "{config}"
    );
    assert!(
        config.contains("\"https://app.example.com\", \"http://localhost:5173\""),
        "{config}"
    );
    assert_no_private_key(&d);

    // JWKS: its tests run against a JWKS endpoint they start.
    let d = generate_build_and_test(
        "idp-bff",
        &[
            ("auth", "jwks"),
            ("jwt_issuer", "https://login.example.com/realms/shop"),
        ],
    );
    let config = std::fs::read_to_string(d.join("config/default.toml")).unwrap();
    assert!(
        config.contains("jwt_issuer = \"https://login.example.com/realms/shop\""),
        "{config}"
    );
    assert!(config.contains("[jwks]"), "{config}");
    assert_no_private_key(&d);

    // No auth.
    generate_build_and_test("open-bff", &[("auth", "none"), ("routes", "catalog.list")]);
}

/// No private key anywhere in what was generated (the build output aside).
fn assert_no_private_key(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path
                .file_name()
                .is_some_and(|n| n == "target" || n == ".git")
            {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                let text = std::fs::read(&path).unwrap();
                let text = String::from_utf8_lossy(&text);
                assert!(
                    !text.contains("PRIVATE KEY-----"),
                    "{} holds a private key",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn invalid_answers_are_refused_naming_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("routes", "orders", "routes"),
        ("routes", "orders.get,bad route", "routes"),
        ("port", "http", "port"),
        ("port", "70000", "port"),
        ("auth", "magic", "auth"),
        ("jwt_issuer", "not a url", "jwt_issuer"),
        ("jwt_issuer", "https://idp.example.com", "jwt_issuer"),
        ("event_topics", "orders..x", "event_topics"),
        ("ws_path", "ws", "ws_path"),
        ("mesh_service_name", "has space", "mesh_service_name"),
        ("allowed_origins", "localhost", "allowed_origins"),
        ("runtime_path", "relative/path", "runtime_path"),
        ("runtime_source", "path", "runtime_path"),
        ("runtime_source", "svn", "runtime_source"),
        ("compose", "home.load", "compose"),
        ("hello_call", "users", "hello_call"),
    ];
    for (key, value, named) in cases {
        let root = tempdir();
        let out = generate(&root, "bad-bff", &[(key, value)]);
        let text = printed(&out);
        assert!(!out.status.success(), "{key}={value} was accepted:\n{text}");
        assert!(
            text.contains(named),
            "{key}={value}: message does not name `{named}`:\n{text}"
        );
        let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().collect();
        let half_written = left.iter().any(|e| {
            std::fs::read_dir(e.path())
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        });
        assert!(!half_written, "{key}={value} left files behind: {left:?}");
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// The generated settings file names what a team sets; the runtime's
/// defaults stand in it as comments, and they are this release's defaults.
#[test]
fn the_generated_settings_show_the_runtimes_defaults_as_comments() {
    let text = std::fs::read_to_string(repo().join("template/config/default.toml")).unwrap();
    let (set, defaults) = text
        .split_once("# The runtime's defaults")
        .expect("a section of defaults");
    for key in [
        "log",
        "shutdown_grace_ms",
        "[limits]",
        "[mesh_api]",
        "max_frame_bytes",
    ] {
        assert!(
            !set.lines().any(|l| l.trim_start().starts_with(key)),
            "`{key}` is set, not left to the runtime"
        );
    }
    // The commented lines, uncommented, as a TOML document.
    let uncommented: String = defaults
        .lines()
        .skip(1)
        .filter(|l| !l.starts_with("{%"))
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let shown: toml::Table =
        toml::from_str(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    let runtime = toml::Table::try_from(nuropb_bff::Settings::new("x")).unwrap();
    let mut compared = 0;
    for (key, value) in &shown {
        match value {
            toml::Value::Table(section) => {
                for (k, v) in section {
                    assert_eq!(Some(v), runtime[key].get(k), "[{key}] {k}");
                    compared += 1;
                }
            }
            v => {
                assert_eq!(Some(v), runtime.get(key), "{key}");
                compared += 1;
            }
        }
    }
    assert!(compared > 20, "{compared} defaults shown:\n{uncommented}");
}

/// Answers of the right form that disagree with each other generate a crate
/// whose own test stops with the runtime's message (the one the BFF would
/// start with): the hook writes entries and checks none of them.
#[test]
fn answers_that_disagree_are_reported_by_the_runtime_in_the_crates_own_test() {
    type Answers<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(&str, Answers, &str)] = &[
        (
            "twice-bff",
            &[("routes", "orders.get,orders.get")],
            "`orders.get` is routed twice",
        ),
        (
            "part-bff",
            &[("routes", "svc.*"), ("compose", "home.load=svc.9x")],
            "`svc.9x` is not routed",
        ),
        (
            "hello-bff",
            &[("routes", "echo.*"), ("hello_call", "users.get_profile")],
            "hello_call (BFF_HELLO_CALL): `users.get_profile` is not routed",
        ),
    ];
    for (name, answers, message) in cases {
        let d = generate_crate(name, answers);
        let out = cargo(&d, &["test", "--test", "bff", "the_routing_table_is_valid"]);
        let text = printed(&out);
        assert!(!out.status.success(), "{name}: its test passed:\n{text}");
        assert!(
            text.contains(message),
            "{name}: `{message}` not in:\n{text}"
        );
    }
}

#[test]
fn a_generated_bff_process_serves_a_real_nuropb_service_over_rabbitmq() {
    let py = common::unique("e2e-svc");
    let absent = common::unique("e2e-absent");
    let mesh_name = common::unique("e2e-bff");
    let routes = format!("{py}.*,{absent}.*");
    let crate_dir = generate_crate(
        "e2e-bff",
        &[("routes", &routes), ("mesh_service_name", &mesh_name)],
    );
    ok("cargo build", &cargo(&crate_dir, &["build"]));
    let bin = shared_target().join("debug").join("e2e-bff");
    let secret = "an-end-to-end-secret-of-32-bytes-or-more";
    let rt = tokio::runtime::Runtime::new().unwrap();

    // The typed TypeScript client, from the generated routing table.
    let client_ts = crate_dir.join("bff.ts");
    let mut p = BffProcess::spawn(
        &bin,
        &crate_dir,
        &["client-ts", "--out", client_ts.to_str().unwrap()],
        &[],
    );
    let (status, log) = p.exit(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    let ts = std::fs::read_to_string(&client_ts).unwrap();
    assert!(ts.contains("export class BffClient"), "{ts}");
    assert!(
        ts.contains(&format!("\"{py}\": {{")),
        "a namespace per routed service:\n{ts}"
    );
    drop(p);

    // `routes check`: the routing file checked as start-up checks it,
    // without starting; a bad one fails with the same message.
    let mut p = BffProcess::spawn(&bin, &crate_dir, &["routes", "check"], &[]);
    let (status, log) = p.exit(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    assert!(log.contains("routes.toml: valid (2 routes"), "{log}");
    drop(p);
    let bad = crate_dir.join("bad-routes.toml");
    std::fs::write(&bad, "[[route]]\ncall = \"orders\"\n").unwrap();
    let mut p = BffProcess::spawn(
        &bin,
        &crate_dir,
        &["routes", "check", bad.to_str().unwrap()],
        &[],
    );
    let (status, log) = p.exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("bad-routes.toml:2:8"), "{log}");
    drop(p);

    // A guessable secret outside development mode: refused at start.
    let mut p = BffProcess::spawn(&bin, &crate_dir, &[], &[("BFF_JWT_SECRET", "e2e-secret")]);
    let (status, log) = p.exit(Duration::from_secs(60));
    assert!(!status.success(), "{log}");
    assert!(log.contains("at least 32"), "{log}");
    drop(p);

    // A worker thread count tokio cannot take: refused at start, named
    // (tokio itself would panic on it).
    let mut p = BffProcess::spawn(
        &bin,
        &crate_dir,
        &["--dev"],
        &[("BFF_JWT_SECRET", secret), ("TOKIO_WORKER_THREADS", "0")],
    );
    let (status, log) = p.exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("TOKIO_WORKER_THREADS"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    drop(p);

    // No broker at the configured URL and no --dev: exits, naming the URL
    // and both ways to start.
    let mut p = BffProcess::spawn(
        &bin,
        &crate_dir,
        &[],
        &[
            ("BFF_JWT_SECRET", secret),
            ("BFF_AMQP_URL", "amqp://guest:hunter2@127.0.0.1:1/%2f"),
        ],
    );
    let (status, log) = p.exit(Duration::from_secs(60));
    assert!(!status.success(), "{log}");
    assert!(log.contains("127.0.0.1:1"), "the URL is not named:\n{log}");
    assert!(!log.contains("hunter2"), "the password leaked:\n{log}");
    assert!(log.contains("rabbitmq-server"), "{log}");
    assert!(log.contains("memory://"), "{log}");
    drop(p);

    // Against the local RabbitMQ and a real nuropb service.
    let _service = common::start_python_service(&py);
    // `routes check --live` against the real service: its routes exist; a
    // route to a method it lacks is named.
    let live = crate_dir.join("live-routes.toml");
    std::fs::write(
        &live,
        format!("[[route]]\ncall = \"{py}.hello\"\n\n[[route]]\ncall = \"{py}.no_such_method\"\n"),
    )
    .unwrap();
    let mut p = BffProcess::spawn(
        &bin,
        &crate_dir,
        &["routes", "check", "--live", live.to_str().unwrap()],
        &[("BFF_AMQP_URL", &common::amqp_url())],
    );
    let (status, log) = p.exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains(&format!("`{py}.no_such_method`")), "{log}");
    assert!(!log.contains(&format!("`{py}.hello`")), "{log}");
    drop(p);
    let mut p = BffProcess::spawn(
        &bin,
        &crate_dir,
        &[],
        &[
            ("BFF_JWT_SECRET", secret),
            ("BFF_AMQP_URL", &common::amqp_url()),
            ("BFF_LISTEN", "127.0.0.1:0"),
        ],
    );
    let addr = p.serving_addr();
    let url = format!("ws://{addr}/ws");
    let token = hs256_token(secret, "alice", &["user"], 300);
    let mut client = rt.block_on(async {
        assert_eq!(http_get(addr, "/readyz").await.unwrap().0, 200);
        let mut c = TestClient::connect(&url, Some(&token)).await.unwrap();
        let hello = c.recv().await.unwrap();
        assert_eq!(hello["payload"]["event"]["user_id"], "alice", "{hello}");

        let r = c
            .request(&py, "hello", json!({"name": "e2e"}))
            .await
            .unwrap();
        assert_eq!(r["result"], "hello e2e", "{r}");
        let r = c.request(&py, "whoami", json!({})).await.unwrap();
        assert_eq!(
            r["result"],
            json!({"sub": "alice", "user_id": "alice"}),
            "{r}"
        );
        let r = c.request(&py, "boom", json!({})).await.unwrap();
        assert_eq!(r["error"]["error"], "NuropbException", "{r}");
        let started = Instant::now();
        let r = c.request(&absent, "x", json!({})).await.unwrap();
        assert_eq!(r["error"]["error"], "NuropbNotDeliveredError", "{r}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let r = c.request("billing", "charge", json!({})).await.unwrap();
        assert_eq!(r["error"]["error"], "RouteNotFound", "{r}");
        // The template's BFF-local route.
        let r = c.request("bff", "whoami", json!({})).await.unwrap();
        assert_eq!(r["result"]["user_id"], "alice", "{r}");
        c
    });
    // A nuropb Python client pushes to alice through the BFF's mesh method,
    // with a service token carrying the push role (without one: refused).
    let params = json!({"user_ids": ["alice"], "message": {"n": 1}, "topic": "note"});
    let refused = common::python_client(&mesh_name, "send_to_users", params.clone());
    assert_eq!(refused["error"], "NuropbAuthorizationError", "{refused}");
    let service_token = hs256_token(secret, "svc-orders", &["bff:push"], 300);
    let pushed = common::python_client_as(
        &mesh_name,
        "send_to_users",
        params,
        &json!({"Authorization": service_token}),
    );
    assert_eq!(pushed["result"]["delivered"], 1, "{pushed}");
    rt.block_on(async {
        let event = client.recv().await.unwrap();
        assert_eq!(
            event,
            json!({"type":"event","payload":{"topic":"note","event":{"n":1}}})
        );
    });
    // SIGTERM: sessions are closed with 1001, then a clean exit.
    p.terminate();
    let code = rt.block_on(client.closed()).unwrap();
    assert_eq!(code, Some(1001));
    let (status, log) = p.exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(log.contains("stopped"), "{log}");
    drop(p);

    // Development mode: explicit, loud, and served by echo stubs; it takes
    // the short secret README's first command gives it (`--dev` is settled
    // before the settings are checked).
    let mut p = BffProcess::spawn(
        &bin,
        &crate_dir,
        &["--dev"],
        &[
            ("BFF_JWT_SECRET", "dev-secret"),
            ("BFF_LISTEN", "127.0.0.1:0"),
        ],
    );
    let addr = p.serving_addr();
    p.wait_for(
        "DEVELOPMENT MODE: never run this in production",
        Duration::from_secs(5),
    );
    // It hands the frontend developer a token to connect with.
    let line = p.wait_for("a token for user dev-user", Duration::from_secs(5));
    let dev_token = line.split_whitespace().last().unwrap().to_owned();
    rt.block_on(async {
        let mut c = TestClient::connect(&format!("ws://{addr}/ws"), Some(&dev_token))
            .await
            .unwrap();
        let hello = c.recv().await.unwrap();
        assert_eq!(hello["payload"]["event"]["user_id"], "dev-user", "{hello}");
        let r: Value = c
            .request(&py, "hello", json!({"name": "dev"}))
            .await
            .unwrap();
        assert_eq!(r["result"]["service"], py.as_str(), "{r}");
        assert_eq!(r["result"]["params"], json!({"name": "dev"}), "{r}");
    });
    p.terminate();
    let (status, log) = p.exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");
}

/// Write one version of a routing file the way a Kubernetes ConfigMap
/// volume holds it: `dir/..{version}/routes.toml`.
fn configmap_version(dir: &Path, version: &str, routes: &str) {
    let v = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&v).unwrap();
    std::fs::write(v.join("routes.toml"), routes).unwrap();
}

/// Point `dir/..data` at a version atomically, as the kubelet does: a new
/// symlink renamed over the old one.
fn configmap_swap(dir: &Path, version: &str) {
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

/// Call until the answer is no longer `RouteNotFound` (or `within` ends):
/// the answer and how long it took.
async fn until_routed(
    c: &mut TestClient,
    service: &str,
    method: &str,
    within: Duration,
) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let r = c.request(service, method, json!({})).await.unwrap();
        if r["error"]["error"] != "RouteNotFound" {
            return (r, started.elapsed());
        }
        assert!(
            started.elapsed() < within,
            "{service}.{method} still not routed after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn reloads(addr: std::net::SocketAddr, result: &str) -> u64 {
    let text = http_get(addr, "/metrics").await.unwrap().1;
    common::metric(
        &text,
        &format!("bff_routes_reload_total{{result=\"{result}\"}}"),
    )
}

#[test]
fn a_generated_bff_reloads_its_routing_file_without_dropping_a_socket() {
    let py = common::unique("rl-svc");
    let mesh_name = common::unique("rl-bff");
    let root = common::unique("rl");
    let crate_dir = generate_crate(
        "reload-bff",
        &[
            ("routes", &format!("{py}.hello")),
            ("mesh_service_name", &mesh_name),
        ],
    );
    ok("cargo build", &cargo(&crate_dir, &["build"]));
    let bin = shared_target().join("debug").join("reload-bff");
    let _service = common::start_python_service(&py);
    let secret = "a-reload-test-secret-of-32-bytes-or-more";
    let token = hs256_token(secret, "alice", &["user"], 600);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let routes = |methods: &[&str], topics: &[&str]| -> String {
        let mut text: String = methods
            .iter()
            .map(|m| format!("[[route]]\ncall = \"{py}.{m}\"\n\n"))
            .collect();
        for t in topics {
            text.push_str(&format!("[[event]]\ntopic = \"{root}.{t}.#\"\n\n"));
        }
        text
    };

    // The routing file as a ConfigMap volume holds it.
    let conf = crate_dir.join("conf");
    configmap_version(
        &conf,
        "v1",
        &routes(&["exact", "hello", "nap"], &["news", "audit"]),
    );
    configmap_swap(&conf, "v1");
    std::os::unix::fs::symlink("..data/routes.toml", conf.join("routes.toml")).unwrap();
    let routes_path = conf.join("routes.toml");
    let env = |watch: &'static str| {
        vec![
            ("BFF_JWT_SECRET", secret.to_owned()),
            ("BFF_AMQP_URL", common::amqp_url()),
            ("BFF_LISTEN", "127.0.0.1:0".to_owned()),
            ("BFF_ROUTES", routes_path.display().to_string()),
            ("BFF_HELLO_CALL", format!("{py}.exact")),
            ("BFF_WATCH_ROUTES", watch.to_owned()),
        ]
    };
    let spawn = |env: &[(&str, String)]| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        BffProcess::spawn(&bin, &crate_dir, &[], &env)
    };

    // SIGHUP, with the watch off: the file is read only when told.
    let mut p = spawn(&env("false"));
    let addr = p.serving_addr();
    let url = format!("ws://{addr}/ws");
    let (news, audit) = (format!("{root}.news.#"), format!("{root}.audit.#"));
    let mut c = rt.block_on(async {
        let mut c = TestClient::connect(&url, Some(&token)).await.unwrap();
        let hello = c.recv().await.unwrap();
        assert_eq!(hello["payload"]["event"]["data"]["b"], 1, "{hello}");
        c.send(json!({"type":"subscribe","payload":{"topics":[news, audit]}}))
            .await
            .unwrap();
        assert_eq!(c.recv().await.unwrap()["type"], "subscribed");
        let r = c.request(&py, "whoami", json!({})).await.unwrap();
        assert_eq!(r["error"]["error"], "RouteNotFound", "{r}");
        // A call in flight across the reload.
        c.send(json!({"type":"request","payload":{"service":py,"method":"nap","params":{"ms":1500},"trace_id":"across"}}))
            .await
            .unwrap();
        c
    });
    configmap_version(
        &conf,
        "v1",
        &routes(&["exact", "hello", "nap", "whoami"], &["news", "audit"]),
    );
    std::thread::sleep(Duration::from_millis(300));
    rt.block_on(async {
        let r = c.request(&py, "whoami", json!({})).await.unwrap();
        assert_eq!(r["error"]["error"], "RouteNotFound", "not watched: {r}");
    });
    p.signal("HUP");
    let took = rt.block_on(async {
        let (r, took) = until_routed(&mut c, &py, "whoami", Duration::from_secs(10)).await;
        assert_eq!(r["result"]["user_id"], "alice", "{r}");
        // The nap started under the old table answers.
        loop {
            let f = c.recv().await.unwrap();
            if f["payload"]["trace_id"] == "across" {
                assert_eq!(f["payload"]["result"], 1500, "{f}");
                break;
            }
        }
        took
    });
    println!("a new route answered {took:?} after SIGHUP");
    // A narrowed event rule: the subscription goes, saying why.
    configmap_version(
        &conf,
        "v1",
        &routes(&["exact", "hello", "nap", "whoami"], &["news"]),
    );
    p.signal("HUP");
    rt.block_on(async {
        loop {
            let f = c.recv().await.unwrap();
            if f["type"] == "unsubscribed" {
                assert_eq!(f["payload"]["topics"], json!([audit]), "{f}");
                break;
            }
        }
        // A removed route: RouteNotFound on the next call.
        configmap_version(
            &conf,
            "v1",
            &routes(&["exact", "hello", "whoami"], &["news"]),
        );
    });
    p.signal("HUP");
    rt.block_on(async {
        let started = Instant::now();
        loop {
            let r = c.request(&py, "nap", json!({"ms": 1})).await.unwrap();
            if r["error"]["error"] == "RouteNotFound" {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{r}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(reloads(addr, "ok").await, 3);
    });
    // A syntax error, then a table that leaves hello_call unrouted: each
    // counted, logged with the start-up message, and the old table serves.
    configmap_version(&conf, "v1", "[[route]\n");
    p.signal("HUP");
    p.wait_for("routes.toml:1:", Duration::from_secs(10));
    configmap_version(&conf, "v1", &routes(&["hello", "whoami"], &["news"]));
    p.signal("HUP");
    p.wait_for("hello_call (BFF_HELLO_CALL)", Duration::from_secs(10));
    rt.block_on(async {
        assert_eq!(reloads(addr, "error").await, 2);
        assert_eq!(reloads(addr, "ok").await, 3);
        let r = c
            .request(&py, "hello", json!({"name": "still"}))
            .await
            .unwrap();
        assert_eq!(r["result"], "hello still", "{r}");
        assert_eq!(http_get(addr, "/readyz").await.unwrap().0, 200);
    });
    let log = p.log_now();
    assert!(
        log.contains("routing table reloaded") && log.contains("added: route"),
        "what changed is logged:\n{log}"
    );
    p.terminate();
    assert_eq!(rt.block_on(c.closed()).unwrap(), Some(1001));
    let (status, log) = p.exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");

    // Watched (the default): a plain write of the file, then a ConfigMap
    // symlink swap.
    configmap_version(&conf, "v1", &routes(&["exact", "hello"], &["news"]));
    let mut p = spawn(&env("true"));
    let addr = p.serving_addr();
    let url = format!("ws://{addr}/ws");
    let (write_took, swap_took) = rt.block_on(async {
        let mut c = TestClient::connect(&url, Some(&token)).await.unwrap();
        c.recv().await.unwrap();
        std::fs::write(&routes_path, routes(&["exact", "hello", "add"], &["news"])).unwrap();
        let (_, write_took) = until_routed(&mut c, &py, "add", Duration::from_secs(10)).await;
        configmap_version(
            &conf,
            "v2",
            &routes(&["exact", "hello", "add", "boom"], &["news"]),
        );
        configmap_swap(&conf, "v2");
        let (r, swap_took) = until_routed(&mut c, &py, "boom", Duration::from_secs(10)).await;
        assert_eq!(r["error"]["error"], "NuropbException", "{r}");
        let r = c
            .request(&py, "add", json!({"a": 2, "b": 3}))
            .await
            .unwrap();
        assert_eq!(r["result"], 5, "the same socket throughout: {r}");
        assert_eq!(reloads(addr, "ok").await, 2);
        (write_took, swap_took)
    });
    println!(
        "a new route answered {write_took:?} after a file write, {swap_took:?} after a symlink swap"
    );
    p.terminate();
    let (status, log) = p.exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");
}

/// Two processes of one generated BFF and a real nuropb Python service
/// bound to its lifecycle events: presence counts both instances, and
/// when one is killed (not drained) the other says its sessions are gone.
#[test]
fn a_killed_instance_is_noticed_and_its_sessions_said_lost() {
    let mesh_name = common::unique("lc-bff");
    let crate_dir = generate_crate(
        "presence-bff",
        &[("routes", "echo.*"), ("mesh_service_name", &mesh_name)],
    );
    let config = std::fs::read_to_string(crate_dir.join("config/default.toml")).unwrap();
    assert!(
        config.contains("lifecycle_events = true"),
        "on by default:\n{config}"
    );
    ok("cargo build", &cargo(&crate_dir, &["build"]));
    let bin = shared_target().join("debug").join("presence-bff");
    let mut listener = common::start_python_listener(
        &common::unique("lc-listener"),
        &[&format!("bff.{mesh_name}.#")],
    );
    let secret = "a-presence-test-secret-of-32-bytes-or-more";
    let heartbeat = Duration::from_millis(500);
    let spawn = |id: &str| {
        BffProcess::spawn(
            &bin,
            &crate_dir,
            &[],
            &[
                ("BFF_JWT_SECRET", secret),
                ("BFF_AMQP_URL", &common::amqp_url()),
                ("BFF_LISTEN", "127.0.0.1:0"),
                ("BFF_INSTANCE_ID", id),
                (
                    "BFF_CLUSTER_KEY",
                    "a-cluster-key-of-thirty-two-bytes-or-more",
                ),
                ("BFF_MESH_API__HEARTBEAT_MS", "500"),
            ],
        )
    };
    let mut a = spawn("pa");
    let mut b = spawn("pb");
    let (addr_a, addr_b) = (a.serving_addr(), b.serving_addr());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let token = hs256_token(secret, "alice", &[], 600);
    let sockets = rt.block_on(async {
        let mut held = Vec::new();
        for addr in [addr_a, addr_a, addr_b] {
            let mut c = TestClient::connect(&format!("ws://{addr}/ws"), Some(&token))
                .await
                .unwrap();
            c.recv().await.unwrap();
            held.push(c);
        }
        held
    });
    let presence = |who: &str| {
        common::python_client_as(
            &mesh_name,
            "presence",
            json!({"user_ids": [who]}),
            &json!({"Authorization": hs256_token(secret, "svc-crm", &["bff:presence"], 300)}),
        )
    };
    // Both instances have heard each other (and each other's sessions).
    std::thread::sleep(heartbeat * 3);
    let asked = presence("alice");
    assert_eq!(
        asked["result"]["alice"],
        json!({"sessions": 3, "instances": 2}),
        "{asked}"
    );
    let all_connected = listener.wait(Duration::from_secs(20), |seen| {
        seen.iter()
            .filter(|e| e["topic"] == format!("bff.{mesh_name}.connected").as_str())
            .count()
            == 3
    });
    if let Err(why) = all_connected {
        let dropped = |addr| {
            let text = rt.block_on(http_get(addr, "/metrics")).unwrap().1;
            common::metric(&text, "bff_lifecycle_events_dropped_total")
        };
        panic!(
            "{why}\nlifecycle events dropped: pa {}, pb {}\npa:\n{}\npb:\n{}",
            dropped(addr_a),
            dropped(addr_b),
            a.log_now(),
            b.log_now()
        );
    }

    b.kill();
    let killed = Instant::now();
    let seen = listener.until(Duration::from_secs(20), |seen| {
        seen.iter().any(|e| e["event"]["why"] == "instance_lost")
    });
    let noticed = killed.elapsed();
    let lost: Vec<&Value> = seen
        .iter()
        .filter(|e| e["event"]["why"] == "instance_lost")
        .collect();
    assert_eq!(lost.len(), 1, "the one session B held, said once: {lost:?}");
    assert_eq!(lost[0]["event"]["user_id"], "alice");
    assert_eq!(lost[0]["event"]["instance"], "pb");
    println!(
        "a killed instance's sessions were said lost {noticed:?} after the kill (heartbeat {heartbeat:?})"
    );
    assert!(noticed < heartbeat * 6, "noticed after {noticed:?}");
    let asked = presence("alice");
    assert_eq!(
        asked["result"]["alice"],
        json!({"sessions": 2, "instances": 1}),
        "{asked}"
    );
    // A drained instance says its sessions ended for a shutdown.
    a.terminate();
    let (status, log) = a.exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    listener.until(Duration::from_secs(20), |seen| {
        seen.iter()
            .filter(|e| e["event"]["why"] == "shutdown")
            .count()
            == 2
    });
    drop(sockets);
}

/// The W3C ids of a `traceparent`: (trace id, span id).
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "not a traceparent: {traceparent}");
    (parts[1].to_owned(), parts[2].to_owned())
}

async fn spans_metric(addr: std::net::SocketAddr, series: &str) -> u64 {
    let text = http_get(addr, "/metrics").await.unwrap().1;
    common::metric(&text, series)
}

/// `n` calls one after another: how long they took, the median.
async fn median_call(c: &mut TestClient, service: &str, n: usize) -> Duration {
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let r = c
            .request(service, "add", json!({"a": 1, "b": 2}))
            .await
            .unwrap();
        assert_eq!(r["result"], 3, "{r}");
        took.push(started.elapsed());
    }
    took.sort();
    took[n / 2]
}

#[test]
fn a_generated_bff_exports_one_trace_from_the_browser_to_the_python_service() {
    let py = common::unique("ot-svc");
    let mesh_name = common::unique("ot-bff");
    let crate_dir = generate_crate(
        "otlp-bff",
        &[
            ("routes", &format!("{py}.*")),
            ("mesh_service_name", &mesh_name),
        ],
    );
    // A composed route of three parts, each asking the service what
    // trace it was called in.
    let mut routes =
        format!("[[route]]\ncall = \"{py}.*\"\n\n[[compose]]\nname = \"screen.traced\"\n");
    for key in ["a", "b", "c"] {
        routes.push_str(&format!(
            "[[compose.part]]\nkey = \"{key}\"\ncall = \"{py}.trace\"\n"
        ));
    }
    std::fs::write(crate_dir.join("routes.toml"), routes).unwrap();
    ok("cargo build", &cargo(&crate_dir, &["build"]));
    let bin = shared_target().join("debug").join("otlp-bff");
    let mut collector = common::otlp::OtlpReceiver::start();
    let secret = "an-otlp-test-secret-of-32-bytes-or-more";
    let endpoint = collector.endpoint();
    let mut p = BffProcess::spawn(
        &bin,
        &crate_dir,
        &[],
        &[
            ("BFF_JWT_SECRET", secret),
            ("BFF_AMQP_URL", &common::amqp_url()),
            ("BFF_LISTEN", "127.0.0.1:0"),
            ("BFF_OTLP_ENDPOINT", &endpoint),
            ("BFF_HELLO_CALL", &format!("{py}.trace")),
        ],
    );
    let addr = p.serving_addr();
    // After the BFF: it declares the mesh's exchanges on a fresh broker.
    let _service = common::start_python_service(&py);
    let url = format!("ws://{addr}/ws");
    let token = hs256_token(secret, "alice", &["user"], 600);
    let rt = tokio::runtime::Runtime::new().unwrap();

    let socket_parent = "00-11111111111111111111111111111111-2222222222222222-01";
    let call_parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let composed_parent = "00-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-bbbbbbbbbbbbbbbb-01";
    let (hello, plain, composed, malformed, mut c) = rt.block_on(async {
        let bearer = format!("Bearer {token}");
        let mut c = TestClient::connect_with(&url, |req| {
            req.headers_mut()
                .insert("authorization", bearer.parse().unwrap());
            req.headers_mut()
                .insert("traceparent", socket_parent.parse().unwrap());
        })
        .await
        .unwrap();
        let hello = c.recv().await.unwrap()["payload"]["event"]["data"].clone();
        let mut traced = async |service: &str, method: &str, traceparent: &str| {
            c.send(
                json!({"type":"request","payload":{"service":service,"method":method,
                "params":{},"trace_id":"t","traceparent":traceparent}}),
            )
            .await
            .unwrap();
            c.recv().await.unwrap()["payload"].clone()
        };
        let plain = traced(&py, "trace", call_parent).await;
        let composed = traced("screen", "traced", composed_parent).await;
        let malformed = traced(&py, "trace", "00-not-a-trace-01").await;
        (hello, plain, composed, malformed, c)
    });

    // The service saw the client's trace id as its NuroPb trace_id, and
    // the call's span as its parent.
    let (client_trace, client_span) = ids(call_parent);
    assert_eq!(
        plain["result"]["trace_id"],
        client_trace.as_str(),
        "{plain}"
    );
    let (_, call_span) = ids(plain["result"]["traceparent"].as_str().unwrap());
    let spans = collector.until(Duration::from_secs(20), |s| {
        s.iter().any(|s| s.span_id == call_span)
    });
    let call = spans.iter().find(|s| s.span_id == call_span).unwrap();
    assert_eq!(call.trace_id, client_trace);
    assert_eq!(call.parent, client_span, "under the client's span");
    assert_eq!(call.kind, 2, "a server span");
    assert_eq!(call.attr("bff.route"), format!("{py}.trace"));
    assert_eq!(call.attr("rpc.service"), py);
    assert_eq!(call.attr("rpc.method"), "trace");
    assert_eq!(call.attr("enduser.id"), "alice");
    assert_eq!(call.attr("bff.outcome"), "ok");
    assert_eq!(call.service, mesh_name, "the resource names the BFF");
    assert!(call.end_unix_nano >= call.start_unix_nano);

    // A composed call: one trace, the call's span and a child per part,
    // each part's span the parent the service saw.
    let (composed_trace, composed_client_span) = ids(composed_parent);
    let mut part_spans = Vec::new();
    for key in ["a", "b", "c"] {
        let seen = &composed["result"][key];
        assert_eq!(seen["trace_id"], composed_trace.as_str(), "{composed}");
        part_spans.push(ids(seen["traceparent"].as_str().unwrap()).1);
    }
    let spans = collector.until(Duration::from_secs(20), |s| {
        part_spans.iter().all(|p| s.iter().any(|s| &s.span_id == p))
    });
    let in_trace: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == composed_trace)
        .collect();
    assert_eq!(in_trace.len(), 4, "{in_trace:#?}");
    let root = in_trace
        .iter()
        .find(|s| s.attr("bff.route") == "screen.traced")
        .unwrap();
    assert_eq!(root.parent, composed_client_span);
    let mut keys = Vec::new();
    for part in in_trace.iter().filter(|s| s.span_id != root.span_id) {
        assert_eq!(part.parent, root.span_id, "{part:#?}");
        assert!(part_spans.contains(&part.span_id), "{part:#?}");
        assert_eq!(part.kind, 3, "a client span");
        assert_eq!(part.attr("rpc.method"), "trace");
        keys.push(part.attr("bff.part").to_owned());
    }
    keys.sort();
    assert_eq!(keys, ["a", "b", "c"]);

    // A malformed traceparent: a normal answer, in a fresh trace.
    let fresh = malformed["result"]["trace_id"].as_str().unwrap().to_owned();
    assert!(malformed["error"].is_null(), "{malformed}");
    assert_eq!(fresh.len(), 32);
    assert!(fresh != client_trace && fresh != composed_trace);
    let spans = collector.until(Duration::from_secs(20), |s| {
        s.iter().any(|s| s.trace_id == fresh)
    });
    let fresh_span = spans.iter().find(|s| s.trace_id == fresh).unwrap();
    assert_eq!(fresh_span.parent, "", "the root of its trace");

    // The socket's span under the upgrade's traceparent, with the
    // hello_call under it; the calls link to it.
    let (socket_trace, socket_client_span) = ids(socket_parent);
    assert_eq!(hello["trace_id"], socket_trace.as_str(), "{hello}");
    let (_, hello_span) = ids(hello["traceparent"].as_str().unwrap());
    rt.block_on(async {
        c.send_message(tokio_tungstenite::tungstenite::Message::Close(None))
            .await
            .unwrap();
        let _ = c.closed().await;
    });
    let spans = collector.until(Duration::from_secs(20), |s| {
        s.iter()
            .any(|s| s.trace_id == socket_trace && !s.attr("websocket.close_code").is_empty())
    });
    let socket = spans
        .iter()
        .find(|s| s.trace_id == socket_trace && !s.attr("websocket.close_code").is_empty())
        .unwrap();
    assert_eq!(socket.parent, socket_client_span);
    assert_eq!(socket.attr("websocket.close_code"), "1000");
    assert_eq!(socket.attr("bff.close_reason"), "client");
    let hello_call = spans.iter().find(|s| s.span_id == hello_span).unwrap();
    assert_eq!(hello_call.parent, socket.span_id);
    assert_eq!(hello_call.attr("bff.hello_call"), "true");
    assert!(
        call.links
            .contains(&(socket.trace_id.clone(), socket.span_id.clone())),
        "{call:#?}"
    );

    // The collector stops: calls answer as before, the spans are dropped
    // and counted.
    let (with_collector, without) = rt.block_on(async {
        let (mut c, _) = common::connect(&url, &token).await;
        let before = collector.spans().len();
        let with_collector = median_call(&mut c, &py, 200).await;
        // Those calls' spans reach the collector before it stops.
        let deadline = Instant::now() + Duration::from_secs(20);
        while collector.spans().len() < before + 200 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        collector.stop();
        let without = median_call(&mut c, &py, 200).await;
        (with_collector, without)
    });
    let dropped = rt.block_on(async {
        let series = r#"bff_spans_dropped_total{reason="export_failed"}"#;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = spans_metric(addr, series).await;
            if n > 0 || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    println!(
        "median call with the collector up {with_collector:?}, stopped {without:?}; {dropped} spans dropped"
    );
    assert!(dropped > 0, "drops are counted");
    assert!(
        without < with_collector * 3 + Duration::from_millis(5),
        "a stopped collector slowed calls: {with_collector:?} -> {without:?}"
    );
    let exported = rt.block_on(spans_metric(addr, "bff_spans_exported_total"));
    assert!(exported >= 200, "{exported}");
    drop(p);
}
