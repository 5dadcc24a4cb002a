//! The container image and the Kubernetes manifests, checked offline.
//!
//! - `Dockerfile`: builds the binary `cargo build --release` makes for the package's `[[bin]]`
//!   and copies that path, on the toolchain the project is tested with, runs as a non-root
//!   user on a runtime image that has every library the binary links, and its `HEALTHCHECK`
//!   runs a subcommand the binary has. (No Docker engine here: it is not built.)
//! - `deploy/kubernetes/overlays/*`: each rendered with `kubectl kustomize` and every object
//!   validated against the Kubernetes schemas (`kubernetes-validate --strict`, from the
//!   project's `.venv`, see scripts/test.sh), then what a user relies on: hardened
//!   containers, probes on the right paths and ports, a loopback sidecar, selectors that
//!   match, a grace period above the drain, no secret value anywhere, the Secret keys the
//!   README's commands create, and the fleet's `portcullis.toml` passing `portcullis check`.
//!
//! `PORTCULLIS_KUBECTL` and `PORTCULLIS_PYTHON` override where kubectl and the venv's Python
//! are found.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The Kubernetes release the objects are validated against (a supported AKS version).
const KUBERNETES_VERSION: &str = "1.34.0";
/// Every overlay; `overlays_are_all_tested` fails when a directory is missing here.
const OVERLAYS: &[&str] = &["sidecar", "sidecar-workload-identity", "fleet"];
const BINARY_IN_IMAGE: &str = "/usr/local/bin/portcullis";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (run scripts/test.sh, it installs what this test needs)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn kubectl() -> Command {
    Command::new(std::env::var("PORTCULLIS_KUBECTL").unwrap_or_else(|_| "kubectl".to_owned()))
}

/// The venv's Python (it has kubernetes-validate and its PyYAML).
fn python() -> PathBuf {
    let python = std::env::var("PORTCULLIS_PYTHON")
        .map_or_else(|_| repo().join(".venv/bin/python"), PathBuf::from);
    assert!(
        python.with_file_name("kubernetes-validate").exists(),
        "no kubernetes-validate beside {}: run scripts/test.sh (it installs it in .venv) or set PORTCULLIS_PYTHON",
        python.display()
    );
    python
}

/// `kubectl kustomize` of an overlay: the YAML text.
fn render_yaml(overlay: &str) -> String {
    let dir = kubernetes_dir().join("overlays").join(overlay);
    let out = run(kubectl().arg("kustomize").arg(&dir));
    String::from_utf8(out.stdout).unwrap()
}

/// An overlay's objects, as JSON (YAML read by PyYAML: no YAML parser in the crate).
fn render(overlay: &str) -> Vec<Value> {
    let yaml = render_yaml(overlay);
    let mut child = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "cannot read the YAML of {overlay}");
    let objects: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!objects.is_empty(), "{overlay} renders nothing");
    objects
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(objects: &'a [Value], k: &str, n: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| kind(o) == k && name(o) == n)
        .unwrap_or_else(|| panic!("no {k} {n}"))
}

fn of_kind<'a>(objects: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects.iter().filter(move |o| kind(o) == k)
}

/// Every pod template: (workload name, pod spec, pod labels).
fn pods(objects: &[Value]) -> Vec<(String, &Value, &Value)> {
    objects
        .iter()
        .filter(|o| {
            matches!(
                kind(o),
                "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet"
            )
        })
        .map(|o| {
            let t = &o["spec"]["template"];
            (name(o).to_owned(), &t["spec"], &t["metadata"]["labels"])
        })
        .collect()
}

/// The containers and init containers of a pod spec.
fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect()
}

/// The container running the Portcullis image.
fn portcullis_container(pod: &Value) -> Option<&Value> {
    containers(pod)
        .into_iter()
        .find(|c| c["name"] == "portcullis")
}

fn env<'a>(container: &'a Value, var: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == var)
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// `selector` (a label map) picks a pod with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let Some(sel) = selector.as_object() else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn cargo_toml() -> toml::Table {
    read(repo().join("Cargo.toml")).parse().unwrap()
}

/// The name of the package's one binary.
fn bin_name() -> String {
    let cargo = cargo_toml();
    let bins = cargo["bin"].as_array().unwrap();
    assert_eq!(bins.len(), 1, "one [[bin]] in Cargo.toml");
    bins[0]["name"].as_str().unwrap().to_owned()
}

fn package_version() -> String {
    cargo_toml()["package"]["version"]
        .as_str()
        .unwrap()
        .to_owned()
}

// ---- Dockerfile -----------------------------------------------------------------------

/// One Dockerfile instruction: (`FROM`, `rust:... AS build`).
type Instruction = (String, String);

