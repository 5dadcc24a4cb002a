use super::*;

const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9090"
[[clients]]
id = "a"
anonymous = true
deployments = ["*"]
operations = ["*"]
[[backends]]
name = "b1"
url = "http://127.0.0.1:9"
deployments = { "m" = "m" }
"#;

fn load(text: &str) -> Validated {
    config::load_str(text, "t", Path::new(".")).unwrap()
}

#[test]
fn start_only_keys_are_listed_and_the_rest_is_not() {
    let a = load(BASE);
    assert!(start_only_changes(&a, &a).is_empty());
    let b = load(
        &BASE
            .replace("127.0.0.1:8080", "127.0.0.1:8081")
            .replace("127.0.0.1:9090", "127.0.0.1:9091")
            .replace(
                "[server]\n",
                "[server]\nworkers = 3\nmax_body_bytes = 2048\n",
            ),
    );
    assert_eq!(
        start_only_changes(&a, &b),
        ["server.listen", "server.workers", "admin.listen"],
        "max_body_bytes is reloadable"
    );
    let c = load(&format!(
        "{BASE}\n[store]\nurl = \"sqlite://other.db\"\n[limits]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\n[audit]\npath = \"other.log\"\n"
    ));
    assert_eq!(
        start_only_changes(&a, &c),
        [
            "audit.path",
            "store.url",
            "limits.backend",
            "limits.redis_url"
        ]
    );
}

#[test]
fn changes_name_what_was_added_and_removed() {
    let a = load(BASE);
    let b = load(&format!(
        "{}\n[[backends]]\nname = \"b2\"\nurl = \"http://127.0.0.1:10\"\ndeployments = {{ \"m\" = \"m\" }}\n[[clients]]\nid = \"c\"\ndeployments = [\"*\"]\noperations = [\"*\"]\n",
        BASE.replace("id = \"a\"", "id = \"a2\"")
    ));
    let c = changes(&a, &b);
    assert_eq!(c.backends_added, ["b2"]);
    assert!(c.backends_removed.is_empty());
    assert_eq!(c.clients_added, ["a2", "c"]);
    assert_eq!(c.clients_removed, ["a"]);
}

#[test]
fn only_changes_to_the_file_or_a_kubernetes_entry_count() {
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind};
    let name = std::ffi::OsStr::new("portcullis.toml");
    let ev = |kind, path: &str| notify::Event::new(kind).add_path(PathBuf::from(path));
    let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
    assert!(relevant(&ev(write, "/etc/p/portcullis.toml"), name));
    assert!(relevant(
        &ev(EventKind::Create(CreateKind::Any), "/etc/p/..data"),
        name
    ));
    assert!(relevant(
        &ev(
            EventKind::Create(CreateKind::Any),
            "/etc/p/..2026_01_01_00_00_00.1"
        ),
        name
    ));
    assert!(!relevant(&ev(write, "/etc/p/other.toml"), name));
    assert!(
        !relevant(
            &ev(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/etc/p/portcullis.toml"
            ),
            name
        ),
        "reading the file (as a reload does) is no change"
    );
    assert!(relevant(
        &ev(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            "/etc/p/portcullis.toml"
        ),
        name
    ));
}

#[test]
fn the_reload_command_reads_only_the_admin_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    // The rest of the file is the broken change being tried: the gateway reports it.
    std::fs::write(
        &path,
        "[admin]\nlisten = \"0.0.0.0:9191\"\ntoken_file = \"t\"\n[[backends]]\nname = 1\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("t"), "token-1\n").unwrap();
    let t = client::admin_target(&path, None).unwrap();
    assert_eq!(t.url, "http://127.0.0.1:9191/admin/reload");
    assert_eq!(t.token.unwrap().expose(), "token-1");
    let t = client::admin_target(&path, Some("[::]:7")).unwrap();
    assert_eq!(t.url, "http://[::1]:7/admin/reload");
    std::fs::write(&path, "[admin]\nlisten = \"\"\n").unwrap();
    let e = client::admin_target(&path, None).unwrap_err();
    assert!(e.contains("disabled"), "{e}");
    std::fs::write(
        &path,
        "[admin]\nlisten = \"127.0.0.1:1\"\ntoken_file = \"gone\"\n",
    )
    .unwrap();
    let e = client::admin_target(&path, None).unwrap_err();
    assert!(e.contains("admin.token_file"), "{e}");
}
