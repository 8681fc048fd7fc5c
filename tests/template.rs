//! The template never ships broken: generate BFFs with the real
//! `cargo generate` CLI for several answer sets, then build each, run its own
//! tests, `cargo fmt --check` and `cargo clippy -D warnings` on it, sharing
//! one target directory. Invalid answers must be refused with a message that
//! names the key.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        std::fs::copy(
            repo().join("cargo-generate.toml"),
            d.join("cargo-generate.toml"),
        )
        .unwrap();
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
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

fn generate_build_and_test(name: &str, answers: &[(&str, &str)]) -> PathBuf {
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
    let tests = ok("cargo test", &cargo(&crate_dir, &["test"]));
    assert!(tests.contains("test result: ok. 6 passed"), "{tests}");
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
    assert!(
        !d.join("tests/keys").exists(),
        "rs256 keys only for jwt-rs256"
    );

    // RS256, event topics, several routes, an unusual but valid name.
    let d = generate_build_and_test(
        "mobile_BFF-2",
        &[
            ("auth", "jwt-rs256"),
            ("routes", "orders.get_order, users.*,billing-v2.charge"),
            ("event_topics", "orders.#,users.*.updated"),
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
    ] {
        assert!(
            routes.contains(expected),
            "{expected} missing from\n{routes}"
        );
    }
    let config = std::fs::read_to_string(d.join("config/default.toml")).unwrap();
    assert!(config.contains("listen = \"127.0.0.1:9443\""), "{config}");
    assert!(
        config.contains("\"https://app.example.com\", \"http://localhost:5173\""),
        "{config}"
    );
    assert!(d.join("tests/keys/test_public.pem").exists());

    // No auth.
    generate_build_and_test("open-bff", &[("auth", "none"), ("routes", "catalog.list")]);
}

#[test]
fn invalid_answers_are_refused_naming_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("routes", "orders", "routes"),
        ("routes", "orders.get,bad route", "routes"),
        ("port", "http", "port"),
        ("port", "70000", "port"),
        ("auth", "magic", "auth"),
        ("auth", "jwks", "auth"),
        ("event_topics", "orders..x", "event_topics"),
        ("ws_path", "ws", "ws_path"),
        ("mesh_service_name", "has space", "mesh_service_name"),
        ("allowed_origins", "localhost", "allowed_origins"),
        ("runtime_path", "relative/path", "runtime_path"),
    ];
    for (key, value, named) in cases {
        let root = tempdir();
        let out = generate(&root, "bad-bff", &[(key, value)]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
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