/// The Dockerfile's instructions, `\` continuations joined, comments dropped.
fn dockerfile() -> Vec<Instruction> {
    let text = read(repo().join("Dockerfile"));
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(part) = t.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (op, rest) = current.split_once(' ').unwrap_or((&current, ""));
        out.push((op.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

fn exec_form(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not an exec-form JSON array: {s}: {e}"))
}

/// (build stage, runtime stage) instructions.
fn stages() -> (Vec<Instruction>, Vec<Instruction>) {
    let all = dockerfile();
    let froms: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| op == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    (all[..froms[1]].to_vec(), all[froms[1]..].to_vec())
}

fn one<'a>(stage: &'a [Instruction], op: &str) -> &'a str {
    let found: Vec<&str> = stage
        .iter()
        .filter(|(o, _)| o == op)
        .map(|(_, r)| r.as_str())
        .collect();
    assert_eq!(found.len(), 1, "exactly one {op} in the stage: {found:?}");
    found[0]
}

#[test]
fn the_image_copies_the_binary_the_release_build_produces_for_the_package() {
    let bin = bin_name();
    let (build, runtime) = stages();
    let build_from = one(&build, "FROM");
    let stage_name = build_from
        .rsplit_once(" AS ")
        .map(|(_, n)| n.trim())
        .expect("the build stage is named");
    let workdir = one(&build, "WORKDIR");
    let run = one(&build, "RUN");
    assert!(
        run.starts_with(&format!("cargo build --release --locked --bin {bin} "))
            || run == format!("cargo build --release --locked --bin {bin}"),
        "the build stage runs `cargo build --release --locked --bin {bin}`: {run}"
    );
    // No CARGO_TARGET_DIR, --target or --profile that would move the output.
    assert!(!dockerfile()
        .iter()
        .any(|(_, r)| r.contains("CARGO_TARGET_DIR")
            || r.contains("--target ")
            || r.contains("--profile")));
    let produced = format!("{}/target/release/{bin}", workdir.trim_end_matches('/'));
    let copies: Vec<&str> = runtime
        .iter()
        .filter(|(o, _)| o == "COPY")
        .map(|(_, r)| r.as_str())
        .filter(|r| r.contains("/target/"))
        .collect();
    assert_eq!(
        copies,
        [format!("--from={stage_name} {produced} {BINARY_IN_IMAGE}")],
        "the runtime copies {produced} to {BINARY_IN_IMAGE}"
    );
    assert_eq!(exec_form(one(&runtime, "ENTRYPOINT")), [BINARY_IN_IMAGE]);
    assert_eq!(exec_form(one(&runtime, "CMD")), ["sidecar"]);
    assert_eq!(one(&runtime, "STOPSIGNAL"), "SIGTERM");
    assert_eq!(one(&runtime, "EXPOSE"), "8080");
    let labels = one(&runtime, "LABEL");
    assert!(
        labels.contains(&format!(
            "org.opencontainers.image.version=\"{}\"",
            package_version()
        )),
        "the image's version label is Cargo.toml's: {labels}"
    );
}

#[test]
fn the_build_stage_uses_the_toolchain_the_project_is_tested_with() {
    let (build, _) = stages();
    let arg = dockerfile()
        .into_iter()
        .find(|(op, r)| op == "ARG" && r.starts_with("RUST_VERSION="))
        .expect("ARG RUST_VERSION=...")
        .1;
    let tag = arg.trim_start_matches("RUST_VERSION=").to_owned();
    let from = one(&build, "FROM");
    assert!(
        from.starts_with("docker.io/library/rust:${RUST_VERSION}-bookworm "),
        "the official Rust image on Debian 12, like the runtime: {from}"
    );
    let rustc = run(
        Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned()))
            .arg("--version"),
    );
    let rustc = String::from_utf8(rustc.stdout).unwrap();
    let version = rustc.split_whitespace().nth(1).unwrap();
    let minor: Vec<&str> = version.split('.').take(2).collect();
    assert_eq!(
        tag,
        minor.join("."),
        "Dockerfile RUST_VERSION against {rustc}"
    );
    // And it satisfies the package's rust-version.
    let required = cargo_toml()["package"]["rust-version"]
        .as_str()
        .unwrap()
        .to_owned();
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        parse(&tag) >= parse(&required),
        "{tag} < rust-version {required}"
    );
}

#[test]
fn the_image_runs_as_the_non_root_user_the_manifests_expect_on_a_runtime_with_its_libraries() {
    let (_, runtime) = stages();
    let from = one(&runtime, "FROM");
    assert_eq!(from, "gcr.io/distroless/cc-debian12:nonroot");
    let user = one(&runtime, "USER");
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let uid: u32 = uid
        .parse()
        .expect("a numeric USER (runAsNonRoot can only check numbers)");
    let gid: u32 = gid.parse().unwrap();
    assert_ne!(uid, 0);
    assert_ne!(gid, 0);
    let base: Value = {
        let objects = render("fleet");
        find(&objects, "Deployment", "portcullis")["spec"]["template"]["spec"]["securityContext"]
            .clone()
    };
    assert_eq!(base["runAsUser"], uid, "the pods run as the image's user");
    assert_eq!(base["runAsGroup"], gid);

    // distroless/cc has glibc, libm and libgcc_s, and nothing else (no OpenSSL: TLS is
    // rustls with aws-lc, linked in).
    let ldd = run(Command::new("ldd").arg(env!("CARGO_BIN_EXE_portcullis")));
    let libs = String::from_utf8(ldd.stdout).unwrap();
    for line in libs.lines() {
        let lib = line.split_whitespace().next().unwrap_or_default();
        let lib = lib.rsplit('/').next().unwrap_or_default();
        assert!(
            [
                "linux-vdso.so.1",
                "libgcc_s.so.1",
                "libm.so.6",
                "libc.so.6",
                "ld-linux-x86-64.so.2",
                "ld-linux-aarch64.so.1"
            ]
            .contains(&lib),
            "the binary links {lib}, which gcr.io/distroless/cc-debian12 does not have"
        );
    }
}

