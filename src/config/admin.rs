//! `[admin]` credentials: the single `token` (every scope, named `admin`) and the scoped
//! `[[admin.tokens]] = { name, token | token_file, scopes = [...] }`, resolved and checked
//! with their key paths.
//!
//! Scopes: `read` (state, usage, clients, keys list, metrics), `keys` (create, rotate,
//! revoke), `config` (reload), `tokens` (the token service's revocations). Names are
//! what audit lines and `whoami` show, so they are unique and never the token itself; two
//! entries with the same token would make the name ambiguous, so that is an error too.

use std::path::Path;

use serde::Deserialize;

use super::{problem, resolve_secret, AdminConfig, Problem, Secret, Text};

/// One scope an admin token may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Keys,
    Config,
    Tokens,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Keys, Scope::Config, Scope::Tokens];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Keys => "keys",
            Scope::Config => "config",
            Scope::Tokens => "tokens",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of scopes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    pub fn all() -> Self {
        Scopes(Scope::ALL.iter().fold(0, |b, s| b | s.bit()))
    }

    pub fn contains(self, s: Scope) -> bool {
        self.0 & s.bit() != 0
    }

    /// The scopes in their documented order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(it: I) -> Self {
        Scopes(it.into_iter().fold(0, |b, s| b | s.bit()))
    }
}

/// One `[[admin.tokens]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenConfig {
    pub name: Text,
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<Text>,
    pub scopes: Vec<Scope>,
}

/// An admin credential, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    pub name: String,
    pub secret: Secret,
    pub scopes: Scopes,
    /// SHA-256 of the token, what requests are compared against (worked out once).
    digest: [u8; 32],
}

impl AdminToken {
    pub fn new(name: String, secret: Secret, scopes: Scopes) -> Self {
        let digest = crate::digest::sha256(secret.expose().as_bytes());
        Self {
            name,
            secret,
            scopes,
            digest,
        }
    }

    /// SHA-256 of the token.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

/// The name audit lines give the single `[admin] token`.
pub const LEGACY_NAME: &str = "admin";

/// Shortest `[[admin.tokens]]` token accepted: anything shorter can be guessed online. (The
/// single `[admin] token` predates the check and keeps working as it is.)
const MIN_TOKEN_LEN: usize = 16;

/// Every admin credential of `admin`: the single `token` first (all scopes), then
/// `tokens` in order. Problems go to `problems` with their key paths.
pub fn resolve(
    admin: &AdminConfig,
    base_dir: &Path,
    problems: &mut Vec<Problem>,
) -> Vec<AdminToken> {
    let mut out = Vec::new();
    if let Some(secret) = resolve_secret(
        &admin.token,
        &admin.token_file,
        "admin",
        "token",
        false,
        base_dir,
        problems,
    ) {
        out.push(AdminToken::new(LEGACY_NAME.into(), secret, Scopes::all()));
    }
    for (i, t) in admin.tokens.iter().enumerate() {
        let path = format!("admin.tokens[{i}]");
        let name = t.name.as_str();
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        {
            problem(
                problems,
                format!("{path}.name"),
                "must be 1 to 64 letters, digits, '-', '_', '.' or '@'",
            );
        }
        if out.iter().any(|o| o.name == name) {
            problem(
                problems,
                format!("{path}.name"),
                format!(
                    "'{name}' is already used{}",
                    if name == LEGACY_NAME {
                        " (by [admin] token)"
                    } else {
                        " by another admin token"
                    }
                ),
            );
        }
        if t.scopes.is_empty() {
            problem(
                problems,
                format!("{path}.scopes"),
                "give at least one of \"read\", \"keys\", \"config\", \"tokens\"",
            );
        }
        let Some(secret) = resolve_secret(
            &t.token,
            &t.token_file,
            &path,
            "token",
            true,
            base_dir,
            problems,
        ) else {
            continue;
        };
        let key = format!(
            "{path}.{}",
            if t.token.is_some() {
                "token"
            } else {
                "token_file"
            }
        );
        if secret.expose().len() < MIN_TOKEN_LEN {
            problem(
                problems,
                key.clone(),
                format!(
                    "must be at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)"
                ),
            );
        }
        if out.iter().any(|o| o.secret == secret) {
            problem(
                problems,
                key,
                "the same token is given to another admin token: each needs its own",
            );
        }
        out.push(AdminToken::new(
            name.to_owned(),
            secret,
            t.scopes.iter().copied().collect(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(toml_text: &str) -> (Vec<AdminToken>, Vec<Problem>) {
        let admin: AdminConfig = toml::from_str(toml_text).unwrap();
        let mut problems = Vec::new();
        let t = resolve(&admin, Path::new("."), &mut problems);
        (t, problems)
    }

    #[test]
    fn the_single_token_has_every_scope_and_scoped_tokens_their_own() {
        let (t, p) = tokens(
            r#"
token = "legacy-token-0123456789"
[[tokens]]
name = "ci"
token = "ci-token-0123456789abc"
scopes = ["read", "keys"]
"#,
        );
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].name, "admin");
        assert!(Scope::ALL.iter().all(|s| t[0].scopes.contains(*s)));
        assert_eq!(t[1].name, "ci");
        assert_eq!(
            t[1].scopes.iter().collect::<Vec<_>>(),
            vec![Scope::Read, Scope::Keys]
        );
    }

    #[test]
    fn mistakes_are_reported_under_their_keys() {
        let (_, p) = tokens(
            r#"
[[tokens]]
name = "ops"
token = "short"
scopes = []
[[tokens]]
name = "ops"
scopes = ["read"]
[[tokens]]
name = "bad name"
token = "another-token-0123456789"
scopes = ["read"]
[[tokens]]
name = "dup"
token = "another-token-0123456789"
scopes = ["read"]
"#,
        );
        let keys: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        for k in [
            "admin.tokens[0].scopes",
            "admin.tokens[0].token",
            "admin.tokens[1].name",
            "admin.tokens[1]",
            "admin.tokens[2].name",
            "admin.tokens[3].token",
        ] {
            assert!(keys.contains(&k), "{k} missing from {p:?}");
        }
        assert!(
            p.iter().all(|p| !p.message.contains("another-token")),
            "{p:?}"
        );
    }

    #[test]
    fn an_unknown_scope_is_a_parse_error() {
        let r: Result<AdminConfig, _> = toml::from_str(
            "[[tokens]]\nname = \"x\"\ntoken = \"0123456789abcdef\"\nscopes = [\"root\"]\n",
        );
        let e = r.unwrap_err().to_string();
        assert!(e.contains("root") && e.contains("read"), "{e}");
    }
}
