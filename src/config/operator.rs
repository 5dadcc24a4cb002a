//! What `portcullis keys` needs of a configuration file, and nothing more: `[store]`
//! (its `${ENV}` values and `_file` secrets resolved) and the ids of `[[clients]]`.
//!
//! The rest of the file — backends, their credentials, the Azure environment they read —
//! is neither validated nor resolved, so an operator's machine that holds none of the
//! gateway's backend secrets can still issue, list, rotate and revoke keys.

use std::path::{Path, PathBuf};

use super::{line_at, resolve_secret, Problem, Secret, StoreConfig};

/// `[store]` and the client ids of a configuration file.
#[derive(Debug, Clone)]
pub struct StoreView {
    pub store: StoreConfig,
    /// `store.key_hmac_secret` (or `_file`), resolved.
    pub key_hmac_secret: Option<Secret>,
    pub client_ids: Vec<String>,
    /// Directory relative paths are resolved against.
    pub base_dir: PathBuf,
}

/// Read `[store]` and the `[[clients]]` ids of the file at `path`. Errors are the text to
/// print: the file's name and the problem's key and line, never the file's content.
pub fn load(path: &Path) -> Result<StoreView, String> {
    let shown = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{shown}: cannot read file: {e}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| match e.span() {
        Some(s) => format!("{shown}: line {}: {}", line_at(&text, s.start), e.message()),
        None => format!("{shown}: {}", e.message()),
    })?;
    let store: StoreConfig = match table.get("store") {
        Some(v) => serde_path_to_error::deserialize(v.clone()).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                String::new()
            } else {
                format!(".{key}")
            };
            format!(
                "invalid configuration {shown}: store{key}: {}",
                e.into_inner().message()
            )
        })?,
        None => StoreConfig::default(),
    };
    let base_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut problems: Vec<Problem> = Vec::new();
    let key_hmac_secret = resolve_secret(
        &store.key_hmac_secret,
        &store.key_hmac_secret_file,
        "store",
        "key_hmac_secret",
        false,
        &base_dir,
        &mut problems,
    );
    if let Some(p) = problems.first() {
        return Err(format!("{shown}: {p}"));
    }
    let mut client_ids = Vec::new();
    if let Some(clients) = table.get("clients") {
        let list = clients
            .as_array()
            .ok_or_else(|| format!("{shown}: clients: expected [[clients]] entries"))?;
        for (i, c) in list.iter().enumerate() {
            match c.get("id").and_then(|v| v.as_str()) {
                Some(id) => client_ids.push(id.to_owned()),
                None => return Err(format!("{shown}: clients[{i}].id: missing or not a string")),
            }
        }
    }
    Ok(StoreView {
        store,
        key_hmac_secret,
        client_ids,
        base_dir,
    })
}