#[test]
fn the_build_context_keeps_every_file_the_build_reads() {
    let ignore = read(repo().join(".dockerignore"));
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        patterns.contains(&"target"),
        "the build output stays out of the context"
    );
    // What `cargo build` reads: the manifest, the lock file, the build script, the sources
    // with their embedded files, the migrations, and every target Cargo.toml names.
    let cargo = cargo_toml();
    let mut needed: Vec<String> = [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src/main.rs",
        "src/lib.rs",
        "src/admin/dashboard/app.js",
        "migrations/sqlite",
        "migrations/postgres",
    ]
    .map(String::from)
    .to_vec();
    for (section, dir) in [("bench", "benches"), ("example", "examples")] {
        for t in cargo[section].as_array().into_iter().flatten() {
            needed.push(t.get("path").and_then(|p| p.as_str()).map_or_else(
                || format!("{dir}/{}.rs", t["name"].as_str().unwrap()),
                str::to_owned,
            ));
        }
    }
    for path in &needed {
        assert!(
            repo().join(path).exists(),
            "{path} (the test's list is out of date)"
        );
        for p in &patterns {
            // The forms .dockerignore uses: `name`, `dir/name`, `*suffix`, `*middle*`.
            let excluded = if let Some(rest) = p.strip_prefix('*') {
                let (middle, inner) = rest.strip_suffix('*').map_or((rest, false), |m| (m, true));
                assert!(
                    !middle.contains(['*', '?', '[']),
                    "unsupported pattern {p}: extend this test"
                );
                let file = path.rsplit('/').next().unwrap();
                if inner {
                    file.contains(middle)
                } else {
                    file.ends_with(middle)
                }
            } else {
                assert!(
                    !p.contains(['*', '?', '[', '!']),
                    "unsupported pattern {p}: extend this test"
                );
                path == p || path.starts_with(&format!("{}/", p.trim_end_matches('/')))
            };
            assert!(
                !excluded,
                ".dockerignore's {p} leaves {path} out of the build"
            );
        }
    }
}

/// The health check commands the image and the manifests run, with the binary under test.
fn healthcheck_commands() -> Vec<Vec<String>> {
    let (_, runtime) = stages();
    let hc = one(&runtime, "HEALTHCHECK");
    let cmd = hc.split_once("CMD ").expect("HEALTHCHECK ... CMD [...]").1;
    let mut commands = vec![exec_form(cmd)];
    for overlay in OVERLAYS {
        for (_, pod, _) in pods(&render(overlay)) {
            for c in containers(pod) {
                for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
                    let command = strings(&c[probe]["exec"]["command"]);
                    if command.first() == Some(&BINARY_IN_IMAGE) {
                        commands.push(command.iter().map(|s| (*s).to_owned()).collect());
                    }
                }
            }
        }
    }
    commands
}

#[test]
fn the_healthcheck_the_image_and_the_probes_run_is_a_subcommand_of_the_binary() {
    let commands = healthcheck_commands();
    assert!(
        commands.len() > 1,
        "the image and the sidecar probes run it"
    );
    for command in &commands {
        assert_eq!(command[0], BINARY_IN_IMAGE);
        assert_eq!(
            command.get(1).map(String::as_str),
            Some("healthcheck"),
            "{command:?}"
        );
        run(Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(&command[1..])
            .arg("--help"));
    }
    // Nothing listens on a port just freed: the health check must say so.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "healthcheck",
            "--url",
            &format!("http://127.0.0.1:{port}/health"),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "healthcheck succeeded with nothing listening"
    );
}

// ---- Kubernetes: every overlay --------------------------------------------------------

#[test]
fn overlays_are_all_tested() {
    let mut found: Vec<String> = std::fs::read_dir(kubernetes_dir().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut listed: Vec<String> = OVERLAYS.iter().map(|s| (*s).to_owned()).collect();
    listed.sort();
    assert_eq!(found, listed);
}

#[test]
fn every_overlay_validates_against_the_kubernetes_schemas() {
    let dir = tempfile::tempdir().unwrap();
    let validate = python().with_file_name("kubernetes-validate");
    for overlay in OVERLAYS {
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, render_yaml(overlay)).unwrap();
        let out = run(Command::new(&validate)
            .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
            .arg(&file));
        // One "passed" line per object: every object was checked against a schema.
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let passed = report
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        assert_eq!(passed, render(overlay).len(), "{overlay}:\n{report}");
    }
    // And the validator refuses what it should, so the pass above means something.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        render_yaml("fleet").replacen(
            "maxUnavailable: 1",
            "maxUnavailable: 1\n  maxUnavalable: 1",
            1,
        ),
    )
    .unwrap();
    let out = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a misspelt field passed strict validation"
    );
}

