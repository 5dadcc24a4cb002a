//! Authorize: may this client call this operation on this deployment?
//!
//! Deny by default: a client may call only the operations it lists and the deployments
//! its globs match, and a deployment with required scopes or roles only with a token that
//! carries all of them. A deployment a client may not call is refused before the gateway
//! says whether it exists, so callers cannot probe the catalogue.

use std::sync::Arc;

use wildmatch::WildMatch;

use crate::config::ClientConfig;
use crate::error::GatewayError;
use crate::identify::Caller;
use crate::route::Operation;

/// One client's policy, compiled from its `[[clients]]` entry.
#[derive(Debug)]
pub struct ClientPolicy {
    pub id: Arc<str>,
    deployments: Vec<WildMatch>,
    /// Bit per [`Operation`]; all set for `"*"`.
    operations: u32,
    deployment_scopes: Vec<(WildMatch, Vec<String>)>,
    /// What [`crate::admit`] counts for this client.
    pub limits: Arc<crate::admit::ClientLimits>,
}

fn bit(op: Operation) -> u32 {
    1 << (op as u32)
}

impl ClientPolicy {
    pub fn new(c: &ClientConfig) -> Self {
        Self::new_from(c, None)
    }

    /// The policy of `c` after a reload; `previous` is the same client's policy in the
    /// configuration being replaced (its concurrency count carries over).
    pub fn new_from(c: &ClientConfig, previous: Option<&ClientPolicy>) -> Self {
        let mut operations = 0;
        for op in &c.operations {
            if op.as_str() == "*" {
                operations = u32::MAX;
            } else if let Some(o) = Operation::from_name(op.as_str()) {
                operations |= bit(o);
            }
        }
        Self {
            id: Arc::from(c.id.as_str()),
            deployments: c
                .deployments
                .iter()
                .map(|d| WildMatch::new(d.as_str()))
                .collect(),
            operations,
            deployment_scopes: c
                .deployment_scopes
                .iter()
                .map(|(d, s)| {
                    (
                        WildMatch::new(d),
                        s.iter().map(|x| x.as_str().to_owned()).collect(),
                    )
                })
                .collect(),
            limits: Arc::new(crate::admit::ClientLimits::new_from(
                c,
                previous.map(|p| &*p.limits),
            )),
        }
    }

    pub fn allows_operation(&self, op: Operation) -> bool {
        self.operations & bit(op) != 0
    }

    pub fn allows_deployment(&self, name: &str) -> bool {
        self.deployments.iter().any(|m| m.matches(name))
    }

    /// Scopes or roles the caller needs for `deployment` that `grants` lacks.
    fn missing_scopes<'a>(&'a self, deployment: &str, grants: &[String]) -> Vec<&'a str> {
        let mut missing = Vec::new();
        for (pattern, scopes) in &self.deployment_scopes {
            if pattern.matches(deployment) {
                for s in scopes {
                    if !grants.iter().any(|g| g == s) && !missing.contains(&s.as_str()) {
                        missing.push(s.as_str());
                    }
                }
            }
        }
        missing
    }
}

/// May `caller` call `op` at all? Checked before the request body is read.
pub fn operation(caller: &Caller, op: Operation) -> Result<(), GatewayError> {
    if caller.client.allows_operation(op) {
        Ok(())
    } else {
        Err(GatewayError::ClientNotAllowed(format!(
            "client '{}' may not call the '{}' operation",
            caller.client.id,
            op.as_str()
        )))
    }
}

/// May `caller` call `deployment`?
pub fn deployment(caller: &Caller, deployment: &str) -> Result<(), GatewayError> {
    if !caller.client.allows_deployment(deployment) {
        return Err(GatewayError::ClientNotAllowed(format!(
            "client '{}' may not call the deployment '{}'",
            caller.client.id,
            crate::shown::shown(deployment)
        )));
    }
    let missing = caller.client.missing_scopes(deployment, &caller.grants);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(GatewayError::InsufficientScope {
            deployment: crate::shown::shown(deployment),
            scope: missing.join(" "),
        })
    }
}

/// Whether `deployment` is listed to `caller` by `GET /v1/models`.
pub fn visible(caller: &Caller, deployment: &str) -> bool {
    caller.client.allows_deployment(deployment)
        && caller
            .client
            .missing_scopes(deployment, &caller.grants)
            .is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identify::AuthMethod;

    fn caller(toml_client: &str, grants: &[&str]) -> Caller {
        let c: ClientConfig = toml::from_str(toml_client).unwrap();
        Caller {
            client: Arc::new(ClientPolicy::new(&c)),
            method: AuthMethod::Jwt,
            principal: Default::default(),
            grants: grants.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn matrix_of_operations_and_deployments() {
        let c = caller(
            r#"id = "a"
               deployments = ["gpt-4o", "text-embedding-*"]
               operations = ["chat", "embeddings"]"#,
            &[],
        );
        assert!(operation(&c, Operation::Chat).is_ok());
        assert!(operation(&c, Operation::Embeddings).is_ok());
        for op in [
            Operation::Images,
            Operation::Files,
            Operation::Other,
            Operation::Models,
        ] {
            let e = operation(&c, op).unwrap_err();
            assert_eq!(e.code(), "client_not_allowed");
        }
        assert!(deployment(&c, "gpt-4o").is_ok());
        assert!(deployment(&c, "text-embedding-3-small").is_ok());
        assert!(deployment(&c, "gpt-4o-mini").is_err());
        assert!(deployment(&c, "GPT-4O").is_err());
    }

    #[test]
    fn deployment_scopes_need_every_listed_grant() {
        let toml = r#"id = "a"
               deployments = ["*"]
               operations = ["*"]
               deployment_scopes = { "gpt-4o*" = ["OpenAI.Premium", "chat.write"] }"#;
        let e = deployment(&caller(toml, &["OpenAI.Premium"]), "gpt-4o").unwrap_err();
        assert_eq!(e.code(), "insufficient_scope");
        assert!(e.to_string().contains("chat.write"));
        assert!(deployment(&caller(toml, &["chat.write", "OpenAI.Premium"]), "gpt-4o").is_ok());
        assert!(deployment(&caller(toml, &[]), "other").is_ok());
        assert!(!visible(&caller(toml, &[]), "gpt-4o"));
        assert!(operation(&caller(toml, &[]), Operation::Batches).is_ok());
    }
}