#[test]
fn every_container_runs_non_root_on_a_read_only_root_filesystem_without_privileges() {
    for overlay in OVERLAYS {
        for (workload, pod, _) in pods(&render(overlay)) {
            let psc = &pod["securityContext"];
            assert_eq!(
                pod["automountServiceAccountToken"], false,
                "{overlay}/{workload}"
            );
            for host in ["hostNetwork", "hostPID", "hostIPC"] {
                assert_ne!(pod[host], true, "{overlay}/{workload}: {host}");
            }
            let list = containers(pod);
            assert!(!list.is_empty());
            for c in list {
                let at = format!("{overlay}/{workload}/{}", c["name"]);
                let sc = &c["securityContext"];
                let effective = |k: &str| {
                    if sc[k].is_null() {
                        psc[k].clone()
                    } else {
                        sc[k].clone()
                    }
                };
                assert_eq!(effective("runAsNonRoot"), true, "{at}: runAsNonRoot");
                assert_ne!(effective("runAsUser"), 0, "{at}: runAsUser");
                assert_eq!(
                    sc["readOnlyRootFilesystem"], true,
                    "{at}: readOnlyRootFilesystem"
                );
                assert_eq!(
                    sc["allowPrivilegeEscalation"], false,
                    "{at}: allowPrivilegeEscalation"
                );
                assert_ne!(sc["privileged"], true, "{at}: privileged");
                assert_eq!(
                    strings(&sc["capabilities"]["drop"]),
                    ["ALL"],
                    "{at}: capabilities.drop"
                );
                assert!(
                    sc["capabilities"]["add"].is_null(),
                    "{at}: capabilities.add"
                );
                assert_eq!(
                    effective("seccompProfile")["type"],
                    "RuntimeDefault",
                    "{at}: seccomp"
                );
                let res = &c["resources"];
                for (k, v) in [
                    ("requests", "cpu"),
                    ("requests", "memory"),
                    ("limits", "memory"),
                ] {
                    assert!(res[k][v].is_string(), "{at}: resources.{k}.{v}");
                }
                // Every long-running container is probed (the placeholder application
                // is the user's to replace).
                if c["name"] != "app" {
                    assert!(
                        c["livenessProbe"].is_object() && c["readinessProbe"].is_object(),
                        "{at}: probes"
                    );
                }
            }
        }
    }
}

#[test]
fn the_portcullis_image_is_the_same_in_every_overlay() {
    let base = read(kubernetes_dir().join("base/kustomization.yaml"));
    assert!(
        base.contains(&format!("newTag: {}", package_version())),
        "the base's image tag is Cargo.toml's version"
    );
    let mut images = BTreeSet::new();
    for overlay in OVERLAYS {
        let objects = render(overlay);
        let found: Vec<String> = pods(&objects)
            .iter()
            .filter_map(|(_, pod, _)| portcullis_container(pod))
            .map(|c| c["image"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(found.len(), 1, "{overlay}: one Portcullis container");
        images.extend(found);
    }
    assert_eq!(images.len(), 1, "one image everywhere: {images:?}");
    let image = images.pop_first().unwrap();
    assert!(
        image.ends_with(&format!(":{}", package_version())),
        "{image}"
    );
}

/// Every Secret the rendered objects read: (secret name, key), from env references and
/// the `items` of Secret volumes (required, so what is read is written down).
fn secret_references(objects: &[Value]) -> BTreeSet<(String, String)> {
    let mut refs = BTreeSet::new();
    for (_, pod, _) in pods(objects) {
        for c in containers(pod) {
            for e in c["env"].as_array().into_iter().flatten() {
                let r = &e["valueFrom"]["secretKeyRef"];
                if r.is_object() {
                    refs.insert((
                        r["name"].as_str().unwrap().to_owned(),
                        r["key"].as_str().unwrap().to_owned(),
                    ));
                }
            }
            assert!(c["envFrom"].is_null(), "envFrom hides which keys are read");
        }
        for v in pod["volumes"].as_array().into_iter().flatten() {
            let s = &v["secret"];
            if s.is_object() {
                let secret = s["secretName"].as_str().unwrap().to_owned();
                let items = s["items"].as_array().unwrap_or_else(|| {
                    panic!("volume {}: list the Secret's keys as items", v["name"])
                });
                refs.extend(
                    items
                        .iter()
                        .map(|i| (secret.clone(), i["key"].as_str().unwrap().to_owned())),
                );
            }
        }
    }
    refs
}

/// The Secrets and keys the `kubectl create secret generic` commands of a README create.
fn documented_secrets(readme: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let text = read(readme).replace("\\\n", " ");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("kubectl create secret generic ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let secret = words.next().unwrap().to_owned();
        let keys = out.entry(secret).or_default();
        for w in words {
            if let Some(spec) = w
                .strip_prefix("--from-file=")
                .or_else(|| w.strip_prefix("--from-literal="))
            {
                let (key, _) = spec
                    .split_once('=')
                    .expect("--from-...=KEY=...: name the key");
                keys.insert(key.to_owned());
            }
        }
    }
    out
}

#[test]
fn no_secret_value_is_in_any_rendered_object_and_the_readme_creates_every_secret_key_read() {
    let documented = documented_secrets(&kubernetes_dir().join("README.md"));
    assert!(!documented.is_empty());
    // The README's Deploy section gives the same commands.
    let top = documented_secrets(&repo().join("README.md"));
    assert!(!top.is_empty());
    for (secret, keys) in &top {
        assert_eq!(
            Some(keys),
            documented.get(secret),
            "README.md and deploy/kubernetes/README.md create {secret} differently"
        );
    }
    let mut used: BTreeSet<(String, String)> = BTreeSet::new();
    for overlay in OVERLAYS {
        let objects = render(overlay);
        assert_eq!(
            of_kind(&objects, "Secret").count(),
            0,
            "{overlay}: Secrets are created by the user, not committed"
        );
        let text = render_yaml(overlay);
        for marker in ["-----BEGIN", "PRIVATE KEY", "pcl_"] {
            assert!(!text.contains(marker), "{overlay} contains {marker}");
        }
        for (workload, pod, _) in pods(&objects) {
            for c in containers(pod) {
                for e in c["env"].as_array().into_iter().flatten() {
                    let n = e["name"].as_str().unwrap();
                    let value = e["value"].as_str().unwrap_or_default();
                    let secretish = [
                        "SECRET",
                        "PASSWORD",
                        "TOKEN",
                        "_KEY",
                        "STORE_URL",
                        "REDIS_URL",
                    ]
                    .iter()
                    .any(|s| n.contains(s));
                    assert!(
                        !secretish || value.is_empty(),
                        "{overlay}/{workload}: {n} has a literal value"
                    );
                    assert!(
                        !has_password(value),
                        "{overlay}/{workload}: {n} holds a password"
                    );
                }
            }
        }
        for cm in of_kind(&objects, "ConfigMap") {
            for (file, content) in cm["data"].as_object().unwrap() {
                let table: toml::Table = content.as_str().unwrap().parse().unwrap();
                check_no_inline_secret(&toml::Value::Table(table), file);
            }
        }
        for (secret, key) in secret_references(&objects) {
            let keys = documented.get(&secret).unwrap_or_else(|| {
                panic!("{overlay} reads Secret {secret}, which the README does not create")
            });
            assert!(
                keys.contains(&key),
                "{overlay} reads {secret}/{key}, which the README does not create"
            );
            used.insert((secret, key));
        }
    }
    let all: BTreeSet<(String, String)> = documented
        .iter()
        .flat_map(|(s, ks)| ks.iter().map(|k| (s.clone(), k.clone())))
        .collect();
    assert_eq!(used, all, "the README creates Secret keys nothing reads");
}

/// A URL with a password in it (`scheme://user:password@host`).
fn has_password(s: &str) -> bool {
    s.split_once("://")
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .is_some_and(|auth| {
            auth.contains('@') && auth.split('@').next().unwrap_or_default().contains(':')
        })
}

/// A secret in the TOML is a `${VAR}` or a `_file`, never a value.
fn check_no_inline_secret(v: &toml::Value, at: &str) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let at = format!("{at}.{k}");
                if let toml::Value::String(s) = v {
                    let inline_secret = [
                        "token",
                        "key",
                        "key_hmac_secret",
                        "client_secret",
                        "hmac_secret",
                        "password",
                    ]
                    .contains(&k.as_str());
                    let from_env =
                        s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
                    assert!(
                        !inline_secret || from_env,
                        "{at} is a secret written in the ConfigMap"
                    );
                    assert!(!has_password(s) || from_env, "{at} holds a password");
                }
                check_no_inline_secret(v, &at);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| check_no_inline_secret(v, at)),
        _ => {}
    }
}

// ---- Kubernetes: sidecar ----------------------------------------------------------------

#[test]
fn the_sidecar_listens_on_loopback_is_probed_by_exec_and_reads_its_certificate_read_only() {
    for overlay in ["sidecar", "sidecar-workload-identity"] {
        let objects = render(overlay);
        let app_pods = pods(&objects);
        assert_eq!(app_pods.len(), 1, "{overlay}: the application's workload");
        let (_, pod, labels) = &app_pods[0];
        let sidecar = portcullis_container(pod).unwrap();
        assert_eq!(
            strings(&sidecar["args"]),
            ["sidecar"],
            "{overlay}: no --config, no --allow-non-loopback"
        );
        // Native sidecar: an init container that keeps running.
        let init = pod["initContainers"].as_array().expect("initContainers");
        assert!(
            init.iter().any(|c| c["name"] == "portcullis"),
            "{overlay}: Portcullis starts before the application"
        );
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert!(
            pod["containers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] != "portcullis"),
            "{overlay}: an application container"
        );
        // Loopback only: HOST unset or loopback, no opt-in, no port published, no Service.
        match env(sidecar, "HOST").map(|e| e["value"].as_str().unwrap_or_default()) {
            None | Some("127.0.0.1") | Some("::1") | Some("localhost") => {}
            Some(other) => panic!("{overlay}: the sidecar binds {other}"),
        }
        assert!(
            env(sidecar, "PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK").is_none(),
            "{overlay}"
        );
        assert!(
            sidecar["ports"].is_null(),
            "{overlay}: nothing outside the pod talks to the sidecar"
        );
        for svc in of_kind(&objects, "Service") {
            assert!(
                !selects(&svc["spec"]["selector"], labels),
                "{overlay}: Service {} reaches the sidecar",
                name(svc)
            );
        }
        let api = env(sidecar, "API_BASE_URL").expect("API_BASE_URL");
        assert!(
            api["value"].as_str().unwrap().starts_with("https://"),
            "{overlay}"
        );
        // The application's own configuration points at the sidecar's port.
        let port = env(sidecar, "PORT").map_or("8080", |e| e["value"].as_str().unwrap());
        let app = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "app")
            .unwrap();
        for e in app["env"].as_array().unwrap() {
            let v = e["value"].as_str().unwrap();
            assert!(
                v.starts_with(&format!("http://127.0.0.1:{port}")),
                "{overlay}: app {} = {v}",
                e["name"]
            );
        }
        // Probes run inside the container (the kubelet cannot reach the loopback address).
        // Alive while /health answers; ready once /ready does (the backend token is in).
        let ready_url = format!("http://127.0.0.1:{port}/ready");
        for (probe, extra) in [
            ("startupProbe", vec![]),
            ("readinessProbe", vec!["--url", ready_url.as_str()]),
            ("livenessProbe", vec![]),
        ] {
            let p = &sidecar[probe];
            let mut want = vec![BINARY_IN_IMAGE, "healthcheck"];
            want.extend(extra);
            assert_eq!(strings(&p["exec"]["command"]), want, "{overlay}: {probe}");
            assert!(
                p["httpGet"].is_null() && p["tcpSocket"].is_null(),
                "{overlay}: {probe}"
            );
        }

        let sa_name = pod["serviceAccountName"].as_str().unwrap();
        let sa = find(&objects, "ServiceAccount", sa_name);
        if overlay == "sidecar" {
            let path = env(sidecar, "AZURE_CERTIFICATE_PATH").unwrap()["value"]
                .as_str()
                .unwrap();
            let (dir, file) = path.rsplit_once('/').unwrap();
            let mount = sidecar["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == dir)
                .unwrap_or_else(|| panic!("{overlay}: nothing mounted at {dir}"));
            assert_eq!(mount["readOnly"], true);
            assert!(
                mount["subPath"].is_null(),
                "a subPath mount never sees a rotated certificate"
            );
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap();
            let secret = &volume["secret"];
            assert!(
                secret.is_object(),
                "{overlay}: the certificate comes from a Secret"
            );
            assert!(
                secret["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|i| i["path"] == file),
                "{overlay}: the Secret volume has no {file}"
            );
            // 0440 at most: the pod's group reads it, nobody else.
            assert_eq!(
                secret["defaultMode"].as_u64().unwrap() & 0o137,
                0,
                "{overlay}: defaultMode"
            );
            assert!(pod["securityContext"]["fsGroup"].is_number());
            for var in ["AZURE_TENANT_ID", "AZURE_CLIENT_ID"] {
                assert!(env(sidecar, var).is_some(), "{overlay}: {var}");
            }
            assert!(labels.get("azure.workload.identity/use").is_none());
        } else {
            assert_eq!(
                labels["azure.workload.identity/use"], "true",
                "{overlay}: the webhook's pod label"
            );
            let client_id = sa["metadata"]["annotations"]["azure.workload.identity/client-id"]
                .as_str()
                .unwrap_or_default();
            assert_eq!(
                client_id.len(),
                36,
                "{overlay}: the identity's client id on the service account"
            );
            // The webhook sets these; a certificate would take precedence over it.
            for var in [
                "AZURE_CERTIFICATE_PATH",
                "AZURE_CLIENT_ID",
                "AZURE_TENANT_ID",
                "AZURE_FEDERATED_TOKEN_FILE",
            ] {
                assert!(
                    env(sidecar, var).is_none(),
                    "{overlay}: {var} must come from the webhook"
                );
            }
            assert!(
                secret_references(&objects).is_empty(),
                "{overlay}: no Secret at all"
            );
        }
    }
}

// ---- Kubernetes: fleet ------------------------------------------------------------------

struct Fleet {
    objects: Vec<Value>,
    config_text: String,
    config: toml::Table,
    config_path: String,
}

impl Fleet {
    fn load() -> Self {
        let objects = render("fleet");
        let deployment = find(&objects, "Deployment", "portcullis");
        let pod = &deployment["spec"]["template"]["spec"];
        let c = portcullis_container(pod).unwrap();
        let args = strings(&c["args"]);
        assert_eq!(
            args[..2],
            ["serve", "--config"],
            "the fleet runs the full gateway"
        );
        let config_path = args[2].to_owned();
        let (dir, file) = config_path.rsplit_once('/').unwrap();
        // The ConfigMap is mounted as the whole directory the gateway watches.
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
        assert!(
            mount["subPath"].is_null(),
            "a subPath mount is never updated: no live reload"
        );
        assert_eq!(mount["readOnly"], true);
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        let cm_name = volume["configMap"]["name"]
            .as_str()
            .expect("the config comes from a ConfigMap");
        assert!(volume["configMap"]["items"].is_null());
        let cm = find(&objects, "ConfigMap", cm_name);
        // Updated in place, not renamed per content (that would roll instead of reload).
        assert_eq!(cm_name, "portcullis-config", "no name suffix hash");
        let config_text = cm["data"][file]
            .as_str()
            .unwrap_or_else(|| panic!("no {file} in ConfigMap {cm_name}"))
            .to_owned();
        assert_eq!(
            config_text,
            read(kubernetes_dir().join("overlays/fleet").join(file)),
            "the ConfigMap holds the committed file"
        );
        let config = config_text.parse().unwrap();
        Fleet {
            objects,
            config_text,
            config,
            config_path,
        }
    }

    fn deployment(&self) -> &Value {
        find(&self.objects, "Deployment", "portcullis")
    }

    fn pod(&self) -> &Value {
        &self.deployment()["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        portcullis_container(self.pod()).unwrap()
    }

    fn table(&self, key: &str) -> Option<&toml::Table> {
        self.config.get(key).and_then(toml::Value::as_table)
    }

    fn duration(&self, table: &str, key: &str, default: &str) -> std::time::Duration {
        let s = self
            .table(table)
            .and_then(|t| t.get(key))
            .and_then(toml::Value::as_str)
            .unwrap_or(default);
        humantime::parse_duration(s).unwrap()
    }

    /// The port of `[table] listen` (with its default).
    fn listen_port(&self, table: &str, default: &str) -> u64 {
        let listen = self
            .table(table)
            .and_then(|t| t.get("listen"))
            .and_then(toml::Value::as_str)
            .unwrap_or(default);
        listen.rsplit_once(':').unwrap().1.parse().unwrap()
    }

    /// A probe's or Service's port (a number or a container port's name) as a number.
    fn port(&self, port: &Value) -> u64 {
        if let Some(n) = port.as_u64() {
            return n;
        }
        let name = port.as_str().unwrap();
        self.container()["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    }
}

#[test]
fn the_fleet_probes_health_and_readiness_on_the_client_listener_and_scrapes_the_admin_port() {
    let fleet = Fleet::load();
    let c = fleet.container();
    let client = fleet.listen_port("server", "0.0.0.0:8080");
    let admin = fleet.listen_port("admin", "127.0.0.1:9090");
    let admin_listen = fleet
        .table("admin")
        .and_then(|t| t.get("listen"))
        .and_then(toml::Value::as_str)
        .unwrap_or("127.0.0.1:9090");
    assert!(
        !admin_listen.starts_with("127.") && !admin_listen.starts_with("[::1]"),
        "Prometheus scrapes the pod IP: the admin listener cannot be on loopback"
    );
    let server_listen = fleet
        .table("server")
        .and_then(|t| t.get("listen"))
        .and_then(toml::Value::as_str)
        .unwrap_or("0.0.0.0:8080");
    assert!(
        !server_listen.starts_with("127."),
        "the kubelet and the Service reach the pod IP"
    );
    for (probe, path) in [
        ("startupProbe", "/health"),
        ("livenessProbe", "/health"),
        ("readinessProbe", "/ready"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            fleet.port(&get["port"]),
            client,
            "{probe} on the client listener"
        );
    }
    let annotations = &fleet.deployment()["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert_eq!(annotations["prometheus.io/port"], admin.to_string());
    let ports: Vec<u64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert!(
        ports.contains(&client) && ports.contains(&admin),
        "{ports:?}"
    );
    // The Service sends clients to the client listener, never to the admin one.
    let svc = find(&fleet.objects, "Service", "portcullis");
    let targets: Vec<u64> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| fleet.port(&p["targetPort"]))
        .collect();
    assert_eq!(targets, [client]);
}

#[test]
fn the_fleet_grace_period_outlasts_the_shutdown_delay_and_the_drain() {
    let fleet = Fleet::load();
    let drain = fleet.duration("server", "drain_timeout", "30s");
    let delay = fleet.duration("server", "shutdown_delay", "0s");
    let grace = fleet.pod()["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        std::time::Duration::from_secs(grace) > drain + delay,
        "terminationGracePeriodSeconds {grace} <= shutdown_delay {delay:?} + drain_timeout {drain:?}"
    );
    // A readiness probe that notices the 503 well within the shutdown delay.
    let ready = &fleet.container()["readinessProbe"];
    let noticed = ready["periodSeconds"].as_u64().unwrap_or(10)
        * ready["failureThreshold"].as_u64().unwrap_or(3);
    assert!(
        std::time::Duration::from_secs(noticed) <= delay,
        "readiness notices draining after {noticed}s, shutdown_delay is {delay:?}"
    );
}

#[test]
fn the_fleet_selectors_pick_the_gateway_pods_and_it_scales_and_spreads() {
    let fleet = Fleet::load();
    let d = fleet.deployment();
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    let selector = &d["spec"]["selector"]["matchLabels"];
    assert!(selects(selector, labels));
    let svc = find(&fleet.objects, "Service", "portcullis");
    assert!(selects(&svc["spec"]["selector"], labels), "Service");
    let pdb = of_kind(&fleet.objects, "PodDisruptionBudget")
        .next()
        .expect("a PodDisruptionBudget");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector, "PDB");
    let hpa = of_kind(&fleet.objects, "HorizontalPodAutoscaler")
        .next()
        .expect("an HPA");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(
        (
            target["apiVersion"].as_str(),
            target["kind"].as_str(),
            target["name"].as_str()
        ),
        (Some("apps/v1"), Some("Deployment"), Some("portcullis"))
    );
    let min = hpa["spec"]["minReplicas"].as_u64().unwrap();
    assert!(min >= 3, "several replicas: {min}");
    assert!(hpa["spec"]["maxReplicas"].as_u64().unwrap() > min);
    assert!(
        d["spec"]["replicas"].is_null(),
        "the HPA owns the replica count: an apply must not reset it"
    );
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    // No Service or PDB picks the Redis pods as gateway pods, and vice versa.
    let redis = find(&fleet.objects, "Deployment", "portcullis-redis");
    assert!(!selects(
        selector,
        &redis["spec"]["template"]["metadata"]["labels"]
    ));
    let spread = fleet.pod()["topologySpreadConstraints"]
        .as_array()
        .expect("topologySpreadConstraints");
    let keys: BTreeSet<&str> = spread
        .iter()
        .map(|t| t["topologyKey"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["kubernetes.io/hostname", "topology.kubernetes.io/zone"])
    );
    for t in spread {
        assert!(
            selects(&t["labelSelector"]["matchLabels"], labels),
            "topology spread selector"
        );
    }
}

#[test]
fn the_fleet_shares_limits_through_the_redis_the_overlay_runs() {
    let fleet = Fleet::load();
    let limits = fleet.table("limits").expect("[limits]");
    assert_eq!(limits["backend"].as_str(), Some("redis"));
    let url = limits["redis_url"].as_str().unwrap();
    let hostport = url.strip_prefix("redis://").unwrap().trim_end_matches('/');
    let (host, port) = hostport.split_once(':').unwrap();
    let svc = find(&fleet.objects, "Service", host);
    let svc_port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"].as_u64().unwrap().to_string() == port)
        .expect("the Service has the URL's port");
    let redis = find(&fleet.objects, "Deployment", host);
    let redis_labels = &redis["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&svc["spec"]["selector"], redis_labels));
    let rc = &redis["spec"]["template"]["spec"]["containers"][0];
    let target = &svc_port["targetPort"];
    let container_port = rc["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == *target || p["containerPort"] == *target)
        .expect("the Service's targetPort");
    // Only the gateway's pods reach Redis.
    let np = of_kind(&fleet.objects, "NetworkPolicy")
        .find(|n| selects(&n["spec"]["podSelector"]["matchLabels"], redis_labels))
        .expect("a NetworkPolicy for Redis");
    let gateway_labels = &fleet.deployment()["spec"]["template"]["metadata"]["labels"];
    let rules = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    let from = rules[0]["from"].as_array().unwrap();
    assert!(from.iter().all(
        |f| selects(&f["podSelector"]["matchLabels"], gateway_labels)
            && f["namespaceSelector"].is_null()
    ));
    assert_eq!(
        rules[0]["ports"][0]["port"],
        container_port["containerPort"]
    );
}

/// A self-signed certificate with its key, as one PEM (what `certificate_file` reads).
fn certificate_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["portcullis-gateway".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    format!("{}{}", cert.pem(), key.serialize_pem())
}

/// Every `${VAR}` in the TOML's values.
fn env_references(v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                let end = rest[start..].find('}').expect("a closed ${");
                out.insert(rest[start + 2..start + end].to_owned());
                rest = &rest[start + end..];
            }
        }
        toml::Value::Table(t) => t.values().for_each(|v| env_references(v, out)),
        toml::Value::Array(a) => a.iter().for_each(|v| env_references(v, out)),
        _ => {}
    }
}

/// Every string in the TOML that is an absolute path.
fn absolute_paths(v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::String(s) if s.starts_with('/') => {
            out.insert(s.clone());
        }
        toml::Value::Table(t) => t.values().for_each(|v| absolute_paths(v, out)),
        toml::Value::Array(a) => a.iter().for_each(|v| absolute_paths(v, out)),
        _ => {}
    }
}

#[test]
fn the_fleet_configuration_passes_portcullis_check_with_what_the_pod_provides() {
    let fleet = Fleet::load();
    let c = fleet.container();
    let pod = fleet.pod();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap().to_owned();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.env_clear();

    // Every ${VAR} the file names is set in the container, from a value or a Secret.
    let mut vars = BTreeSet::new();
    env_references(&toml::Value::Table(fleet.config.clone()), &mut vars);
    assert!(!vars.is_empty(), "the store URL comes from the environment");
    for var in &vars {
        let e = env(c, var).unwrap_or_else(|| {
            panic!("portcullis.toml reads ${{{var}}}, which the container does not set")
        });
        let value = match (
            e["value"].as_str(),
            e["valueFrom"]["secretKeyRef"]["key"].as_str(),
        ) {
            (Some(v), _) => v.to_owned(),
            (None, Some("postgres-url")) => {
                "postgres://portcullis:not-the-password@db.example:5432/portcullis".to_owned()
            }
            (None, Some(key)) => panic!("the test has no value for Secret key {key}: add one"),
            (None, None) => panic!("{var} has no value"),
        };
        cmd.env(var, value);
    }

    // Every file the file names is in a volume the container mounts: the test puts one
    // there (below its temporary root) and points the file at it.
    let mut paths = BTreeSet::new();
    absolute_paths(&toml::Value::Table(fleet.config.clone()), &mut paths);
    assert!(
        paths.len() >= 4,
        "certificate, HMAC secret and admin tokens are files: {paths:?}"
    );
    let mut text = fleet.config_text.clone();
    for path in &paths {
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| path.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
            .unwrap_or_else(|| panic!("{path} is in no volume the container mounts"));
        assert_eq!(mount["readOnly"], true, "{path}");
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert!(
            volume["secret"].is_object(),
            "{path}: secrets come from a Secret volume"
        );
        let file = &path[mount["mountPath"].as_str().unwrap().len() + 1..];
        assert!(
            volume["secret"]["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["path"] == file),
            "{path}: the Secret volume {} has no item {file}",
            volume["name"]
        );
        let content = if file.ends_with(".pem") {
            certificate_pem()
        } else {
            format!("{file}-{}", "x".repeat(40))
        };
        let local = format!("{root}{path}");
        std::fs::create_dir_all(Path::new(&local).parent().unwrap()).unwrap();
        std::fs::write(&local, content).unwrap();
        text = text.replace(&format!("\"{path}\""), &format!("\"{local}\""));
    }
    let config = format!("{root}{}", fleet.config_path);
    std::fs::create_dir_all(Path::new(&config).parent().unwrap()).unwrap();
    std::fs::write(&config, &text).unwrap();

    let out = run(cmd.args(["check", "--config", &config]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let backends = fleet.config["backends"].as_array().unwrap().len();
    assert!(
        stdout.contains(&format!("OK ({backends} backends)")),
        "{stdout}"
    );

    // And check does refuse this file when the pod would lack a variable.
    let mut without = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    without.env_clear().args(["check", "--config", &config]);
    let out = without.output().unwrap();
    assert!(!out.status.success(), "check passed without {vars:?}");
}
